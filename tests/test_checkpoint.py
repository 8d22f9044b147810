"""Checkpoints: ultralytics files load without ultralytics and give the same outputs; our format; hostile pickles."""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import file_size_limit

from trainer import YOLO
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.nn import build_model

REPO = Path(__file__).resolve().parents[1]


def _randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("scale", ["n", "s"])
def test_ultralytics_checkpoint_matches_oracle(ultralytics, tmp_path: Path, scale: str) -> None:
    """Build yolo12{n,s} in ultralytics, save it the way its trainer does, load here, compare outputs in fp32."""
    from ultralytics.nn.tasks import DetectionModel as UltralyticsModel

    torch.manual_seed(0)
    theirs = UltralyticsModel(f"yolo12{scale}.yaml", nc=5, verbose=False).eval()
    theirs.names = {i: f"defect{i}" for i in range(5)}
    _randomise_bn(theirs)
    path = tmp_path / "best.pt"
    torch.save({"epoch": 3, "model": None, "ema": copy.deepcopy(theirs), "optimizer": None,
                "train_args": {"imgsz": 320, "batch": 16}, "version": ultralytics.__version__}, path)

    ckpt = load_checkpoint(path)
    assert ckpt.source == "ultralytics"
    assert (ckpt.spec.variant, ckpt.spec.scale, ckpt.spec.nc) == ("v1", scale, 5)
    assert ckpt.spec.names[4] == "defect4" and ckpt.imgsz == 320
    x = torch.rand(2, 3, 256, 320)
    with torch.no_grad():
        expected, ours = theirs(x)[0], ckpt.model(x)
    assert ((expected - ours).abs().max() / expected.abs().max()).item() <= 1e-4


def test_loads_without_ultralytics_installed(ultralytics, tmp_path: Path) -> None:
    """A fresh interpreter with ultralytics made unimportable still loads an ultralytics file."""
    from ultralytics import YOLO as UltralyticsYOLO

    path = tmp_path / "u.pt"
    UltralyticsYOLO("yolo12n.yaml").save(path)
    code = (
        "import sys; sys.modules['ultralytics'] = None\n"
        "from trainer import YOLO\n"
        f"m = YOLO({str(path)!r}); print(m.model.spec.variant, m.model.spec.scale, m.model.nc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["v1", "n", "80"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_hostile_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(), "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load '(posix|os)\.system'"):
        load_checkpoint(path)
    raw = tmp_path / "evil_raw.pt"  # a legacy (non-zip) pickle
    raw.write_bytes(pickle.dumps({"model": _Exploit()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)


def test_own_format_loads_weights_only_and_round_trips(tmp_path: Path) -> None:
    model = build_model("yolov12n.yaml", names=["scratch", "dent"]).eval()
    _randomise_bn(model)
    path = save_checkpoint(tmp_path / "w.pt", model, imgsz=320, train_args={"epochs": 3, "batch": 8}, epoch=2)
    raw = torch.load(path, weights_only=True)
    assert raw["spec"]["variant"] == "turbo" and raw["spec"]["scale"] == "n" and raw["imgsz"] == 320
    assert raw["train_args"]["batch"] == 8
    ckpt = load_checkpoint(path)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ckpt.model(x))
    assert ckpt.spec.names == {0: "scratch", 1: "dent"} and ckpt.imgsz == 320
    assert YOLO(str(path)).names[1] == "dent"


def test_ddp_prefixed_turbo_state_dict_reads_architecture(tmp_path: Path) -> None:
    """A bare state dict saved from DDP: `module.` stripped; turbo, scale s, groups and nc read from the weights."""
    model = build_model("yolov12s.yaml", nc=7)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    ckpt = load_checkpoint(path)
    assert (ckpt.spec.variant, ckpt.spec.scale, ckpt.spec.nc) == ("turbo", "s", 7)
    assert ckpt.model.model[1].conv.groups == 2 and ckpt.model.model[3].conv.groups == 4


def test_our_checkpoint_with_a_path_among_its_options_loads_and_resumes(tmp_path: Path) -> None:
    """A run given project=Path(...) (before options were made plain) saved a pathlib.Path and numpy numbers in
    its checkpoints; torch's weights-only load refuses them. They load through the restricted unpickler (the path
    as text) as our own format, for predict/val/export and for --resume, not as a foreign file ("no area-attention
    weights")."""
    import numpy as np

    from trainer.config import TrainConfig
    from trainer.engine import _read_resumable, _resume_config

    model = build_model("yolov12n.yaml", names=["a", "b"])
    data = tmp_path / "d.yaml"
    data.write_text("names: [a, b]\n")
    args = TrainConfig(data=str(data), epochs=3).to_dict()
    last = save_checkpoint(tmp_path / "last.pt", model, imgsz=64, epoch=0, train_model=model.state_dict(),
                           train_args=args)
    raw = torch.load(last, weights_only=True)
    raw["train_args"].update(project=Path("runs/x"), workers=np.int64(2))
    torch.save(raw, last)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(last, weights_only=True)
    ckpt = load_checkpoint(last)
    assert ckpt.source == "yolov12-serve" and ckpt.meta["train_args"]["project"] == "runs/x"
    assert ckpt.model.names == {0: "a", 1: "b"}
    assert _read_resumable(last)["train_args"]["workers"] == 2
    cfg, _ = _resume_config(TrainConfig(data=str(data), resume=str(last)), {})
    assert (type(cfg.project), type(cfg.workers)) == (str, int)  # saved plain by the resumed run


def test_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint 'yolo12s.pt' not found \(weights are never downloaded "
                                              r"here\): give the path .* or build a fresh model from 'yolo12s.yaml'$"):
        YOLO("yolo12s.pt")  # what ultralytics users type: theirs downloads it
    model = build_model("yolov12n.yaml")
    good = save_checkpoint(tmp_path / "weights" / "best.pt", model)
    for folder, tail in ((tmp_path, f", e.g. {good}"), (good.parent, f", e.g. {good}"), (good.parent / "x.pt", "")):
        folder.mkdir(exist_ok=True)  # a run's folder given for its weights was "not found", though it is there
        said = f"checkpoint '{folder}' is a folder: give the .pt file in it{tail}"
        with pytest.raises(CheckpointError, match=f"^{re.escape(said)}$"):
            load_checkpoint(folder)
    with pytest.raises(ValueError, match=r"is a folder: give a model yaml, a \.pt checkpoint or an exported engine"):
        YOLO(str(tmp_path))
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(torn)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "hello")
    (tmp_path / "zip.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "zip.pt")


def test_own_format_spec_disagreeing_with_weights_is_one_line(tmp_path: Path) -> None:
    """An edited or corrupt spec (nc, names, variant, scale, missing) is one CheckpointError line naming the file and
    what disagrees, never a load_state_dict traceback nor a model carrying the wrong class names."""
    model = build_model("yolov12n.yaml", names=["scratch", "dent"]).eval()
    good = torch.load(save_checkpoint(tmp_path / "good.pt", model), weights_only=True)

    def corrupt(name: str, edit) -> Path:
        raw = copy.deepcopy(good)
        edit(raw)
        torch.save(raw, tmp_path / name)
        return tmp_path / name

    cases = {
        "nc3.pt": (lambda r: r["spec"].update(nc=3, names={0: "a", 1: "b", 2: "c"}), r"nc=3 but the weights have 2"),
        "names3.pt": (lambda r: r["spec"].update(names={0: "a", 1: "b", 2: "c"}), r"3 class names but .* 2 classes"),
        "names_list.pt": (lambda r: r["spec"].update(names=["a", "b"]), r"2 class names but"),
        "names_str_keys.pt": (lambda r: r["spec"].update(names={"0": "a", "1": "b"}), r"must map 0\.\.1 to text"),
        "v1.pt": (lambda r: r["spec"].update(variant="v1"), r"variant 'v1' but the weights are 'turbo'"),
        "scale_s.pt": (lambda r: r["spec"]["yaml"].update(scale="s"), r"tensors differ"),
        "no_yaml.pt": (lambda r: r["spec"].pop("yaml"), r"no buildable architecture"),
        "no_spec.pt": (lambda r: r.pop("spec"), r"has no 'spec'"),
        "no_model.pt": (lambda r: r.pop("model"), r"holds no weights"),
    }
    for name, (edit, why) in cases.items():
        path = corrupt(name, edit)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(str(path)) and re.search(why, msg), (name, msg)
        if name != "no_model.pt":
            assert "plain state dict" in msg, (name, msg)  # the way out
    # the way out the message names: the weights alone rebuild, with placeholder names rather than wrong ones
    torch.save(good["model"], tmp_path / "weights_only.pt")
    assert load_checkpoint(tmp_path / "weights_only.pt").spec.names == {0: "class0", 1: "class1"}


def test_a_checkpoint_the_disk_refuses_keeps_the_previous_one_and_leaves_no_partial_file(tmp_path):
    """A full disk during a save: OSError naming the file and the free space, the previous last.pt intact (it loads),
    and no partial last.pt.tmp left taking the space the next save or results.csv needs."""
    model = build_model("yolov12n.yaml", names=["a", "b"])
    last = save_checkpoint(tmp_path / "last.pt", model, imgsz=64, epoch=0)
    good = last.read_bytes()
    with file_size_limit(64 * 1024), pytest.raises(OSError) as e:
        save_checkpoint(last, model, imgsz=64, epoch=1)
    assert f"cannot save {last}" in str(e.value) and "free there" in str(e.value)
    assert "the previous one is kept" in str(e.value)
    assert last.read_bytes() == good and load_checkpoint(last).raw["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_stop_signal_during_a_save_waits_for_the_checkpoint(tmp_path, monkeypatch):
    """SIGTERM (a scheduler's stop) arriving while torch.save writes: its handler raised inside torch's writes, the
    file was torn and the run ended as if the disk were full (exit 2, not 143). Now the stop waits for the
    save: last.pt complete and loadable, nothing left over, then the stop as the handler raises it."""
    import signal

    class StopError(Exception):
        pass

    def stop(signum, frame):
        raise StopError

    real = torch.save

    def save_as_the_signal_comes(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered while the checkpoint is being written
        return real(obj, f, *args, **kwargs)

    model = build_model("yolov12n.yaml", names=["a", "b"])
    monkeypatch.setattr(torch, "save", save_as_the_signal_comes)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(StopError):
            save_checkpoint(tmp_path / "last.pt", model, imgsz=64, epoch=3)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert load_checkpoint(tmp_path / "last.pt").raw["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_save_torch_refuses_says_so_without_an_errno(tmp_path, monkeypatch):
    """torch reports a full disk as a RuntimeError, which has no errno: the line starts with what failed."""
    model = build_model("yolov12n.yaml", names=["a", "b"])

    def refuse(obj, f, *args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path / "last.pt", model, imgsz=64, epoch=0)
    assert str(e.value).startswith(f"cannot save {tmp_path / 'last.pt'} ("), str(e.value)
    assert "file write failed; nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []
