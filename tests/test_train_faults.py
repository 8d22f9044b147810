"""Faults in real two-process gloo jobs: out of memory on one rank (in a step or in validation), a validation longer
than --dist-timeout, a rank that fails; two torchrun "machines" on loopback whose second cannot start or has other data.

Out of memory on one rank: every rank discards the step, halves, replays, in step.

An out-of-memory error is raised on one rank inside a middle layer (layer 5, a plain convolution of the
backbone, so BatchNorm layers run before and after it), in its forward or in its backward, at the first, a
middle or the last of three micro-batches (each of the six once), with plain and with cross-rank BatchNorm in
turn (and once with gradient checkpointing, once on both ranks). The run must go on (no hang, no error), every
rank must end with bitwise-identical weights and statistics, and the step must equal a clean step at the
halved micro-batch (BatchNorm in train mode: a failed attempt's statistics updates must have been rolled
back).
"""

from __future__ import annotations

import copy
import itertools
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import no_augment

from trainer.config import TrainConfig
from trainer.distributed import DistContext, init_process, launch
from trainer.engine import Trainer
from trainer.hooks import HookBase

pytestmark = pytest.mark.slow

FAULT_LAYER = 5  # backbone: Conv at P4/16 (not a checkpointed block, so its hooks run once per forward)
PER_RANK, MICRO = 6, 2  # three micro-batches per rank: first, middle, last
DEMO_CKPT = Path(__file__).resolve().parent / "assets" / "yolov12n-defects.pt"


class InjectedOOM:
    """Raises torch.OutOfMemoryError once, in the forward or the backward of one layer, at micro-batch `at`."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.armed: tuple[str, int] | None = None
        self.calls = 0
        self.fired = 0
        layer.register_forward_hook(self._forward)

    def arm(self, phase: str, at: int) -> None:
        self.armed, self.calls = (phase, at), 0

    def _raise(self, *_: object) -> None:
        self.armed = None
        self.fired += 1
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    def _forward(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        if self.armed is None:
            return
        phase, at = self.armed
        k, self.calls = self.calls, self.calls + 1
        if k != at:
            return
        if phase == "forward":
            self._raise()
        output.register_hook(self._raise)  # fires mid-backward, when this layer's output gradient is computed


def _cases() -> list[tuple[str, bool, bool, str, tuple[int, ...]]]:
    """(name, sync_bn, checkpointing, phase, failing micro-batch per rank; -1 = this rank does not fail)."""
    out = []  # every (phase, micro-batch) once and every (BatchNorm, phase) at least once: six, not all twelve
    for (phase, at), sync_bn in zip(itertools.product(("forward", "backward"), range(PER_RANK // MICRO)),
                                    (False, True, False, True, False, True)):
        out.append((f"{'syncbn' if sync_bn else 'bn'}-{phase}-{('first', 'middle', 'last')[at]}", sync_bn, False,
                    phase, (-1, at)))
    out.append(("syncbn-ckpt-backward-middle", True, True, "backward", (-1, 1)))
    out.append(("syncbn-both-ranks-forward", True, False, "forward", (2, 0)))
    return out


def _fault_rank(cfg_base: dict, init: str, out_dir: str) -> None:
    """In each launched process: every case's step with its fault, and once per set-up the clean step at the
    halved micro-batch (the same start, the same batch)."""
    from trainer.checkpoint import load_checkpoint

    ctx = init_process(["cpu"], 120)
    results: dict[str, object] = {}
    setups: dict[tuple[bool, bool], tuple[Trainer, InjectedOOM, dict, dict]] = {}

    def step(t: Trainer, start: dict, batch: dict, micro: int) -> dict[str, torch.Tensor]:
        t.model.load_state_dict(start)
        t.optimizer.state.clear()
        t.micro_batch = micro
        t.run_step(batch)
        return {k: v.clone() for k, v in t.model.state_dict().items()}

    for name, sync_bn, ckpt, phase, fail_at in _cases():
        if (sync_bn, ckpt) not in setups:
            cfg = TrainConfig(**{**cfg_base, "sync_bn": sync_bn, "grad_checkpointing": "on" if ckpt else "off"})
            t = Trainer(cfg, load_checkpoint(init).model, ctx, Path(out_dir))
            start, batch = copy.deepcopy(t.model.state_dict()), next(iter(t.train_loader))
            setups[sync_bn, ckpt] = (t, InjectedOOM(t.model.model[FAULT_LAYER]), start, batch)
            results[f"clean:{sync_bn}:{ckpt}"] = step(t, start, batch, MICRO // 2)
        t, fault, start, batch = setups[sync_bn, ckpt]
        if fail_at[ctx.rank] >= 0:
            fault.arm(phase, fail_at[ctx.rank])
        results[name] = step(t, start, batch, MICRO)
        results[name + ":micro_after"] = t.micro_batch
        results[name + ":fired"] = fault.fired
        fault.fired, fault.armed = 0, None
    torch.save(results, Path(out_dir) / f"faults-rank{ctx.rank}.pt")
    torch.distributed.destroy_process_group()


def test_an_oom_on_one_rank_is_agreed_discarded_and_replayed_by_every_rank(tmp_path: Path,
                                                                           tiny_data: Path) -> None:
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init.pt", build_model("yolov12n.yaml", names=["a", "b", "c", "d", "e"]))
    cfg = TrainConfig.from_kwargs(data=str(tiny_data), imgsz=96, batch=2 * PER_RANK, workers=0, optimizer="SGD",
                                  lr0=0.01, ema=False, verbose=False, plots=False, warmup_epochs=0.0, clip_grad=0.0,
                                  micro_batch=MICRO, dist_timeout=60.0, nbs=2 * PER_RANK, **no_augment())
    launch(_fault_rank, 2, cfg.to_dict(), str(init), str(tmp_path))
    ranks = [torch.load(tmp_path / f"faults-rank{r}.pt") for r in (0, 1)]
    start = torch.load(init)["model"]
    for name, sync_bn, ckpt, _, fail_at in _cases():
        for r in (0, 1):
            assert ranks[r][name + ":fired"] == int(fail_at[r] >= 0), (name, r)  # the fault did fire
            assert ranks[r][name + ":micro_after"] == MICRO // 2, (name, r)  # every rank halved
        faulty, clean = ranks[0][name], ranks[0][f"clean:{sync_bn}:{ckpt}"]
        for k in faulty:
            assert torch.equal(faulty[k], ranks[1][name][k]), f"{name}: ranks differ at {k}"
            torch.testing.assert_close(faulty[k], clean[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        moved = max((faulty[k] - start[k]).abs().max().item() for k in start if faulty[k].is_floating_point())
        assert moved > 1e-4, name  # the replayed step did step


def test_an_oom_in_a_later_batch_of_an_accumulated_step_replays_the_whole_step(tmp_path: Path,
                                                                              tiny_data: Path) -> None:
    """--batch 4 with --nbs 8 in micro-batches of 2: out of memory in the backward of the step's second batch undoes
    the step and replays both of its batches at micro-batch 1. The update equals a clean step at micro-batch 1 (the
    first batch's gradient neither lost nor counted twice; BatchNorm in train mode, its statistics rolled back)."""
    from trainer.checkpoint import load_checkpoint
    from trainer.engine import _slice_batch

    cfg = TrainConfig.from_kwargs(data=str(tiny_data), imgsz=96, batch=4, nbs=8, micro_batch=2, workers=0,
                                  optimizer="SGD", lr0=0.01, ema=False, verbose=False, plots=False, warmup_epochs=0.0,
                                  clip_grad=0.0, **no_augment())
    clean = Trainer(cfg, load_checkpoint(DEMO_CKPT).model, DistContext(), tmp_path)
    start = copy.deepcopy(clean.model.state_dict())
    eight = next(iter(Trainer(TrainConfig(**{**cfg.to_dict(), "batch": 8}), load_checkpoint(DEMO_CKPT).model,
                              DistContext(), tmp_path).train_loader))
    first, second = _slice_batch(eight, 0, 4), _slice_batch(eight, 4, 8)
    clean.micro_batch = 1
    clean.run_step(first)
    assert clean.run_step(second)["stepped"]

    faulty = Trainer(cfg, load_checkpoint(DEMO_CKPT).model, DistContext(), tmp_path)
    fault = InjectedOOM(faulty.model.model[FAULT_LAYER])
    assert not faulty.run_step(first)["stepped"]
    fault.arm("backward", 1)
    assert faulty.run_step(second)["stepped"]
    assert fault.fired == 1 and faulty.micro_batch == 1
    for k, v in faulty.model.state_dict().items():
        torch.testing.assert_close(v, clean.model.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max((v - start[k]).abs().max().item() for k, v in faulty.model.state_dict().items()
               if v.is_floating_point()) > 1e-4


def _slow_validation_rank(cfg_dict: dict, init: str, out_dir: str, validation_s: float) -> None:
    """The main process's validation outlasts --dist-timeout while the other rank waits for it at the epoch's end."""
    from trainer.checkpoint import load_checkpoint

    ctx = init_process(["cpu"], cfg_dict["dist_timeout"])
    t = Trainer(TrainConfig(**cfg_dict), load_checkpoint(init).model, ctx, Path(out_dir))
    if ctx.is_main:
        base = type(t.validator)

        def slow(self, model: torch.nn.Module) -> dict:
            time.sleep(validation_s)  # a val split that takes longer than --dist-timeout
            return base.__call__(self, model)

        t.validator.__class__ = type("SlowValidator", (base,), {"__call__": slow})
    metrics = t.train()
    torch.save(sorted(metrics), Path(out_dir) / f"slow-val-rank{ctx.rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_validation_longer_than_the_dist_timeout_does_not_end_the_run(tmp_path: Path, tiny_data: Path) -> None:
    """--dist-timeout is there to catch dead ranks, not to cap how long the main process may validate and save:
    the waiting rank timed out ("rank 1 failed: ... Timed out waiting 15000ms") and the epoch was lost."""
    from trainer.checkpoint import save_checkpoint
    from trainer.nn import build_model

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init.pt", build_model("yolov12n.yaml", names=["a", "b", "c", "d", "e"]))
    cfg = TrainConfig.from_kwargs(data=str(tiny_data), imgsz=64, batch=4, epochs=1, workers=0, optimizer="SGD",
                                  ema=False, verbose=False, plots=False, dist_timeout=8.0, **no_augment())
    launch(_slow_validation_rank, 2, cfg.to_dict(), str(init), str(tmp_path), 12.0)
    assert "mAP50-95" in torch.load(tmp_path / "slow-val-rank0.pt")
    assert (tmp_path / "slow-val-rank1.pt").exists() and (tmp_path / "weights" / "last.pt").exists()


def _failing_rank() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one broke")


def test_a_failed_rank_is_one_line_not_the_launchers_log(capfd: pytest.CaptureFixture[str]) -> None:
    """The launcher logged the failed rank's traceback line by line (some 25 'E1207 ... api.py:836]' lines) and
    a line per rank it stopped, before our one line said the same."""
    with pytest.raises(RuntimeError, match="training process rank 1 failed: ValueError: rank one broke"):
        launch(_failing_rank, 2)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "api.py" not in err and "Terminating process" not in err, err


class _ArmBeforeValidation(HookBase):
    """Arms an `InjectedOOM` on the layer after the epoch's last step: it fires in validation's first forward."""

    def before_train(self) -> None:
        self.fault = InjectedOOM(self.trainer.model.model[FAULT_LAYER])

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % t.iters_per_epoch == 0:
            self.fault.arm("forward", 0)


def test_an_oom_in_validation_is_survived_by_halving_the_forward_chunk(tiny_data: Path, tmp_path: Path) -> None:
    """Validation after an epoch forwards at most one training micro-batch at once; an out-of-memory error there
    (injected in its first forward) halves that chunk and validates on, with the metrics of a validation without it."""
    from trainer.checkpoint import load_checkpoint
    from trainer.distributed import DistContext
    from trainer.validate import Validator

    cfg = TrainConfig.from_kwargs(data=str(tiny_data), imgsz=96, batch=8, epochs=1, workers=0, micro_batch=4,
                                  ema=False, verbose=False, plots=False, optimizer="SGD", lr0=0.01, **no_augment())
    arm = _ArmBeforeValidation()
    t = Trainer(cfg, load_checkpoint(DEMO_CKPT).model, DistContext(), tmp_path, hooks=[arm])
    t.train()
    assert arm.fault.fired == 1 and t.validator.chunk == 2  # the micro-batch 4, halved once
    arm.fault.armed = None
    clean = Validator(t.validator.dataloader, t.data.names, "cpu", progress=False)(t.model)  # the whole batch at once
    for k in ("mAP50-95", "mAP50", "precision", "recall", "images"):
        assert t.metrics[k] == pytest.approx(clean[k], abs=1e-6), k
    assert t.metrics["mAP50-95"] > 0.01 and (tmp_path / "weights" / "best.pt").is_file()


class _ValidationAlwaysOOM(HookBase):
    def before_train(self) -> None:
        def no_memory(*_: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

        self.trainer.validator._forward = no_memory


def test_a_validation_that_fails_leaves_the_trained_epoch_in_last_pt(tiny_data: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Out of memory in validation even at 1 image ends the run with that error, but only after last.pt of the
    epoch just trained is saved (validation runs before the checkpoint hook): the epoch is not lost."""
    from trainer import YOLO
    from trainer.checkpoint import load_checkpoint

    with pytest.raises(torch.OutOfMemoryError, match="validation ran out of memory even at 1 image per forward"):
        YOLO(str(DEMO_CKPT)).train(data=str(tiny_data), imgsz=96, batch=8, epochs=3, workers=0, micro_batch=4,
                                   verbose=False, plots=False, optimizer="SGD", lr0=0.01, project=str(tmp_path),
                                   name="run", hooks=[_ValidationAlwaysOOM()], **no_augment())
    last = tmp_path / "run" / "weights" / "last.pt"
    raw = torch.load(last, weights_only=True)
    assert raw["epoch"] == 0 and raw["iteration"] == 2  # epoch 1's two steps
    start = load_checkpoint(DEMO_CKPT).model.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in raw["train_model"].items() if v.is_floating_point())
    err = capsys.readouterr().err
    assert f"validation of epoch 1 failed; the epoch's weights are saved in {last} (resume with --resume)" in err
    assert not (last.parent / "best.pt").exists()  # unvalidated weights are not passed off as the best


def _node_copy(tiny_data: Path, node: Path, drop: int = 0) -> None:
    """The dataset on one "machine": its own copy under node/data, data.yaml without an absolute `path` (the root
    is the yaml's folder), `drop` train images (and their labels) left out."""
    import shutil

    src = tiny_data.parent if tiny_data.is_file() else tiny_data
    shutil.copytree(src, node / "data", ignore=shutil.ignore_patterns("*.cache"))
    yaml = node / "data" / "data.yaml"
    yaml.write_text("".join(ln for ln in yaml.read_text().splitlines(keepends=True) if not ln.startswith("path:")))
    for image in sorted((node / "data" / "images" / "train").iterdir())[:drop]:
        image.unlink()
        (node / "data" / "labels" / "train" / f"{image.stem}.txt").unlink(missing_ok=True)


def _two_torchrun_nodes(nodes: list[Path], *args: str, timeout: float = 240) -> list[tuple[int, str]]:
    """`torchrun --nnodes 2 --nproc-per-node 1` twice on loopback, each "machine" in its own folder (nothing shared
    but the rendezvous), running `yolov12-train ARGS`: the static form the Kubeflow PyTorchJob uses (node 0 hosts
    the store). Each node's (exit status, stderr)."""
    import contextlib
    import signal
    import subprocess
    import sys

    from trainer.distributed import _free_port

    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "trainer.cli", *args], cwd=node, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank, node in enumerate(nodes)]
    try:
        return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=timeout)]]
    finally:
        for p in procs:  # each launcher with the training process it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("node1", ["no-dataset", "other-dataset"])
def test_a_node_whose_dataset_is_missing_or_differs_ends_both_nodes_at_once(node1: str, tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    """Two real torchrun "machines" on loopback, each with its own disk. Node 1's dataset is missing (it stops
    before joining the others), or holds other images (the ranks would run different numbers of steps): both
    nodes end at once with one line naming the cause, not after --dist-timeout (600 s here) with a gloo timeout;
    node 1, not rank 0, leaves nothing in its project folder."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    _node_copy(tiny_data, nodes[0])
    if node1 == "no-dataset":
        nodes[1].mkdir()
    else:
        _node_copy(tiny_data, nodes[1], drop=8)
    t0 = time.monotonic()
    (rc0, err0), (rc1, err1) = _two_torchrun_nodes(nodes, "--data", "data/data.yaml", "--imgsz", "64", "--batch",
                                                   "4", "--epochs", "1", "--workers", "0", "--device", "cpu",
                                                   "--dist-timeout", "600", "--project", "runs", "--no-plots")
    assert time.monotonic() - t0 < 240  # far below --dist-timeout (600 s), which is what a wait would take
    lines = [[ln for ln in err.splitlines() if ln.startswith("yolov12-train: error:")] for err in (err0, err1)]
    assert rc0 and rc1, (err0[-2000:], err1[-2000:])
    if node1 == "no-dataset":
        assert lines[1] == [lines[1][0]] and "data/data.yaml: data.yaml not found" in lines[1][0], err1[-2000:]
        assert lines[0] == [f"yolov12-train: error: rank 1 (host {socket.gethostname()}) could not start: "
                            f"{lines[1][0].removeprefix('yolov12-train: error: ')}"], err0[-2000:]
    else:
        for got in lines:
            assert len(got) == 1 and got[0].startswith("yolov12-train: error: the train split differs between the "
                                                       "processes (rank 0: 16 images"), (err0[-2000:], err1[-2000:])
            assert "rank 1: 8 images" in got[0] and "every node needs the same dataset at the same path" in got[0]
    assert not (nodes[1] / "runs").exists()


class _StopAfterFirstEpoch(HookBase):
    def after_epoch(self) -> None:
        from trainer.hooks import StopTraining

        raise StopTraining


def test_nodes_that_would_start_at_different_epochs_stop_at_once(tiny_data: Path, tmp_path: Path) -> None:
    """`--resume auto` where node 0's project folder holds a last.pt after epoch 1 and node 1's holds nothing (the
    project not on a shared file system): node 0 would resume at epoch 2 and node 1 start at epoch 1, a different
    number of steps each. Both nodes stop with one line saying the project folder must be shared."""
    from trainer import YOLO

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        _node_copy(tiny_data, node)
    YOLO("yolov12n.yaml").train(data=str(nodes[0] / "data" / "data.yaml"), imgsz=64, batch=4, epochs=2, workers=0,
                                device="cpu", project=str(nodes[0] / "runs"), name="job", plots=False, val=False,
                                verbose=False, hooks=[_StopAfterFirstEpoch()])
    assert (nodes[0] / "runs" / "job" / "weights" / "last.pt").is_file()
    (rc0, err0), (rc1, err1) = _two_torchrun_nodes(nodes, "--data", "data/data.yaml", "--imgsz", "64", "--batch",
                                                   "4", "--epochs", "2", "--workers", "0", "--device", "cpu",
                                                   "--dist-timeout", "600", "--project", "runs", "--name", "job",
                                                   "--no-plots", "--no-val", "--resume", "auto")
    for rc, err in ((rc0, err0), (rc1, err1)):
        lines = [ln for ln in err.splitlines() if ln.startswith("yolov12-train: error:")]
        assert rc and lines == ["yolov12-train: error: the processes would start at different epochs (rank 0: epoch "
                                "2; rank 1: epoch 1): a resume reads the run's last.pt on every node, so the project "
                                "folder (--project) must be on a file system every node mounts"], err[-2000:]


def _one_of_two_ranks(monkeypatch: pytest.MonkeyPatch, port: int, agent_store: bool, restart: int) -> None:
    """This process as rank 1 of 2 under torchrun, the launcher's store at 127.0.0.1:`port`."""
    for key, value in {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "job",
                       "TORCHELASTIC_USE_AGENT_STORE": str(agent_store),
                       "TORCHELASTIC_RESTART_COUNT": str(restart)}.items():
        monkeypatch.setenv(key, value)


def test_start_agreement_is_skipped_where_the_agent_serves_no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (or a rendezvous without a shared store): nobody listens at MASTER_PORT
    until rank 0 joins the group, so waiting there for every rank would end every rank after --dist-timeout."""
    from trainer.distributed import _agree_to_start, _free_port

    _one_of_two_ranks(monkeypatch, _free_port(), agent_store=False, restart=0)
    t0 = time.monotonic()
    _agree_to_start(3.0)
    assert time.monotonic() - t0 < 2.5


def test_start_agreement_is_skipped_on_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart where node A's workers failed (its agent counts restart 1) and node B's agent restarted its healthy
    workers for the new round (its count stays 0): B's ranks find attempt 0's keys done and join the group, so a
    rank of A waiting for every rank under attempt 1's keys would wait --dist-timeout and end the restart."""
    import torch.distributed as dist

    from trainer.distributed import _agree_to_start

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dist.PrefixStore("yolov12-train/start/job/0/", server).add("ready", 2)  # attempt 0: both ranks started
    _one_of_two_ranks(monkeypatch, server.port, agent_store=True, restart=1)
    t0 = time.monotonic()
    _agree_to_start(3.0)
    assert time.monotonic() - t0 < 2.5
