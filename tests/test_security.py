"""Security without a server: URL masking, credentials from the environment and files, the camera host policy,
token files and the CLI's one-line refusals of bad security flags (issue 24). The server-level tests (TLS, mTLS,
tokens per RPC, nothing leaking from a camera that fails) are in test_security_server.py."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from certs import HAVE_OPENSSL, make_ca, make_cert
from test_server_harness import NO_TORCH, ROOT

from yolov12_serve.allowlist import CameraPolicy, HostRefusedError
from yolov12_serve.auth import TokenTable, bearer_token, required_role
from yolov12_serve.config import load_streams_file, redact_url, url_kind
from yolov12_serve.errors import ConfigError, InvalidArgumentError, PermissionDeniedError
from yolov12_serve.security import RedactingFilter
from yolov12_serve.urls import expand_credentials, redact_text

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("url,masked", [
    ("rtsp://admin:hunter2@10.0.0.5:554/stream1", "rtsp://admin:***@10.0.0.5:554/stream1"),
    ("rtsp://10.0.0.5/s?token=abc123&channel=1", "rtsp://10.0.0.5/s?token=***&channel=1"),
    ("rtsps://cam/s?user=a&password=pw&sig=zz&Api_Key=k", "rtsps://cam/s?user=a&password=***&sig=***&Api_Key=***"),
    ("rtsp://u:p@[fe80::1%25eth0]:8554/live?X-Amz-Signature=f00",
     "rtsp://u:***@[fe80::1%25eth0]:8554/live?X-Amz-Signature=***"),
    ("rtsp://u:pw@[2001:db8::7]/x", "rtsp://u:***@[2001:db8::7]/x"),  # IPv6 hosts stay as written
    ("rtsp://[2001:db8::7]:554/x", "rtsp://[2001:db8::7]:554/x"),
    ("rtsp://u:p@ss:w@rd@host/x", "rtsp://u:***@host/x"),  # '@' in the password: the last one ends user-info
    ("rtsp://u:pw@[::1/broken", "rtsp://u:***@[::1/broken"),  # malformed for urllib: masked all the same
    ("rtsp://onlyuser@host/x", "rtsp://onlyuser@host/x"),
    # a raw # / ? in a password ends the host for every parser: masked up to the last '@' all the same
    ("rtsp://admin:1234#s3cret@10.0.0.5/s1", "rtsp://admin:***@10.0.0.5/s1"),
    ("rtsp://admin:99/s3cret@10.0.0.5/s1?ch=1", "rtsp://admin:***@10.0.0.5/s1?ch=1"),
    ("rtsp://admin:ab?s3cret@10.0.0.5/a", "rtsp://admin:***@10.0.0.5/a"),
    ("rtsp://10.0.0.5/live@main", "rtsp://10.0.0.5/live@main"),  # no password possible: as written
    # ';name=value' parameters (some cameras take credentials so), in the path and the query
    ("rtsp://10.0.0.5/media.amp;user=op;password=s3cret?x=1;pwd=s3cret",
     "rtsp://10.0.0.5/media.amp;user=op;password=***?x=1;pwd=***"),
    ("https://h/cb#access_token=t0k&state=1", "https://h/cb#access_token=***&state=1"),
    ("synthetic://belt?fps=5&size=640x360", "synthetic://belt?fps=5&size=640x360"),
    ("/videos/line1.mp4", "/videos/line1.mp4"),
    ("", ""),
])
def test_redact_url_masks_secrets_and_keeps_the_rest_as_written(url, masked):
    assert redact_url(url) == masked


@pytest.mark.parametrize("url", ["rtsp://admin:1234#s3cret@10.0.0.5/s1", "rtsp://admin:99/s3cret@10.0.0.5/s1",
                                 "rtsp://admin:ab?s3cret@10.0.0.5/a"])
def test_a_password_with_a_raw_hash_slash_or_question_mark_is_refused_masked(url):
    """Accepted, the host read was 'admin' and the password was shown in ListStreams, the log and the saved
    camera list; refused, the message says how to write it and shows no password."""
    with pytest.raises(InvalidArgumentError, match=r"an '@' after the host: write a / \? # or @ in a password "
                                                   r"as %2F %3F %23 %40") as e:
        url_kind(url)
    assert "s3cret" not in str(e.value) and "admin:***@10.0.0.5" in str(e.value)
    assert url_kind(url.replace("#", "%23").replace("99/", "99%2F").replace("?", "%3F")) == "rtsp"


def test_redact_text_masks_every_url_in_an_error_message():
    ffmpeg = "[Errno 111] Connection refused: 'rtsp://user:s3cret@127.0.0.1:9/x?token=t0k'"
    assert redact_text(ffmpeg) == "[Errno 111] Connection refused: 'rtsp://user:***@127.0.0.1:9/x?token=***'"
    two = 'from "rtsp://a:b@h1/x" to <rtsps://c:d@[::1]:1/y?key=e> done'
    assert redact_text(two) == 'from "rtsp://a:***@h1/x" to <rtsps://c:***@[::1]:1/y?key=***> done'
    assert redact_text("no url here: a:b@c") == "no url here: a:b@c"


def test_log_records_are_masked_whoever_logs_them(caplog):
    logger = logging.getLogger("test.redaction")
    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("opening %s failed", "rtsp://op:pa55word@10.1.2.3/x")
        try:
            raise ConnectionError("rtsp://op:pa55word@10.1.2.3/x refused")
        except ConnectionError:
            logger.exception("camera gone")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "pa55word" not in text
    assert "rtsp://op:***@10.1.2.3/x" in text and "Traceback" in text


# ------------------------------------------------------------------------------------------------ credentials
def test_credentials_come_from_the_environment_percent_encoded_in_user_info():
    env = {"CAM_USER": "op", "CAM_PASS": "p@ss:w/rd", "CAM_HOST": "10.0.0.5"}
    url = expand_credentials("rtsp://${CAM_USER}:${CAM_PASS}@${CAM_HOST}:554/s1", "stream a", env=env)
    assert url == "rtsp://op:p%40ss%3Aw%2Frd@10.0.0.5:554/s1"
    assert redact_url(url) == "rtsp://op:***@10.0.0.5:554/s1"
    with pytest.raises(ConfigError, match=r"stream a: environment variable CAM_PASS is not set"):
        expand_credentials("rtsp://op:${CAM_PASS}@h/s", "stream a", env={})


def test_a_camera_list_without_secrets(tmp_path, monkeypatch):
    """cameras.yaml names the secrets; the passwords live in the environment and in a secrets file."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cam2").write_text("viewer:s3cr3t!\n")
    cameras = tmp_path / "cameras.yaml"
    cameras.write_text("streams:\n"
                       "  - {id: cam1, url: 'rtsp://${CAM_USER}:${CAM_PASS}@10.0.0.5/s1'}\n"
                       "  - {id: cam2, url: 'rtsp://10.0.0.6/s1', credentials: secrets/cam2}\n")
    monkeypatch.setenv("CAM_USER", "admin")
    monkeypatch.setenv("CAM_PASS", "hunter2")
    specs = load_streams_file(cameras)
    assert [s.url for s in specs] == ["rtsp://admin:hunter2@10.0.0.5/s1", "rtsp://viewer:s3cr3t%21@10.0.0.6/s1"]
    assert "hunter2" not in cameras.read_text() and "s3cr3t" not in cameras.read_text()
    monkeypatch.delenv("CAM_PASS")
    with pytest.raises(ConfigError, match=r"entry 1 \(cam1\): environment variable CAM_PASS is not set"):
        load_streams_file(cameras)
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams:\n  - {id: x, url: 'rtsp://u:leaked@h/s', colour: red}\n  - 'rtsp://u:leaked@h/t'\n")
    with pytest.raises(ConfigError) as e:
        load_streams_file(bad)
    assert "colour" in str(e.value)
    bad.write_text("streams:\n  - ['rtsp://u:leaked@h/t']\n")
    with pytest.raises(ConfigError) as e:
        load_streams_file(bad)
    assert "leaked" not in str(e.value) and "rtsp://u:***@h/t" in str(e.value)


def test_source_urls_take_variables_and_a_missing_one_is_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", NO_TORCH + "from yolov12_serve.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", "--engines", "x.onnx", "--gpus", "cpu", "--source",
                          "rtsp://op:${NOT_SET_ANYWHERE}@10.0.0.5/s"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "yolov12-serve: error: --source cam0: environment variable NOT_SET_ANYWHERE is not set "
        "(its url uses ${NOT_SET_ANYWHERE})"]


# ------------------------------------------------------------------------------------------------ camera hosts
def resolver(table: dict[str, list[str]]):
    """Name resolution from a table (names missing from it do not resolve), standing in for DNS."""

    def resolve(host: str) -> list[str]:
        if host not in table:
            raise OSError(f"{host}: name does not resolve")
        return table[host]

    return resolve


@pytest.mark.parametrize("url", [
    "rtsp://169.254.169.254/latest/meta-data", "rtsp://2852039166/x", "rtsp://0xa9fea9fe/x",
    "rtsp://169.254.43518/x", "rtsp://[::ffff:169.254.169.254]/x", "rtsp://[fd00:ec2::254]/x",
    "rtsp://169.254.10.20/x", "rtsp://[fe80::1%25eth0]:554/x", "rtsp://0.0.0.0/x", "rtsp://metadata.google.internal/x",
    "rtsp://METADATA.google.internal./x", "rtsp://rebound.example/x",
])
def test_default_policy_refuses_link_local_and_metadata_hosts(url):
    policy = CameraPolicy(resolve=resolver({"rebound.example": ["10.0.0.9", "169.254.169.254"]}))
    with pytest.raises(PermissionDeniedError):
        policy.check(url, url_kind(url))


@pytest.mark.parametrize("url", ["rtsp://10.0.0.5/s", "rtsp://127.0.0.1:8554/cam", "rtsp://[2001:db8::5]/s",
                                 "rtsps://cam1.plant/s", "rtsp://offline.plant/s"])
def test_default_policy_accepts_ordinary_hosts(url):
    CameraPolicy(resolve=resolver({"cam1.plant": ["10.0.0.7"]})).check(url, url_kind(url))


def test_allow_hosts_networks_names_and_wildcards():
    policy = CameraPolicy(["10.1.0.0/16", "cam-a.plant", "*.line1.plant", "169.254.7.7"],
                          resolve=resolver({"cam-a.plant": ["192.168.9.9"], "x.line1.plant": ["172.16.0.1"],
                                            "other.plant": ["10.1.2.3"], "far.plant": ["10.2.0.1"],
                                            "line1.plant": ["10.9.9.9"]}))
    for ok in ("rtsp://10.1.200.3/s", "rtsp://cam-a.plant/s", "rtsp://x.line1.plant/s", "rtsp://other.plant/s",
               "rtsp://169.254.7.7/s"):
        policy.check(ok, "rtsp")
    for refused in ("rtsp://10.2.0.1/s", "rtsp://far.plant/s", "rtsp://127.0.0.1/s", "rtsp://169.254.169.254/s",
                    "rtsp://line1.plant/s"):
        with pytest.raises(PermissionDeniedError, match=r"not in --allow-hosts|metadata"):
            policy.check(refused, "rtsp")
    policy.check("rtsp://offline.plant/s", "rtsp")  # does not resolve now: accepted, checked at every connection
    with pytest.raises(OSError, match=r"cannot resolve camera host offline\.plant"):
        policy.pin("rtsp://offline.plant/s")
    names_only = CameraPolicy(["*.line1.plant"], resolve=resolver({}))
    with pytest.raises(PermissionDeniedError, match="not in --allow-hosts"):
        names_only.check("rtsp://elsewhere.plant/s", "rtsp")  # refused without asking DNS
    with pytest.raises(ConfigError, match="neither a network"):
        CameraPolicy(["10.0.0.0/33"])
    with pytest.raises(ConfigError, match="neither a network"):
        CameraPolicy(["cam one"])


def test_schemes_synthetic_and_files_are_off_unless_allowed():
    with pytest.raises(InvalidArgumentError, match="--allow-synthetic"):
        CameraPolicy().check("synthetic://belt", "synthetic")
    CameraPolicy(allow_synthetic=True).check("synthetic://belt", "synthetic")
    with pytest.raises(InvalidArgumentError, match="--allow-files"):
        url_kind("/etc/passwd")
    for bad in ("rtsp://[::1/x", "rtsp://h:99999/x", "rtsp://h\x00/x", "rtsp://h\x7f/x", "gopher://h/x",
                "rtsp://ho st/x", "rtsp://\uff0e\uff0e/x"):
        with pytest.raises(InvalidArgumentError):
            url_kind(bad)


def test_every_connection_checks_the_host_again_and_pins_its_address():
    """DNS rebinding: the name passes the check, then points at the metadata service: the connection is refused
    (retried like a refusal), and a passing connection goes to the address that was checked, not the name."""
    answers = {"cam.plant": ["10.0.0.8"]}
    policy = CameraPolicy(resolve=lambda host: answers[host])
    policy.check("rtsp://u:p@cam.plant:8554/s?x=1", "rtsp")
    assert policy.pin("rtsp://u:p@cam.plant:8554/s?x=1") == "rtsp://u:p@10.0.0.8:8554/s?x=1"
    answers["cam.plant"] = ["169.254.169.254"]
    with pytest.raises(HostRefusedError, match="metadata"):
        policy.pin("rtsp://u:p@cam.plant:8554/s")
    answers["cam.plant"] = ["2001:db8::8"]
    assert policy.pin("rtsp://cam.plant/s") == "rtsp://[2001:db8::8]/s"
    assert policy.pin("rtsp://10.0.0.9/s") == "rtsp://10.0.0.9/s"


# ------------------------------------------------------------------------------------------------ tokens
def test_token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# tokens\n\n" + "a" * 20 + " operator\n" + "b" * 20 + "   viewer   # dashboards\n")
    table = TokenTable.load(path)
    assert table.role_of("a" * 20) == "operator" and table.role_of("b" * 20) == "viewer"
    assert table.role_of("a" * 19) is None and table.role_of("") is None
    assert table.counts() == {"viewer": 1, "operator": 1}
    for text, error in [("c" * 20 + " admin\n", "unknown role 'admin'"), ("short viewer\n", "at least 16"),
                        ("c" * 20 + "\n", "expected 'TOKEN ROLE'"), ("# nothing\n", "holds no token"),
                        ("c" * 20 + " viewer\n" + "c" * 20 + " operator\n", "line 2: this token is already listed")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=error) as e:
            TokenTable.load(path)
        assert "c" * 20 not in str(e.value)  # never the token itself
    with pytest.raises(ConfigError, match="cannot read --auth-token-file"):
        TokenTable.load(tmp_path / "missing")


def test_role_table_and_bearer_metadata():
    assert required_role("/yolov12.v1.Detector/ListStreams") == "viewer"
    assert required_role("/yolov12.v1.Detector/WatchDetectionBatches") == "viewer"
    assert required_role("/yolov12.v1.Detector/AddStream") == "operator"
    assert required_role("/yolov12.v1.Detector/ReloadEngines") == "operator"
    assert required_role("/yolov12.v1.Detector/SomethingNew") == "operator"  # closed until someone decides
    assert required_role("/grpc.health.v1.Health/Check") == ""
    assert bearer_token([("x", "1"), ("authorization", "Bearer  t0k ")]) == "t0k"
    assert bearer_token([("authorization", "Basic dTpw")]) is None and bearer_token(None) is None


# ------------------------------------------------------------------------------------------------ CLI refusals
def serve_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`yolov12-serve ARGS` that must exit before loading an engine (the engine path does not exist)."""
    return subprocess.run([sys.executable, "-c", NO_TORCH + "from yolov12_serve.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "--engines", "missing.onnx", "--gpus", "cpu",
                           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not HAVE_OPENSSL:
        pytest.skip("the openssl command is not installed (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    return folder, ca, make_cert(folder, ca, "server", dns=["localhost"], ips=["127.0.0.1"]), \
        make_cert(folder, ca, "other", dns=["localhost"])


def test_bad_security_flags_are_one_line_naming_the_file(pki, tmp_path):
    _, ca, server, other = pki
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"  # OpenSSL would ask for its passphrase on the terminal, holding the start
    subprocess.run(["openssl", "pkey", "-in", str(server.key), "-aes256", "-passout", "pass:secret", "-out",
                    str(encrypted)], check=True)
    cases = [
        (["--tls-cert", str(server.cert)], "--tls-cert and --tls-key go together: --tls-key is missing"),
        (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(server.key)],
         f"cannot read --tls-cert {tmp_path / 'nope.crt'}: No such file or directory"),
        (["--tls-cert", str(garbage), "--tls-key", str(server.key)],
         f"--tls-cert {garbage} is not a certificate in PEM format"),
        (["--tls-cert", str(server.cert), "--tls-key", str(other.key)],
         f"--tls-key {other.key} does not belong to --tls-cert {server.cert}"),
        (["--tls-cert", str(server.cert), "--tls-key", str(encrypted)],
         f"--tls-key {encrypted} is encrypted: give it unencrypted"),
        (["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(garbage)],
         f"--tls-client-ca {garbage} is not a certificate in PEM format"),
        (["--tls-client-ca", str(ca.cert)], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--auth-token-file", str(tmp_path / "none")], f"cannot read --auth-token-file {tmp_path / 'none'}"),
        (["--metrics-tls"], "--metrics-tls serves /metrics with the gRPC certificate"),
        (["--allow-hosts", "10.0.0.0/8,not a host"], "--allow-hosts: 'not a host' is neither a network"),
        (["--source", "rtsp://u:pw@169.254.169.254/x"], "stream cam0: camera host 169.254.169.254 is a cloud "
                                                        "metadata address"),
        (["--source", "synthetic://belt"], "stream cam0: synthetic:// demo cameras are off"),
        (["--allow-hosts", "10.0.0.0/8", "--source", "rtsp://127.0.0.1/x"],
         "stream cam0: camera host 127.0.0.1 is not in --allow-hosts (10.0.0.0/8)"),
    ]
    for args, message in cases:
        out = serve_cli(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (args, out.stderr)
        assert lines[0].startswith("yolov12-serve: error: ") and message in lines[0], (args, lines[0])
        assert "pw" not in lines[0].split("error: ", 1)[1].replace("pw@", "")  # the password is not echoed


def test_rates_that_are_not_finite_numbers_are_invalid():
    """A NaN max_fps passed the old '< 0' check and reached placement's arithmetic."""
    from yolov12_serve.config import StreamSpec

    for rate in (float("nan"), float("inf"), -1.0, 1e30, 1e-30):  # 1e-30: one frame in 3e22 years
        with pytest.raises(InvalidArgumentError, match=r"max_fps must be 0 \(every frame\) or 0.001..1000"):
            StreamSpec("cam", "rtsp://10.0.0.5/s", rate)
    for rate in (0.0, 0.001, 12.5, 1000.0):
        assert StreamSpec("cam", "rtsp://10.0.0.5/s", rate).max_fps == rate


def test_a_small_png_of_a_huge_picture_decodes_in_bounded_memory_and_upright(tmp_path):
    """A 155 KB PNG of a 6320x6320 RGBA picture turned by EXIF (under the 40M-pixel limit) took 0.5 GB to decode,
    four at once 1.9 GB: now it is shrunk before it is turned and such pictures are decoded one at a time. The
    pixels are still those of the upright picture, letterboxed."""
    from PIL import Image

    from yolov12_serve.preprocess import InputPlanner, letterbox_image

    rgba = np.zeros((6320, 6320, 4), np.uint8)
    rgba[:3160, :, 0] = 200  # the top half red: upright (turned by EXIF orientation 6), the right half
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "huge.png"
    Image.fromarray(rgba).save(path, exif=exif)
    assert path.stat().st_size < 400_000
    # VmHWM, this process's own peak: ru_maxrss carries the parent's (pytest's) peak over the exec
    peak = "int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1]) // 1024"
    code = (NO_TORCH + "import threading, numpy as np\n"
            "from yolov12_serve.sources.push import decode_frame\n"
            "from yolov12_serve.preprocess import InputPlanner\n"
            f"data = open({str(path)!r}, 'rb').read(); plan = InputPlanner((320, 320), 32, True).plan\n"
            "x, lb = decode_frame(data, 2, 0, 0, plan)\n"
            f"one = {peak}\n"
            "ts = [threading.Thread(target=decode_frame, args=(data, 2, 0, 0, plan)) for _ in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "np.save('out.npy', x)\n"
            f"print(one, {peak})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    one, four = map(int, out.stdout.split())
    assert one < 450 and four < 600, f"peak {one} MB for one decode, {four} MB with four at once (was 513, 1901)"
    x = np.load(tmp_path / "out.npy")
    upright = Image.fromarray(np.rot90(rgba[..., :3], k=-1).copy())  # orientation 6: turned 90 degrees clockwise
    lb = InputPlanner((320, 320), 32, True).plan((6320, 6320))
    assert np.abs(x.astype(int) - letterbox_image(upright, lb).astype(int)).max() <= 1

