"""--opcua (opcua.py) against the real server and a real asyncua client over a socket: the address space of a tracked
camera, its objects counted and the last one seen by a data-change subscription, cameras removed and added over gRPC,
read-only for clients, the encrypted endpoint (Basic256Sha256 only, clients limited to --opcua-trust), bad flags."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from certs import HAVE_OPENSSL, make_ca, make_cert
from test_server_harness import ServerProcess, model_path, wait_until

try:
    import asyncua
    from asyncua import Client, ua
except ImportError:  # the `opcua` extra (in `test`: scripts/setup test installs it)
    asyncua = None

needs_asyncua = pytest.mark.skipif(asyncua is None, reason='asyncua is not installed: pip install ".[opcua]" (the '
                                   'test extra holds it)')
CAMERA = "synthetic://belt?fps=10&size=320x180"
NS = "urn:yolov12-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(server: ServerProcess, name: str) -> float:
    found = re.findall(rf"^{re.escape(name)} (\S+)$", server.metrics(), flags=re.M)
    return float(found[0]) if found else float("nan")


async def _names(client: Client, ns: int, node_id: str) -> list[str]:
    """The browse names under a node; [] when it is gone."""
    try:
        children = await client.get_node(ua.NodeId(node_id, ns)).get_children()
    except ua.UaStatusCodeError:
        return []
    return sorted([(await c.read_browse_name()).Name for c in children])


async def _poll(what: str, check, timeout: float):
    end = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < end:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s (last: {last!r})")


class Changes:
    """A data-change handler keeping (node id, value) as they come."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def datachange_notification(self, node, val, data) -> None:
        self.seen.append((node.nodeid.Identifier, val))

    def values(self, node_id: str) -> list[object]:
        return [v for n, v in self.seen if n == node_id]


@needs_asyncua
def test_a_tracked_cameras_nodes_objects_and_cameras_coming_and_going():
    """The nodes of a tracked camera appear; a subscription sees LastObject.TrackId and Objects change as objects
    are counted (ObjectsByClass adding up to Objects); no node shows the camera's URL; clients may not write or add
    nodes; a camera removed over gRPC takes its nodes with it, one added brings its own."""
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}"
    server = ServerProcess("--allow-synthetic", "--no-status", "--instances", "1", "--opcua", url)
    try:
        with server.client() as c:
            c.wait_ready(30)
            c.add_stream("line/1", CAMERA, track=True)

            async def run() -> None:
                async with Client(url) as client:
                    ns = await client.get_namespace_index(NS)
                    node = lambda name: client.get_node(ua.NodeId(name, ns))  # noqa: E731
                    await _poll("status serving", lambda: _is(node("Yolov12Serve.Status"), "serving"), 5)  # 0.25 s
                    assert NS in await _unencrypted_session_reads(url)  # what the encrypted test's refusal is of
                    await _poll("the camera's nodes", lambda: _names(client, ns, "Cameras"), 10)
                    assert await _names(client, ns, "Cameras") == ["line/1"]
                    assert await _names(client, ns, "Cameras.line/1") == [
                        "Fps", "LastError", "LastObject", "LatencyP99Ms", "Objects", "ObjectsByClass",
                        "PictureProblem", "Reconnects", "State", "Streaming"]
                    assert await _names(client, ns, "Cameras.line/1.ObjectsByClass") == [
                        "crack", "dent", "missing_part", "scratch", "stain"]  # the model's, there from the start
                    changes = Changes()
                    sub = await client.create_subscription(50, changes)
                    await sub.subscribe_data_change([node("Cameras.line/1.LastObject.TrackId"),
                                                     node("Cameras.line/1.Objects")])
                    await _poll("three objects", lambda: _at_least(node("Cameras.line/1.Objects"), 3), 60)

                    async def notified() -> bool:  # two objects in one publishing interval are one notification
                        return len([v for v in changes.values("Cameras.line/1.LastObject.TrackId") if v]) >= 2 and \
                            len([v for v in changes.values("Cameras.line/1.Objects") if v]) >= 2

                    await _poll("two notifications of each", notified, 60)
                    ids = [v for v in changes.values("Cameras.line/1.LastObject.TrackId") if v]
                    assert ids == sorted(set(ids)), changes.seen  # new objects only, each once
                    counts = [v for v in changes.values("Cameras.line/1.Objects") if v]
                    assert counts == sorted(set(counts)), changes.seen
                    objects = await node("Cameras.line/1.Objects").read_value()
                    by_class = [await node(f"Cameras.line/1.ObjectsByClass.{n}").read_value()
                                for n in ("crack", "dent", "missing_part", "scratch", "stain")]
                    assert objects <= sum(by_class) <= objects + 3  # counted between the two reads meanwhile
                    assert await node("Cameras.line/1.LastObject.Class").read_value() in (
                        "crack", "dent", "missing_part", "scratch", "stain")
                    assert 0 < await node("Cameras.line/1.LastObject.Score").read_value() <= 1
                    assert (await node("Cameras.line/1.LastObject.CaptureTime").read_value()).year >= 2024
                    assert await node("Cameras.line/1.State").read_value() == "STREAMING"
                    assert await node("Cameras.line/1.Streaming").read_value() is True
                    await _poll("its rate", lambda: _at_least(node("Cameras.line/1.Fps"), 1), 10)
                    assert await node("Cameras.line/1.LatencyP99Ms").read_value() > 0
                    exported = metric(server, 'yolov12_opcua_sessions{endpoint="' + url + '"}')
                    assert exported == 1, exported
                    values = await _all_values(client, node("Yolov12Serve"))
                    assert not [v for v in values if "synthetic" in str(v)], values  # no camera URL anywhere
                    for attempt in (node("Yolov12Serve.Status").write_value("hacked"),
                                    node("Cameras").add_folder(ua.NodeId("X", ns), "X"),
                                    client.delete_nodes([node("Cameras.line/1")], recursive=True)):
                        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                            await attempt
                    assert await _names(client, ns, "Cameras") == ["line/1"]

                    c.remove_stream("line/1")
                    await _poll("its nodes gone", lambda: _gone(client, ns, "Cameras.line/1.State"), 10)
                    assert await _names(client, ns, "Cameras") == []
                    c.add_stream("cam2", CAMERA)  # untracked: no objects, state and rates only
                    await _poll("the new camera's nodes", lambda: _names(client, ns, "Cameras.cam2"), 10)
                    assert await _names(client, ns, "Cameras.cam2") == [
                        "Fps", "LastError", "LatencyP99Ms", "PictureProblem", "Reconnects", "State", "Streaming"]
                    assert await _names(client, ns, "Cameras") == ["cam2"]

            asyncio.run(run())
        rc, _ = server.terminate()
        assert rc == 0
    finally:
        server.close()


@needs_asyncua
def test_a_camera_whose_node_ids_another_holds_gets_none_and_a_warning():
    """Camera 'belt' and camera 'belt.State' would both be NodeId Cameras.belt.State: the one added second gets no
    nodes (the first keeps its own intact), a warning says why, and once the first is removed the second gets its
    nodes."""
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}"
    server = ServerProcess("--allow-synthetic", "--no-status", "--instances", "1", "--opcua", url)
    try:
        with server.client() as c:
            c.wait_ready(30)
            c.add_stream("belt", CAMERA)

            async def run() -> None:
                async with Client(url) as client:
                    ns = await client.get_namespace_index(NS)
                    await _poll("belt's nodes", lambda: _names(client, ns, "Cameras.belt"), 10)
                    c.add_stream("belt.State", CAMERA)
                    said = "WARNING yolov12_serve.opcua: opcua: camera belt.State has no OPC UA nodes"
                    await asyncio.to_thread(wait_until, lambda: said in server.log(), 10, what="the warning")
                    assert await _names(client, ns, "Cameras") == ["belt"]
                    assert await client.get_node(ua.NodeId("Cameras.belt.State", ns)).read_value() in (
                        "CONNECTING", "STREAMING")
                    c.remove_stream("belt")
                    await _poll("belt.State's nodes", lambda: _names(client, ns, "Cameras.belt.State"), 10)
                    assert await _names(client, ns, "Cameras") == ["belt.State"]

            asyncio.run(run())
    finally:
        server.close()


async def _is(node, value: object) -> bool:
    return await node.read_value() == value


async def _at_least(node, n: float):
    value = await node.read_value()
    return value if value >= n else None


async def _gone(client: Client, ns: int, node_id: str) -> bool:
    try:
        await client.get_node(ua.NodeId(node_id, ns)).read_value()
    except ua.UaStatusCodeError as e:
        return "BadNodeIdUnknown" in str(e)
    return False


async def _all_values(client: Client, root) -> list[object]:
    """Every variable's value under `root`."""
    values = []
    for child in await root.get_children():
        if await child.read_node_class() == ua.NodeClass.Variable:
            values.append(await child.read_value())
        values += await _all_values(client, child)
    return values


def _opcua_pair(folder: Path, ca, name: str):
    return make_cert(folder, ca, name, uris=[f"urn:test:{name}"], dns=["localhost"], rsa=True)


def _as_pem(pair) -> tuple[Path, Path]:
    """The pair's files named .pem: asyncua's client reads any other name as DER (the server takes either)."""
    cert, key = pair.cert.with_suffix(".cert.pem"), pair.key.with_suffix(".key.pem")
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    return cert, key


@needs_asyncua
@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_with_a_certificate_only_encrypted_sessions_of_trusted_clients_are_served(tmp_path):
    """--opcua-cert/--opcua-key: only Basic256Sha256 endpoints are offered; an unencrypted client is refused; a client
    whose certificate a --opcua-trust CA signed reads over SignAndEncrypt and Sign, as does one whose self-signed
    certificate is in the folder; one from another CA, or one whose certificate names another application, is
    refused."""
    ca, rogue = make_ca(tmp_path, "plant-ca", rsa=True), make_ca(tmp_path, "rogue-ca", rsa=True)
    server_pair = _opcua_pair(tmp_path, ca, "detector")
    (trusted_cert, trusted_key), (stranger_cert, stranger_key) = (_as_pem(_opcua_pair(tmp_path, ca, "scada")),
                                                                  _as_pem(_opcua_pair(tmp_path, rogue, "stranger")))
    der = tmp_path / "detector.der"  # DER as well as PEM: what OPC UA tools write
    subprocess.run(["openssl", "x509", "-in", str(server_pair.cert), "-outform", "DER", "-out", str(der)], check=True)
    trust = tmp_path / "trusted"
    trust.mkdir()
    (trust / "plant-ca.crt").write_bytes(ca.cert.read_bytes())
    own_cert, own_key = tmp_path / "uaexpert.cert.pem", tmp_path / "uaexpert.key.pem"  # self-signed, as clients make
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(own_key),
                    "-out", str(own_cert), "-subj", "/CN=uaexpert", "-addext", "subjectAltName=URI:urn:test:uaexpert",
                    "-addext", "basicConstraints=critical,CA:FALSE"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-in", str(own_cert), "-outform", "DER", "-out", str(trust / "uaexpert.der")],
                   check=True)  # trusted as it is, in DER as UaExpert exports it
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}"
    server = ServerProcess("--no-status", "--instances", "1", "--opcua", url, "--opcua-cert", str(der),
                           "--opcua-key", str(server_pair.key), "--opcua-trust", str(trust))
    try:
        async def run() -> None:
            endpoints = await Client(url).connect_and_get_server_endpoints()
            assert {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode.name) for e in endpoints} == {
                ("Basic256Sha256", "SignAndEncrypt"), ("Basic256Sha256", "Sign")}
            assert {e.Server.ApplicationUri for e in endpoints} == {"urn:test:detector"}  # from its certificate
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await _unencrypted_session_reads(url)
            for mode in ("SignAndEncrypt", "Sign"):
                client = Client(url, timeout=20)
                client.application_uri = "urn:test:scada"
                await client.set_security_string(f"Basic256Sha256,{mode},{trusted_cert},{trusted_key}")
                async with client:
                    ns = await client.get_namespace_index(NS)
                    status = client.get_node(ua.NodeId("Yolov12Serve.Status", ns))
                    await _poll("status serving", lambda n=status: _is(n, "serving"), 5)
            pinned = Client(url, timeout=20)
            pinned.application_uri = "urn:test:uaexpert"
            await pinned.set_security_string(f"Basic256Sha256,SignAndEncrypt,{own_cert},{own_key}")
            async with pinned:
                assert NS in await pinned.get_namespace_array()
            impostor = Client(url, timeout=20)  # a trusted certificate, but another application's
            impostor.application_uri = "urn:test:other"
            await impostor.set_security_string(f"Basic256Sha256,SignAndEncrypt,{trusted_cert},{trusted_key}")
            with pytest.raises(ua.UaStatusCodeError, match="BadCertificateUriInvalid"):
                async with impostor:
                    pass
            rogue_client = Client(url, timeout=20)
            rogue_client.application_uri = "urn:test:stranger"
            await rogue_client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{stranger_cert},{stranger_key}")
            with pytest.raises(ua.UaStatusCodeError, match="BadCertificateUntrusted"):
                async with rogue_client:
                    pass

        with server.client() as c:
            c.wait_ready(30)
        asyncio.run(run())
        log = server.log()
        assert "not in --opcua-trust" in log and "stranger" in log, log
        assert "Basic256Sha256 (Sign, SignAndEncrypt), clients in --opcua-trust" in log, log
    finally:
        server.close()


async def _unencrypted_session_reads(url: str) -> list[str]:
    """A session over an unencrypted channel (security None), made without asyncua's client-side check that the
    server offers such an endpoint, as a client of another make could: the namespace array it reads."""
    client = Client(url, timeout=20)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        params = ua.CreateSessionParameters(ClientNonce=b"n" * 32, EndpointUrl=url, SessionName="plain",
                                            RequestedSessionTimeout=60000, MaxResponseMessageSize=0,
                                            ClientDescription=ua.ApplicationDescription(
                                                ApplicationUri="urn:test:plain",
                                                ApplicationType=ua.ApplicationType.Client))
        await client.uaclient.create_session(params)
        activate = ua.ActivateSessionParameters(UserIdentityToken=ua.AnonymousIdentityToken(PolicyId="anonymous"))
        await client.uaclient.activate_session(activate)
        return await client.get_namespace_array()
    finally:
        client.disconnect_socket()


@needs_asyncua
def test_without_a_certificate_the_server_warns_that_anyone_may_read():
    port = free_port()
    server = ServerProcess("--no-status", "--instances", "1", "--host", "0.0.0.0", "--opcua",
                           f"opc.tcp://0.0.0.0:{port}")
    try:
        wait_until(lambda: "OPC UA on opc.tcp://0.0.0.0" in server.log(), 20, what="the warning")
        line = next(ln for ln in server.log().splitlines() if "OPC UA on opc.tcp://0.0.0.0" in ln)
        assert "WARNING" in line and "without --opcua-cert" in line and "docs/security.md" in line, line
    finally:
        server.close()


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
@needs_asyncua
def test_bad_opcua_options_are_one_line(tmp_path, capsys):
    from yolov12_serve.cli import main

    ca = make_ca(tmp_path, "ca", rsa=True)
    good = _opcua_pair(tmp_path, ca, "good")
    ec = make_cert(tmp_path, make_ca(tmp_path, "ec-ca"), "ec", uris=["urn:test:ec"])
    no_uri = make_cert(tmp_path, ca, "no-uri", dns=["localhost"], rsa=True)
    other = _opcua_pair(tmp_path, ca, "other")
    (tmp_path / "empty").mkdir()
    users, bad_users = tmp_path / "users", tmp_path / "bad-users"
    users.write_text("plc1:scrypt$16384$8$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5\n")
    bad_users.write_text("plc1:scrypt$16384$8$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5\nplc2\n")
    base = ["--engines", "x.onnx", "--gpus", "cpu"]
    for argv, message in [
        (["--opcua", "http://0.0.0.0:4840"], "expected opc.tcp://HOST:PORT"),
        (["--opcua", "opc.tcp://0.0.0.0:99999"], "the port must be 1..65535"),
        (["--opcua", "opc.tcp://0.0.0.0:4840/freeopcua/server"], "the server takes no path"),
        (["--opcua-cert", str(good.cert)], "--opcua-cert is for --opcua"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(good.cert)], "--opcua-key is missing"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-trust", str(ca.cert)], "give --opcua-cert and --opcua-key too"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(ec.cert), "--opcua-key", str(ec.key)],
         "Basic256Sha256 needs an RSA key"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(no_uri.cert), "--opcua-key", str(no_uri.key)],
         "URI subjectAltName"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(good.cert), "--opcua-key", str(other.key)],
         "does not belong to --opcua-cert"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(good.cert), "--opcua-key", __file__],
         "not a private key in PEM or DER"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(good.cert), "--opcua-key", str(good.key),
          "--opcua-trust", str(tmp_path / "empty")], "no certificate in it"),
        (["--opcua-users", str(users)], "--opcua-users is for --opcua"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-users", str(users)],
         "must not cross an unencrypted channel: give --opcua-cert and --opcua-key too"),
        (["--opcua", "opc.tcp://h:4840", "--opcua-cert", str(good.cert), "--opcua-key", str(good.key),
          "--opcua-users", str(bad_users)], f"--opcua-users {bad_users}, line 2: expected NAME:HASH"),
    ]:
        assert main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


@needs_asyncua
def test_a_port_in_use_is_one_line_before_the_engines_load(capsys, caplog):
    from yolov12_serve.cli import main

    caplog.set_level(logging.INFO)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc = main(["--engines", str(model_path()), "--gpus", "cpu", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "-1", "--no-state", "--opcua", f"opc.tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot listen for OPC UA on 127.0.0.1:{port}: the port is in use" in err, err
    assert err.count("\n") == 1, err
    assert not [r for r in caplog.records if "(model " in r.getMessage()], caplog.text  # no engine was loaded


@needs_asyncua
def test_a_port_taken_between_the_check_and_the_bind_is_said_by_wait_started():
    """The port checked free, then taken before the OPC UA thread binds it (another process in between): the
    server's start says so in the same words."""
    from yolov12_serve.fanout import Fanout
    from yolov12_serve.opcua import OpcUaOptions, OpcUaServer

    fanout = Fanout()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = OpcUaServer(OpcUaOptions(f"opc.tcp://127.0.0.1:{port}"), streams=lambda: [], status=lambda: "starting",
                             names=lambda r: {}, class_names=lambda s: [],
                             subscribe=lambda loop: fanout.subscribe(None, 8, loop))
        server.start()
        with pytest.raises(OSError, match=f"cannot listen for OPC UA on 127.0.0.1:{port}: the port is in use"):
            server.wait_started()
        server.close()


@needs_asyncua
@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_check_says_how_opcua_would_be_served(tmp_path, capsys):
    from yolov12_serve.cli import main

    ca = make_ca(tmp_path, "ca", rsa=True)
    pair = _opcua_pair(tmp_path, ca, "detector")
    base = ["--engines", str(model_path()), "--gpus", "cpu", "--no-state", "--check"]
    assert main([*base, "--opcua", "opc.tcp://0.0.0.0:4840"]) == 0
    assert "opcua    opc.tcp://0.0.0.0:4840, unencrypted (security None)" in capsys.readouterr().out
    assert main([*base, "--opcua", "opc.tcp://0.0.0.0:4840", "--opcua-cert", str(pair.cert), "--opcua-key",
                 str(pair.key), "--opcua-trust", str(ca.cert)]) == 0
    out = capsys.readouterr().out
    assert "Basic256Sha256 only" in out and "application URI urn:test:detector" in out and \
        f"1 trusted client certificates and CAs from {ca.cert}" in out and "anonymous sessions" in out, out
    users = tmp_path / "users"
    users.write_text("plc1:scrypt$16384$8$1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5\n")
    users.chmod(0o600)
    assert main([*base, "--opcua", "opc.tcp://0.0.0.0:4840", "--opcua-cert", str(pair.cert), "--opcua-key",
                 str(pair.key), "--opcua-users", str(users)]) == 0
    assert f"any client certificate, 1 users from {users}" in capsys.readouterr().out


def test_without_asyncua_opcua_is_one_line_saying_how_to_install_it(tmp_path):
    """In a process where asyncua cannot be imported (as on a serving install without the extra)."""
    code = ("import sys; sys.modules['asyncua'] = None; from yolov12_serve.cli import main; "
            "sys.exit(main(['--engines', 'x.onnx', '--gpus', 'cpu', '--opcua', 'opc.tcp://0.0.0.0:4840']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done
    assert 'pip install ".[opcua]"' in done.stderr and done.stderr.count("\n") == 1, done.stderr


def _der(cert_file: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(Encoding.DER)


def _pem_copy(cert_file: Path, name: str) -> Path:
    """A copy named .pem (asyncua's client reads other names as DER): to pin a server certificate with."""
    copy = cert_file.with_name(f"{name}.pem")
    copy.write_bytes(cert_file.read_bytes())
    return copy


async def _session(url: str, uri: str, cert: Path, key: Path, pinned: Path | None = None, mode: str = "SignAndEncrypt",
                   user: str | None = None, password: str | None = None) -> Client:
    """A connected client (its caller disconnects it) of application `uri`; `pinned`: the server certificate it
    expects (it then skips GetEndpoints, and refuses any other); with `user`, logged in as that user. At most 30 s:
    a refusal must come as an error, not a hang."""
    client = Client(url, timeout=20)
    client.application_uri = uri
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    await client.set_security_string(f"Basic256Sha256,{mode},{cert},{key}" + (f",{pinned}" if pinned else ""))
    await asyncio.wait_for(client.connect(), 30)
    return client


async def _reads(url: str, *args, **kw) -> list[str]:
    """The namespace array read in a session of its own (as `_session`), closed after."""
    client = await _session(url, *args, **kw)
    try:
        return await client.get_namespace_array()
    finally:
        await client.disconnect()


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A client's own self-signed certificate (as UaExpert makes), naming urn:test:NAME; PEM files."""
    cert, key = folder / f"{name}.cert.pem", folder / f"{name}.key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", f"/CN={name}", "-addext", f"subjectAltName=URI:urn:test:{name}",
                    "-addext", "basicConstraints=critical,CA:FALSE"], check=True, capture_output=True)
    return cert, key


def _lines(server: ServerProcess, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


@needs_asyncua
@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_sighup_rotates_the_certificate_and_trust_list_and_a_broken_file_keeps_the_ones_in_use(tmp_path):
    """Certificate A served; its files replaced by B (same application URI, a new key) and a client's own certificate
    added to --opcua-trust, then SIGHUP: GetEndpoints gives B, a new client encrypting to it reads, a client that
    pins B reads, the session open since before goes on, and the new client is trusted.
    Then a half-written certificate, a key of another certificate and a trust folder holding a file that is no
    certificate, each at a SIGHUP: one log line each, and B and the trust list stay in use."""
    ca = make_ca(tmp_path, "plant-ca", rsa=True)
    pairs = {}
    for name in ("a", "b", "c"):  # the server's certificates, one after the other: the same application
        (tmp_path / name).mkdir()
        pairs[name] = _opcua_pair(tmp_path / name, ca, "detector")
    cert, key = tmp_path / "opcua.crt", tmp_path / "opcua.key"
    cert.write_bytes(pairs["a"].cert.read_bytes())
    key.write_bytes(pairs["a"].key.read_bytes())
    scada_cert, scada_key = _as_pem(_opcua_pair(tmp_path, ca, "scada"))
    new_cert, new_key = _self_signed(tmp_path, "newcomer")
    trust = tmp_path / "trusted"
    trust.mkdir()
    (trust / "plant-ca.crt").write_bytes(ca.cert.read_bytes())
    pin_b = _pem_copy(pairs["b"].cert, "pin-b")
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}"
    server = ServerProcess("--no-status", "--instances", "1", "--opcua", url, "--opcua-cert", str(cert),
                           "--opcua-key", str(key), "--opcua-trust", str(trust))
    scada = ("urn:test:scada", scada_cert, scada_key)
    newcomer = ("urn:test:newcomer", new_cert, new_key)

    async def served_certificates() -> set[bytes]:
        return {e.ServerCertificate for e in await Client(url).connect_and_get_server_endpoints()}

    async def said(text: str, count: int) -> None:
        await asyncio.to_thread(wait_until, lambda: len(_lines(server, text)) >= count, 20, what=text)

    async def run() -> None:
        assert await served_certificates() == {_der(pairs["a"].cert)}
        held = await _session(url, *scada)  # open across the rotation
        try:
            with pytest.raises(ua.UaStatusCodeError, match="BadCertificateUntrusted"):
                await _reads(url, *newcomer)

            cert.write_bytes(pairs["b"].cert.read_bytes())
            key.write_bytes(pairs["b"].key.read_bytes())
            (trust / "newcomer.der").write_bytes(_der(new_cert))
            server.proc.send_signal(signal.SIGHUP)
            await said("opcua: trust list reloaded", 1)
            assert len(_lines(server, "opcua: certificate reloaded")) == 1
            await _poll("B in the endpoints", lambda: _equal(served_certificates, {_der(pairs["b"].cert)}), 5)
            assert NS in await _reads(url, *scada)  # encrypted to the certificate GetEndpoints gave
            assert NS in await _reads(url, *scada, pinned=pin_b)  # no GetEndpoints: the channel is B's
            assert NS in await _reads(url, *newcomer)  # trusted by the entry added
            assert NS in await held.get_namespace_array()  # the session open before goes on

            cert.write_bytes(pairs["c"].cert.read_bytes()[:700])  # half-written
            (trust / "partial.crt").write_bytes(ca.cert.read_bytes()[:300])
            server.proc.send_signal(signal.SIGHUP)
            await said("SIGHUP: OPC UA trust list not reloaded", 1)
            await said("SIGHUP: OPC UA certificate not reloaded", 1)
            assert NS in await _reads(url, *newcomer)
            (trust / "partial.crt").unlink()
            cert.write_bytes(pairs["c"].cert.read_bytes())  # whole, but the key is still B's
            server.proc.send_signal(signal.SIGHUP)
            await said("SIGHUP: OPC UA certificate not reloaded", 2)
            await said("opcua: trust list reloaded", 2)
            assert await served_certificates() == {_der(pairs["b"].cert)}
            assert NS in await _reads(url, *scada, pinned=pin_b)
            assert NS in await _reads(url, *scada)
            assert NS in await _reads(url, *newcomer)
        finally:
            await held.disconnect()

    try:
        with server.client() as c:
            c.wait_ready(30)
        asyncio.run(run())
        failed = _lines(server, "not reloaded")
        assert len(failed) == 3, failed
        assert any(f"--opcua-cert {cert}: not an X.509 certificate" in line for line in failed), failed
        assert any(f"--opcua-key {key} does not belong to --opcua-cert {cert}" in line for line in failed), failed
        assert any("partial.crt: not an X.509 certificate" in line for line in failed), failed
        assert "Traceback" not in server.log()
    finally:
        server.close()


async def _equal(get, expected) -> bool:
    return await get() == expected


def test_the_opcua_users_command_prints_a_line_the_users_file_takes(tmp_path, capsys, caplog):
    """`python -m yolov12_serve.opcua_users NAME` asks the password twice and prints NAME:HASH; the users file made
    of such lines lets that name in with that password only (an unknown name, a wrong password: no); a file others
    may read is warned of, as the token file is. Without a terminal the password is one line of stdin."""
    from yolov12_serve.opcua_users import UserTable, main

    answers = iter(["belt-plc-pass", "belt-plc-pass"])
    assert main(["plc1"], ask=lambda prompt: next(answers)) == 0
    line = capsys.readouterr().out
    assert line.startswith("plc1:scrypt$") and line.count("\n") == 1 and "belt-plc-pass" not in line, line
    piped = subprocess.run([sys.executable, "-m", "yolov12_serve.opcua_users", "scada"], input="scada-pass-1\n",
                           capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert piped.returncode == 0 and piped.stdout.startswith("scada:scrypt$"), piped
    users = tmp_path / "opcua-users"
    users.write_text(f"# line 1 PLCs\n{line}\n{piped.stdout}")
    users.chmod(0o600)
    caplog.set_level(logging.WARNING)
    table = UserTable.load(users)
    assert not caplog.records, caplog.text
    assert len(table) == 2
    assert table.check("plc1", "belt-plc-pass") and table.check("scada", "scada-pass-1")
    assert not table.check("plc1", "scada-pass-1") and not table.check("plc1", "belt-plc-pas")
    assert not table.check("plc2", "belt-plc-pass") and not table.check(None, None) and not table.check("plc1", None)
    users.chmod(0o644)
    UserTable.load(users)
    assert f"--opcua-users {users} can be read by other users (mode 644): chmod 600 it" in caplog.text

    for argv, given, message in [
        (["plc1"], ["a-password", "another-one"], "the two passwords differ: nothing printed"),
        (["plc1"], ["short", "short"], "use at least 8"),
        (["plc 1"], ["a-password", "a-password"], "1 to 64 characters without spaces, ':' or '#'"),
        (["plc:1"], ["a-password", "a-password"], "1 to 64 characters without spaces, ':' or '#'"),
    ]:
        answers = iter(given)
        assert main(argv, ask=lambda prompt, a=answers: next(a)) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and message in err and err.count("\n") == 1, (argv, err)


def test_a_users_file_saved_on_windows_with_a_bom_and_crlf_lets_its_first_user_in(tmp_path):
    """Notepad's UTF-8 starts with a BOM and ends lines with CRLF: the first user must not become '\ufeffplc1'."""
    from yolov12_serve.opcua_users import UserTable, hash_password

    users = tmp_path / "opcua-users"
    users.write_bytes(("\ufeff" + f"plc1:{hash_password('belt-plc-pass')}\r\n"
                       f"scada:{hash_password('scada:pass-1')}\r\n").encode("utf-8"))
    table = UserTable.load(users)
    assert sorted(table.users) == ["plc1", "scada"]
    assert table.check("plc1", "belt-plc-pass") and table.check("scada", "scada:pass-1")  # ':' in a password too


def test_a_users_line_with_the_largest_scrypt_parameters_it_takes_can_log_in(tmp_path):
    """128*N*R of 256 MiB is taken by the file's check: a login with such a line must work, not raise OpenSSL's
    'memory limit exceeded' inside asyncua's ActivateSession (every login of that user refused, nothing said)."""
    import base64
    import hashlib

    from yolov12_serve.opcua_users import UserTable

    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"belt-plc-pass", salt=salt, n=2**20, r=2, p=1, maxmem=2**29, dklen=32)
    users = tmp_path / "opcua-users"
    users.write_text(f"plc1:scrypt$1048576$2$1${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}\n")
    table = UserTable.load(users)
    assert table.check("plc1", "belt-plc-pass") and not table.check("plc1", "belt-plc-pas")


def test_an_unknown_name_costs_what_the_files_lines_cost_and_mixed_costs_are_warned(tmp_path, caplog):
    """A name not in the file is checked against a hash of the scrypt cost of the file's lines (not the default):
    else a refusal of a listed name with costlier lines takes longer, and tells that the name exists. Lines of
    several costs cannot all be matched: a warning says to make them again."""
    import base64
    import hashlib

    from yolov12_serve.opcua_users import SCRYPT_N, UserTable

    def line(name: str, n: int) -> str:
        salt = name.encode().ljust(16, b"-")
        key = hashlib.scrypt(b"belt-plc-pass", salt=salt, n=n, r=8, p=1, dklen=32)
        return f"{name}:scrypt${n}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}\n"

    users = tmp_path / "opcua-users"
    users.write_text(line("plc1", 2**11) + line("plc2", 2**11))
    with caplog.at_level("WARNING", logger="yolov12_serve.opcua_users"):
        table = UserTable.load(users)
    assert (table.dummy.n, table.dummy.r, table.dummy.p) == (2**11, 8, 1) != (SCRYPT_N, 8, 1)
    assert table.check("plc1", "belt-plc-pass") and not table.check("nobody", "belt-plc-pass")
    assert "different scrypt costs" not in caplog.text
    users.write_text(line("plc1", 2**11) + line("plc2", 2**11) + line("scada", 2**12))
    with caplog.at_level("WARNING", logger="yolov12_serve.opcua_users"):
        assert UserTable.load(users).dummy.n == 2**11
    assert "2 different scrypt costs" in caplog.text


def test_password_checks_are_limited_so_a_guessing_client_cannot_stall_the_loop(tmp_path, caplog):
    """Each check costs ~50 ms on the OPC UA loop: 20 at once (PLCs reconnecting together after a restart), then 4
    a second; past that a login is refused unchecked (a right password too, until the budget refills), said in one
    line a minute, not one per refusal."""
    from yolov12_serve.opcua import _user_manager
    from yolov12_serve.opcua_users import LoginLimiter, UserTable, hash_password

    now = [100.0]
    limiter = LoginLimiter(burst=3, per_s=2.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="yolov12_serve.opcua_users"):
        assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]
        now[0] += 0.5  # one check's worth refilled
        assert [limiter.allow() for _ in range(2)] == [True, False]
        now[0] += 30
        assert [limiter.allow() for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more
    assert caplog.text.count("logins refused unchecked") == 1 and limiter.refused_total == 4

    users = tmp_path / "opcua-users"
    users.write_text(f"plc1:{hash_password('belt-plc-pass')}\n")
    table = UserTable.load(users)
    manager = _user_manager(lambda: table, LoginLimiter(burst=3, per_s=2.0, clock=lambda: now[0]))  # asyncua's
    assert manager.get_user(None, "plc1", "belt-plc-pass") is not None
    assert manager.get_user(None, "plc1", "guess") is None and manager.get_user(None, "plc9", "guess") is None
    assert manager.get_user(None, "plc1", "belt-plc-pass") is None  # the budget is spent: refused unchecked
    now[0] += 0.5
    assert manager.get_user(None, "plc1", "belt-plc-pass") is not None


def test_a_users_file_that_cannot_be_used_is_one_line_naming_file_and_line(tmp_path):
    from yolov12_serve.errors import ConfigError
    from yolov12_serve.opcua_users import UserTable, hash_password

    good = f"plc1:{hash_password('belt-plc-pass')}"
    users = tmp_path / "users"
    for text, message in [
        ("", "holds no user"),
        ("# only a comment\n", "holds no user"),
        ("plc1\n", "line 1: expected NAME:HASH"),
        ("plc 1:" + good.split(":", 1)[1], "line 1: expected NAME:HASH"),
        (f"{good}\n{good}\n", "line 2: user plc1 is already listed above"),
        ("plc1:5f4dcc3b5aa765d61d8327deb882cf99\n", "line 1: expected NAME:scrypt$N$R$P$SALT$KEY"),
        ("plc1:" + good.split(":", 1)[1].replace("scrypt$16384$", "scrypt$1073741824$", 1), "out of range"),
        ("plc1:" + good.split(":", 1)[1].replace("scrypt$16384$", "scrypt$1000$", 1), "out of range"),
    ]:
        users.write_text(text)
        with pytest.raises(ConfigError) as e:
            UserTable.load(users)
        assert message in str(e.value) and str(users) in str(e.value) and "\n" not in str(e.value), (text, e.value)
        assert "belt-plc-pass" not in str(e.value)
    with pytest.raises(ConfigError, match=f"cannot read --opcua-users {tmp_path / 'missing'}"):
        UserTable.load(tmp_path / "missing")


@needs_asyncua
@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_with_opcua_users_a_session_logs_in_and_anonymous_or_wrong_ones_are_refused_and_sighup_reloads_them(
        tmp_path):
    """--opcua-users (lines made by the real command): endpoints offer only UserName; a user with its password reads
    over SignAndEncrypt and over Sign (the password then encrypted to the server's certificate); a wrong password,
    an unknown user and an anonymous session are refused with an error, not a hang. SIGHUP after the file is
    rewritten: the new user reads, the removed one is refused, the session open since before goes on; a broken file
    at the next SIGHUP is one log line and the users in use stay."""
    ca = make_ca(tmp_path, "plant-ca", rsa=True)
    server_pair = _opcua_pair(tmp_path, ca, "detector")
    scada = ("urn:test:scada", *_as_pem(_opcua_pair(tmp_path, ca, "scada")))

    def user_line(name: str, password: str) -> str:
        made = subprocess.run([sys.executable, "-m", "yolov12_serve.opcua_users", name], input=password + "\n",
                              capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
        assert made.returncode == 0, made
        return made.stdout

    users = tmp_path / "opcua-users"
    users.write_text("# line 1\n" + user_line("plc1", "belt-plc-pass"))
    users.chmod(0o600)
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}"
    server = ServerProcess("--no-status", "--instances", "1", "--opcua", url, "--opcua-cert", str(server_pair.cert),
                           "--opcua-key", str(server_pair.key), "--opcua-users", str(users))

    async def said(text: str, count: int) -> None:
        await asyncio.to_thread(wait_until, lambda: len(_lines(server, text)) >= count, 20, what=text)

    async def run() -> None:
        endpoints = await Client(url).connect_and_get_server_endpoints()
        assert {t.TokenType for e in endpoints for t in e.UserIdentityTokens} == {ua.UserTokenType.UserName}
        for mode in ("SignAndEncrypt", "Sign"):
            assert NS in await _reads(url, *scada, mode=mode, user="plc1", password="belt-plc-pass")
        for user, password in (("plc1", "wrong-password"), ("plc9", "belt-plc-pass")):
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await _reads(url, *scada, user=user, password=password)
        with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected"):
            await _reads(url, *scada)  # anonymous
        held = await _session(url, *scada, user="plc1", password="belt-plc-pass")
        try:
            users.write_text(user_line("plc2", "paint-plc-pass"))
            server.proc.send_signal(signal.SIGHUP)
            await said("opcua: users reloaded", 1)
            assert NS in await _reads(url, *scada, user="plc2", password="paint-plc-pass")
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await _reads(url, *scada, user="plc1", password="belt-plc-pass")
            assert NS in await held.get_namespace_array()  # open before: goes on
            users.write_text("plc3\n")
            server.proc.send_signal(signal.SIGHUP)
            await said("SIGHUP: OPC UA users not reloaded", 1)
            assert NS in await _reads(url, *scada, user="plc2", password="paint-plc-pass")
        finally:
            await held.disconnect()

    try:
        with server.client() as c:
            c.wait_ready(30)
        asyncio.run(run())
        log = server.log()
        failed = _lines(server, "not reloaded")
        assert len(failed) == 1 and f"--opcua-users {users}, line 1: expected NAME:HASH" in failed[0], failed
        assert "1 users of --opcua-users (no anonymous sessions)" in log, log
        assert "refused a session: user 'plc1' is not in --opcua-users or its password is wrong" in log, log
        assert "refused a session: user 'plc9'" in log, log
        assert "belt-plc-pass" not in log and "paint-plc-pass" not in log and "scrypt$" not in log, log
        assert "Traceback" not in log
    finally:
        server.close()
