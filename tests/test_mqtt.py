"""--mqtt (mqtt.py) against a real mosquitto broker on loopback and the real server: detections, objects once each,
retained camera states and server status (its last will when killed), a broker that comes and goes, credentials."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from certs import HAVE_OPENSSL, Pair, make_ca, make_cert
from test_server_harness import ServerProcess, wait_until

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (scripts/setup test installs "
                                "it with apt)")

CAMERA = "synthetic://belt?fps=10&size=320x180"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto on 127.0.0.1:`port`, no persistence; `users` {name: password} turns anonymous access off; `tls`
    its certificate, `client_ca` the CA whose client certificates it requires. Its log: `log()`."""

    def __init__(self, folder: Path, port: int | None = None, users: dict[str, str] | None = None,
                 tls: Pair | None = None, client_ca: Pair | None = None) -> None:
        self.port = port or free_port()
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.log_file = folder / f"mosquitto-{self.port}.log"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", f"log_dest file {self.log_file}"]
        if tls is not None:  # the server's certificate and key (TLS only: the listener then takes no plaintext)
            lines += [f"certfile {tls.cert}", f"keyfile {tls.key}"]
        if client_ca is not None:
            lines += [f"cafile {client_ca.cert}", "require_certificate true"]
        if os.geteuid() == 0:  # as root it would run as user mosquitto, who may not read the test's folder
            lines.append("user root")
        self.passwords = folder / f"passwords-{self.port}"
        if users:
            self._write_passwords(users)
            lines += ["allow_anonymous false", f"password_file {self.passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def _write_passwords(self, users: dict[str, str]) -> None:
        self.passwords.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
        self.passwords.chmod(0o600)
        subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-U", str(self.passwords)],
                       check=True)  # the passwords hashed, as mosquitto wants them

    def rotate_passwords(self, users: dict[str, str]) -> None:
        """New passwords, read by the running broker on SIGHUP (it then drops clients whose password went)."""
        self._write_passwords(users)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: _connects(self.port), 10, what="mosquitto listening")
        assert self.proc.poll() is None, f"mosquitto stopped: {self.conf.read_text()}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _connects(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


class Listener:
    """A subscriber to PREFIX/# keeping (topic, payload, retained) as they come."""

    def __init__(self, port: int, prefix: str, user: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        if user:
            self.client.username_pw_set(user, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload.decode(), bool(message.retain)))

    def on(self, topic: str) -> list[tuple[str, bool]]:
        with self._lock:
            return [(p, r) for t, p, r in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def metric(server: ServerProcess, name: str) -> float:
    found = re.findall(rf"^{re.escape(name)} (\S+)$", server.metrics(), flags=re.M)
    return float(found[0]) if found else float("nan")


def test_detections_objects_states_and_status_reach_the_broker(tmp_path):
    broker = Broker(tmp_path)
    listener = Listener(broker.port, "plant")
    server = ServerProcess("--allow-synthetic", "--no-status", "--instances", "1",
                           "--mqtt", f"mqtt://127.0.0.1:{broker.port}/plant")
    try:
        wait_until(lambda: ("online", True) in listener.on("plant/status") or ("online", False)
                   in listener.on("plant/status"), 20, what="status online")
        with server.client() as c:
            c.wait_ready(30)
            c.add_stream("line/1", CAMERA, track=True)  # a '/' in an id: one topic level all the same
            objects = wait_until(lambda: len(listener.on("plant/line_1/objects")) >= 3 and
                                 listener.on("plant/line_1/objects"), 60, what="three objects")
            records = [json.loads(p) for p, _ in objects]
            assert all(r["stream_id"] == "line/1" and r["class_name"] and r["time"].endswith("Z") for r in records)
            ids = [int(r["track_id"]) for r in records]
            assert len(ids) == len(set(ids)) and min(ids) >= 1, ids  # each object once
            frames = [json.loads(p) for p, _ in listener.on("plant/line_1/detections")]
            assert frames and all(f["stream_id"] == "line/1" and f["detections"] for f in frames)
            states = [json.loads(p) for p, _ in listener.on("plant/line_1/state")]
            assert states[-1] == {"stream_id": "line/1", "state": "STREAMING", "last_error": ""}, states
            broker_label = f'broker="127.0.0.1:{broker.port}"'
            assert metric(server, f"yolov12_mqtt_connected{{{broker_label}}}") == 1
            assert metric(server, 'yolov12_mqtt_messages_total{kind="objects"}') >= 3
            c.remove_stream("line/1")
            wait_until(lambda: ("", False) in listener.on("plant/line_1/state") or ("", True)
                       in listener.on("plant/line_1/state"), 10, what="its retained state cleared")
        rc, _ = server.terminate()
        assert rc == 0
        wait_until(lambda: listener.on("plant/status")[-1][0] == "offline", 10, what="status offline")
    finally:
        server.close()
        listener.close()
        broker.stop()


def test_states_of_cameras_removed_while_the_server_was_down_are_cleared_at_start(tmp_path):
    """A camera taken out of the streams file, then a restart: its retained state said STREAMING forever. At
    connection the server clears those of its own (its shard's) cameras it no longer has; another shard's camera,
    a camera it has, and a retained message that is no state of ours are left."""
    import paho.mqtt.client as mqtt

    from yolov12_serve.sharding import owner

    ids = (f"cam{i}" for i in range(1000))
    ghost, live, other = next(i for i in ids if owner(i, 2) == 0), next(i for i in ids if owner(i, 2) == 0), \
        next(i for i in ids if owner(i, 2) == 1)
    broker = Broker(tmp_path)
    before = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    before.connect("127.0.0.1", broker.port)
    before.loop_start()
    for sid in (ghost, live, other):  # what the server published before it was stopped
        state = json.dumps({"stream_id": sid, "state": "STREAMING", "last_error": ""})
        before.publish(f"plant/{sid}/state", state, qos=1, retain=True).wait_for_publish(5)
    before.publish("plant/notes/state", "kept by someone else", qos=1, retain=True).wait_for_publish(5)
    before.loop_stop()
    before.disconnect()
    streams = tmp_path / "cameras.yaml"
    streams.write_text(f"streams:\n  - {{id: {live}, url: '{CAMERA}'}}\n")
    server = ServerProcess("--allow-synthetic", "--no-status", "--instances", "1", "--streams", str(streams),
                           "--shard-count", "2", "--shard-index", "0", "--mqtt", f"mqtt://127.0.0.1:{broker.port}/plant")
    try:
        wait_until(lambda: "cleared the retained state" in server.log(), 30, what="the ghost's state cleared")
        time.sleep(1)
        after = Listener(broker.port, "plant")  # a newcomer: gets what the broker retains now
        try:
            wait_until(lambda: after.on(f"plant/{other}/state"), 10, what="the retained states")
            time.sleep(0.5)
            assert not after.on(f"plant/{ghost}/state"), after.messages
            assert json.loads(after.on(f"plant/{other}/state")[-1][0])["stream_id"] == other  # the other shard's
            assert after.on("plant/notes/state") == [("kept by someone else", True)]
            assert json.loads(after.on(f"plant/{live}/state")[-1][0])["stream_id"] == live
        finally:
            after.close()
        assert server.log().count("cleared the retained state") == 1, server.log()
    finally:
        server.close()
        broker.stop()


def test_no_state_is_cleared_before_the_servers_cameras_are_back(tmp_path, monkeypatch):
    """While the server is still adding its saved cameras, a retained state of one of them is no ghost's: kept until
    the server has settled, then only the cameras still missing are cleared. The publisher alone, as the server
    drives it."""
    import paho.mqtt.client as mqtt

    from yolov12_serve import mqtt as publishing
    from yolov12_serve.fanout import Fanout

    monkeypatch.setattr(publishing, "SWEEP_AFTER_S", 0.2)
    broker = Broker(tmp_path)
    before = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    before.connect("127.0.0.1", broker.port)
    before.loop_start()
    for sid in ("saved", "gone"):
        state = json.dumps({"stream_id": sid, "state": "STREAMING", "last_error": ""})
        before.publish(f"yolov12/{sid}/state", state, qos=1, retain=True).wait_for_publish(5)
    before.loop_stop()
    before.disconnect()
    cameras: dict[str, tuple[str, str]] = {}
    settled = threading.Event()
    fanout = Fanout()
    publisher = publishing.MqttPublisher(publishing.MqttOptions(f"mqtt://127.0.0.1:{broker.port}"),
                                         fanout.subscribe(None, 8), names=lambda r: {}, states=lambda: dict(cameras),
                                         settled=settled.is_set)
    publisher.start()

    def retained() -> dict[str, str]:
        listener = Listener(broker.port, "yolov12")
        try:
            wait_until(lambda: listener.on("yolov12/status"), 10, what="the retained messages")
            time.sleep(0.3)
            return {t: p for t, p, r in listener.messages if r}
        finally:
            listener.close()

    try:
        time.sleep(2.5)  # connected, the sweep due, states compared twice: the server still starting
        assert set(retained()) >= {"yolov12/saved/state", "yolov12/gone/state"}
        cameras["saved"] = ("CONNECTING", "")  # restored from the state folder; then the server is open
        settled.set()
        wait_until(lambda: "yolov12/gone/state" not in retained(), 10, what="the one still missing cleared")
        assert json.loads(retained()["yolov12/saved/state"])["state"] == "CONNECTING"
    finally:
        fanout.close_all()
        publisher.close()
        broker.stop()


def test_a_broker_that_comes_and_goes_never_stops_the_server_and_a_killed_server_is_offline(tmp_path):
    """The broker down at start: the server serves all the same (connected 0, detections counted as dropped) and
    connects when it comes; killed, the broker announces it offline (its last will)."""
    port = free_port()
    server = ServerProcess("--allow-synthetic", "--no-status", "--instances", "1",
                           "--mqtt", f"mqtt://127.0.0.1:{port}")
    broker = None
    try:
        with server.client() as c:
            c.wait_ready(30)
            c.add_stream("belt", CAMERA)
            label = f'yolov12_mqtt_connected{{broker="127.0.0.1:{port}"}}'
            wait_until(lambda: metric(server, 'yolov12_mqtt_messages_dropped_total{reason="disconnected"}') > 0, 30,
                       what="detections dropped while the broker is away")
            time.sleep(2.5)  # connection attempts 1 s apart meanwhile: said once
            assert server.log().count(f"mqtt: cannot connect to 127.0.0.1:{port}") == 1, server.log()
            assert metric(server, label) == 0 and c.stream("belt").state == 2  # STREAMING all the same
            broker = Broker(tmp_path, port)
            listener = Listener(port, "yolov12")  # the default prefix
            try:
                wait_until(lambda: metric(server, label) == 1, 40, what="connected once the broker is up")
                wait_until(lambda: listener.on("yolov12/belt/detections"), 20, what="detections after it came")
                server.kill()
                wait_until(lambda: listener.on("yolov12/status") and listener.on("yolov12/status")[-1][0] ==
                           "offline", 20, what="its last will")
            finally:
                listener.close()
    finally:
        server.close()
        if broker is not None:
            broker.stop()


def test_a_lost_connection_says_what_may_have_closed_it_such_as_a_client_with_our_id(tmp_path):
    """The broker drops our connection when another client connects with the same client id (two servers given one
    --mqtt-client-id), or when it stops: paho calls either 'Unspecified error', which was the whole reason logged.
    The line says what closes a connection so, naming the client id."""
    import paho.mqtt.client as mqtt

    broker = Broker(tmp_path)
    server = ServerProcess("--no-status", "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--mqtt-client-id", "line1-det")
    try:
        label = f'yolov12_mqtt_connected{{broker="127.0.0.1:{broker.port}"}}'
        wait_until(lambda: metric(server, label) == 1, 30, what="connected")
        twin = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line1-det")  # no loop thread: no reconnect
        twin.connect("127.0.0.1", broker.port)
        twin.loop(timeout=1.0)
        wait_until(lambda: "lost the connection" in server.log(), 20, what="the connection lost")
        twin.disconnect()
        line = next(ln for ln in server.log().splitlines() if "lost the connection" in ln)
        assert "Unspecified error" not in line and "another client connected with this client id line1-det" in line \
            and "--mqtt-client-id" in line, line
        for _ in range(5):  # the twin comes back again and again (two servers given one id): it flaps
            wait_until(lambda: metric(server, label) == 1, 30, what="connected again")
            kicked = broker.log().count("already connected, closing old connection")
            twin.reconnect()
            twin.loop(timeout=1.0)
            wait_until(lambda n=kicked: broker.log().count("already connected, closing old connection") > n, 10,
                       what="the server's connection closed by the broker")
            twin.disconnect()
        wait_until(lambda: metric(server, label) == 1, 30, what="connected again")
        lines = [ln for ln in server.log().splitlines() if "mqtt: 127.0.0.1" in ln]
        assert 2 <= len(lines) <= 4, lines  # the first drop, its end, the next drop: not a pair per drop
    finally:
        server.close()
        broker.stop()


def test_broker_credentials_from_a_file_and_a_refusal_said_once(tmp_path):
    broker = Broker(tmp_path, users={"detector": "s3cret"})
    listener = Listener(broker.port, "yolov12", "detector", "s3cret")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("detector:s3cret\n")
    bad.write_text("detector:wrong\n")
    refused = ServerProcess("--no-status", "--instances", "1", "--mqtt", f"mqtt://127.0.0.1:{broker.port}",
                            "--mqtt-credentials", str(bad))
    server = ServerProcess("--no-status", "--instances", "1", "--mqtt", f"mqtt://127.0.0.1:{broker.port}",
                           "--mqtt-credentials", str(good))
    try:
        wait_until(lambda: listener.on("yolov12/status"), 20, what="the server with the password online")
        wait_until(lambda: "refused the connection" in refused.log(), 20, what="the refusal logged")
        time.sleep(3)  # retries meanwhile (1 s apart at first): said once
        log = refused.log()
        assert log.count("refused the connection") == 1 and "s3cret" not in log and "wrong" not in log, log
        assert "cannot connect" not in log, log  # a refusal is no unreachable broker
        assert metric(refused, f'yolov12_mqtt_connected{{broker="127.0.0.1:{broker.port}"}}') == 0
        with refused.client() as c:
            assert c.health() == "SERVING"  # the detections go on without the broker
    finally:
        refused.close()
        server.close()
        listener.close()
        broker.stop()


def test_a_password_rotation_is_taken_on_sighup_at_once_and_a_broken_file_leaves_the_one_in_use(tmp_path):
    """The broker's password changes first (it drops us, then refuses the old one at each attempt, paho waiting 1,
    2, 4, 8, 16 s between them); then --mqtt-credentials is rewritten and SIGHUP: the server connects with the new
    one at once, not after paho's wait. A file that cannot be used on a later SIGHUP is one line; the password in
    use stays (the broker restarted, the server connects with it)."""
    broker = Broker(tmp_path, users={"detector": "first-pw"})
    creds = tmp_path / "mqtt-credentials"
    creds.write_text("detector:first-pw\n")
    server = ServerProcess("--no-status", "--instances", "1", "--mqtt", f"mqtt://127.0.0.1:{broker.port}",
                           "--mqtt-credentials", str(creds))
    label = f'yolov12_mqtt_connected{{broker="127.0.0.1:{broker.port}"}}'
    listener = None
    try:
        wait_until(lambda: metric(server, label) == 1, 30, what="connected with the first password")
        broker.rotate_passwords({"detector": "second-pw"})
        wait_until(lambda: "refused the connection" in server.log(), 30, what="the old password refused")

        def refusals() -> int:
            return broker.log().count("not authorised")

        # four refusals: the next attempt is 16 s after the last (paho's wait doubles from 2 s by then)
        wait_until(lambda: refusals() >= 4, 40, what="four refused attempts")
        creds.write_text("detector:second-pw\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: metric(server, label) == 1, 8, what="connected with the new password soon after SIGHUP")
        assert "mqtt: credentials reloaded from" in server.log(), server.log()

        creds.write_text("not a user and password\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: MQTT credentials not reloaded" in server.log(), 20, what="the broken file said")
        broker.stop()  # no persistence: its retained messages go with it
        broker.start()
        listener = Listener(broker.port, "yolov12", "detector", "second-pw")
        wait_until(lambda: any(p == "online" for p, _ in listener.on("yolov12/status")), 30,
                   what="connected again with the password kept")
        log = server.log()
        lines = [ln for ln in log.splitlines() if "MQTT credentials" in ln]
        assert len(lines) == 1 and "must hold one line USER:PASSWORD" in lines[0], lines
        assert "first-pw" not in log and "second-pw" not in log and "not a user" not in log, log
    finally:
        if listener is not None:
            listener.close()
        server.close()
        broker.stop()


def test_without_detections_only_objects_and_states_are_published(tmp_path):
    """--no-mqtt-detections (a fraction of the cost): a tracked camera's new objects still go out, once each; no
    detections topic; a shard's status under status/INDEX. The publisher itself, fed through a fan-out as the
    server feeds it."""
    import numpy as np

    from yolov12_serve.fanout import Fanout
    from yolov12_serve.frames import FrameResult
    from yolov12_serve.mqtt import MqttOptions, MqttPublisher

    broker = Broker(tmp_path)
    listener = Listener(broker.port, "quiet")
    fanout = Fanout()
    publisher = MqttPublisher(MqttOptions(f"mqtt://127.0.0.1:{broker.port}/quiet", detections=False),
                              fanout.subscribe(None, 64), names=lambda r: {0: "scratch", 1: "dent"},
                              states=lambda: {"cam": ("STREAMING", "")}, shard="1")
    publisher.start()
    try:
        wait_until(lambda: listener.on("quiet/cam/state"), 20, what="the camera's state")
        # replica 1 of a sharded deployment says its own status; a client id every MQTT 3.1.1 broker takes
        assert [p for p, _ in listener.on("quiet/status/1")] == ["online"] and not listener.on("quiet/status")
        assert len(publisher._client._client_id) <= 23
        box = [10, 10, 50, 50, 0.9, 1]
        for frame, ids in enumerate([[0], [1], [1], [1, 2], [2]]):
            fanout.publish(FrameResult("cam", frame, np.array([box] * len(ids), np.float32), (100, 100), 1, 0.01,
                                       "cpu", track_ids=np.array(ids)))
        fanout.publish(FrameResult("plain", 0, np.array([box], np.float32), (100, 100), 1, 0.01, "cpu"))
        records = wait_until(lambda: len(listener.on("quiet/cam/objects")) >= 2 and listener.on("quiet/cam/objects"),
                             20, what="two objects")
        time.sleep(0.5)
        assert [json.loads(p)["track_id"] for p, _ in listener.on("quiet/cam/objects")] == [1, 2]  # numbers, as
        # frame_id and the evidence record's
        assert not [t for t, _, _ in listener.messages if t.endswith("/detections")], listener.messages
        assert records
    finally:
        fanout.close_all()
        publisher.close()
        listener.close()
        broker.stop()


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_mqtts_checks_the_broker_with_the_ca_given(tmp_path):
    """mqtts:// with --mqtt-ca: a broker whose certificate that CA signed is published to; one signed by another CA
    is never connected to (said once, retried), and the server serves all the same."""
    ca, rogue = make_ca(tmp_path, "plant-ca"), make_ca(tmp_path, "rogue-ca")
    broker = Broker(tmp_path, tls=make_cert(tmp_path, ca, "broker", dns=["localhost"], ips=["127.0.0.1"]))
    trusting = ServerProcess("--no-status", "--instances", "1", "--mqtt", f"mqtts://127.0.0.1:{broker.port}/tls",
                             "--mqtt-ca", str(ca.cert))
    doubting = ServerProcess("--no-status", "--instances", "1", "--mqtt", f"mqtts://127.0.0.1:{broker.port}/tls",
                             "--mqtt-ca", str(rogue.cert))
    try:
        label = f'yolov12_mqtt_connected{{broker="127.0.0.1:{broker.port}"}}'
        wait_until(lambda: metric(trusting, label) == 1, 20, what="connected over TLS")
        wait_until(lambda: "mqtt: cannot connect to" in doubting.log(), 20, what="the other CA's failure said")
        time.sleep(2.5)
        assert metric(doubting, label) == 0 and doubting.log().count("mqtt: cannot connect to") == 1
        log = doubting.log()
        assert "its certificate was not accepted" in log and "does --mqtt-ca hold the CA" in log, log
    finally:
        trusting.close()
        doubting.close()
        broker.stop()


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_a_broker_requiring_client_certificates_gets_ours_and_a_rotated_one_after_sighup(tmp_path):
    """A broker that requires client certificates (mosquitto's require_certificate; AWS IoT Core always does):
    --mqtt-cert/--mqtt-key signed by its CA is published to, under --mqtt-client-id; none is said to be wanted;
    one from another CA is said to be refused, and after the files are replaced and SIGHUP the next connection uses
    the new one. TLS 1.3 refuses a client certificate after the handshake: only paho's log line tells why."""
    ca, rogue = make_ca(tmp_path, "plant-ca"), make_ca(tmp_path, "rogue-ca")
    broker = Broker(tmp_path, tls=make_cert(tmp_path, ca, "broker", dns=["localhost"], ips=["127.0.0.1"]),
                    client_ca=ca)
    good = make_cert(tmp_path, ca, "detector", client=True)
    wrong = make_cert(tmp_path, rogue, "stranger", client=True)
    rotated = Pair(tmp_path / "rotated.crt", tmp_path / "rotated.key")
    shutil.copy(wrong.cert, rotated.cert)
    shutil.copy(wrong.key, rotated.key)
    url = ["--mqtt", f"mqtts://localhost:{broker.port}/mtls", "--mqtt-ca", str(ca.cert)]
    trusted = ServerProcess("--no-status", "--instances", "1", *url, "--mqtt-cert", str(good.cert),
                            "--mqtt-key", str(good.key), "--mqtt-client-id", "line1-detector")
    anonymous = ServerProcess("--no-status", "--instances", "1", *url)
    rotating = ServerProcess("--no-status", "--instances", "1", *url, "--mqtt-cert", str(rotated.cert),
                             "--mqtt-key", str(rotated.key))
    label = f'yolov12_mqtt_connected{{broker="localhost:{broker.port}"}}'
    try:
        wait_until(lambda: metric(trusted, label) == 1, 30, what="connected with its client certificate")
        assert "as line1-detector" in broker.log(), broker.log()
        wait_until(lambda: "mqtt: cannot connect" in anonymous.log(), 30, what="no certificate said")
        wait_until(lambda: "mqtt: cannot connect" in rotating.log(), 30, what="the stranger's refusal said")
        assert "it wants a client certificate" in anonymous.log() and "--mqtt-cert" in anonymous.log()
        assert "did not accept our client certificate" in rotating.log(), rotating.log()
        shutil.copy(good.cert, rotated.cert)
        shutil.copy(good.key, rotated.key)
        rotating.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: metric(rotating, label) == 1, 45, what="connected with the rotated certificate")
        assert "mqtt: TLS files reloaded" in rotating.log()
        for server in (anonymous, rotating):
            assert server.log().count("mqtt: cannot connect") == 1, server.log()  # said once, retried meanwhile
        assert metric(anonymous, label) == 0
    finally:
        for server in (trusted, anonymous, rotating):
            server.close()
        broker.stop()


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_client_certificate_files_that_cannot_work_are_one_line(tmp_path, capsys):
    """A key of another certificate, or an encrypted key (OpenSSL would ask for its passphrase on the terminal and
    hang a service), stops the server at start in one line naming the file."""
    from yolov12_serve.cli import main

    ca = make_ca(tmp_path, "plant-ca")
    one, other = make_cert(tmp_path, ca, "one", client=True), make_cert(tmp_path, ca, "other", client=True)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(one.key), "-aes256", "-passout", "pass:secret", "-out",
                    str(encrypted)], check=True)
    base = ["--engines", "x.onnx", "--gpus", "cpu", "--mqtt", "mqtts://broker"]
    for key, message in [(other.key, "does not belong to --mqtt-cert"), (encrypted, "is encrypted: give it")]:
        assert main([*base, "--mqtt-cert", str(one.cert), "--mqtt-key", str(key)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(key) in err and err.count("\n") == 1, err


def test_close_keeps_its_limit_while_a_connection_attempt_hangs(tmp_path):
    """A broker whose listen queue is full drops the SYN (as a firewall or a host gone does): paho sits in its 5 s
    connect timeout. close(timeout) must not wait for that (SIGTERM drains within ~5 s in all): paho's network thread
    is still in the attempt when close returns, and ends by itself after."""
    from yolov12_serve.fanout import Fanout
    from yolov12_serve.mqtt import MqttOptions, MqttPublisher

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(3):  # the accept queue full: further SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    fanout = Fanout()
    publisher = MqttPublisher(MqttOptions(f"mqtt://127.0.0.1:{port}"), fanout.subscribe(None, 8),
                              names=lambda r: {}, states=lambda: {})
    try:
        publisher.start()
        time.sleep(0.5)  # inside the first connection attempt (5 s)
        network = publisher._client._thread
        assert network is not None and network.is_alive()
        fanout.close_all()
        publisher.close(timeout=0.5)
        assert network.is_alive(), "close waited for paho's connection attempt to time out"
        network.join(10)
        assert not network.is_alive()
    finally:
        for s in [*fillers, full]:
            s.close()


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make the test certificates")
def test_a_port_that_takes_the_connection_but_is_no_plaintext_broker_is_said_once(tmp_path):
    """mqtt:// to a broker's TLS port (a usual slip: 8883 with mqtt://): TCP connects, the CONNECT is never answered
    as MQTT, and paho calls no on_connect_fail for it, only on_disconnect; said once all the same, retried."""
    ca = make_ca(tmp_path, "plant-ca")
    broker = Broker(tmp_path, tls=make_cert(tmp_path, ca, "broker", dns=["localhost"], ips=["127.0.0.1"]))
    server = ServerProcess("--no-status", "--instances", "1", "--mqtt", f"mqtt://127.0.0.1:{broker.port}")
    try:
        said = f"mqtt: cannot connect to 127.0.0.1:{broker.port}"
        wait_until(lambda: said in server.log(), 20, what="the failed connection said")
        time.sleep(2.5)  # retries 1 s apart meanwhile: said once
        log = server.log()
        assert log.count(said) == 1 and "is it a TLS port (mqtts://)" in log, log
        assert metric(server, f'yolov12_mqtt_connected{{broker="127.0.0.1:{broker.port}"}}') == 0
    finally:
        server.close()
        broker.stop()


@pytest.mark.parametrize("argv, message", [
    (["--mqtt", "http://broker"], "expected mqtt://HOST"),
    (["--mqtt", "mqtt://broker:99999"], "the port must be 1..65535"),
    (["--mqtt", "mqtt://broker/plant/#"], "without wildcards"),
    (["--mqtt-ca", "ca.pem"], "--mqtt-ca is for --mqtt"),
    (["--mqtt", "mqtt://broker", "--mqtt-ca", __file__], "--mqtt-ca is for TLS: give an mqtts:// URL"),
    (["--mqtt", "mqtts://broker", "--mqtt-ca", "/nonexistent/ca.pem"], "--mqtt-ca /nonexistent/ca.pem: no such"),
    (["--mqtt", "mqtt://broker", "--mqtt-credentials", "/nonexistent/creds"], "cannot read its credentials file"),
    (["--mqtt", "mqtt://u:pw@broker", "--mqtt-queue", "0"], "--mqtt-queue must be at least 1"),
    (["--mqtt-cert", "client.pem"], "--mqtt-cert is for --mqtt"),
    (["--mqtt", "mqtt://broker", "--mqtt-cert", __file__, "--mqtt-key", __file__], "give an mqtts:// URL"),
    (["--mqtt", "mqtts://broker", "--mqtt-cert", __file__], "--mqtt-cert and --mqtt-key go together: --mqtt-key"),
    (["--mqtt", "mqtts://broker", "--mqtt-cert", __file__, "--mqtt-key", __file__], "is not a certificate in PEM"),
    (["--mqtt", "mqtts://broker", "--mqtt-cert", "/nonexistent/c.pem", "--mqtt-key", __file__], "c.pem: no such"),
    (["--mqtt", "mqtt://broker", "--mqtt-client-id", "line 1"], "--mqtt-client-id 'line 1': 1 to 128 printable"),
    (["--mqtt-sparkplug", "plant"], "--mqtt-sparkplug is for --mqtt"),
    (["--mqtt", "mqtt://broker", "--mqtt-sparkplug", "plant+1"], "'plant+1': expected GROUP or GROUP/EDGE_NODE"),
    (["--mqtt", "mqtt://broker", "--mqtt-sparkplug", "plant/line/1"], "ids without '/', '+' or '#'"),
    (["--mqtt", "mqtt://broker", "--mqtt-sparkplug", "plant/#"], "ids without '/', '+' or '#'"),
    (["--mqtt", "mqtt://broker", "--mqtt-sparkplug", "/line1"], "ids without '/', '+' or '#'"),
    (["--mqtt", "mqtt://broker/plant", "--mqtt-sparkplug", "plant"], "give the broker's URL without a path"),
])
def test_bad_mqtt_options_are_one_line(argv, message, capsys):
    from yolov12_serve.cli import main

    assert main(["--engines", "x.onnx", "--gpus", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "pw@" not in err, err


# ---------------------------------------------------------------------------------------------- Sparkplug B
class SparkplugListener:
    """A Sparkplug host's view: every message under spBv1.0/GROUP/, decoded with the generated classes, in order
    as (message type, device or '', Payload)."""

    def __init__(self, port: int, group: str) -> None:
        import paho.mqtt.client as mqtt

        from yolov12_serve.proto import sparkplug_b_pb2

        self.pb = sparkplug_b_pb2
        self.messages: list[tuple[str, str, object]] = []
        self._types: dict[tuple[str, str], int] = {}  # (device or '', metric) -> data type of its last birth
        self.typed_data: list[tuple[str, str, str]] = []  # data messages' metrics that repeated their type
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(f"spBv1.0/{group}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "the Sparkplug listener did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        levels = message.topic.split("/")
        payload = self.pb.Payload()
        payload.ParseFromString(message.payload)
        kind, device = levels[2], levels[4] if len(levels) > 4 else ""
        with self._lock:
            self.messages.append((kind, device, payload))
            for m in payload.metrics:  # a host knows each metric's type from the birth (Sparkplug 3.0)
                if kind in ("NBIRTH", "DBIRTH"):
                    self._types[device, m.name] = m.datatype
                elif kind in ("NDATA", "DDATA") and m.HasField("datatype"):
                    self.typed_data.append((kind, device, m.name))  # "SHOULD NOT" be there

    def of(self, kind: str, device: str = "") -> list:
        with self._lock:
            return [p for k, d, p in self.messages if k == kind and d == device]

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(k == kind for k, _, _ in self.messages)

    def metrics(self, payload) -> dict[str, tuple[str, object]]:
        """{name: (data type name, value)}: a data message's types from the births, as a host reads them."""
        with self._lock:
            device = next((d for _, d, p in self.messages if p is payload), "")
            return {m.name: (self.pb.DataType.Name(m.datatype if m.HasField("datatype") else
                                                   self._types.get((device, m.name), 0)),
                             getattr(m, m.WhichOneof("value")))
                    for m in payload.metrics}

    def check_seqs(self) -> int:
        """seq 0 in each NBIRTH and one more (mod 256) in each message after it (NDEATH has none); how many
        numbered messages there were."""
        with self._lock:
            numbered = [(k, p.seq) for k, _, p in self.messages if k not in ("NDEATH", "NCMD")]
        assert numbered and numbered[0][0] == "NBIRTH", numbered[:3]
        for (_, before), (kind, seq) in itertools.pairwise(numbered):
            assert seq == (0 if kind == "NBIRTH" else (before + 1) % 256), (kind, before, seq)
        return len(numbered)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rebirth_command(pb) -> bytes:
    payload = pb.Payload(timestamp=int(time.time() * 1000))
    payload.metrics.add(name="Node Control/Rebirth", datatype=pb.DataType.Value("Boolean"), boolean_value=True)
    return payload.SerializeToString()


def test_sparkplug_server_births_its_cameras_answers_a_rebirth_and_dies_with_its_bdseq(tmp_path):
    """The real server with --mqtt-sparkplug: NBIRTH (seq 0, bdSeq, Node Control/Rebirth, Status) then a DBIRTH of
    the tracked camera of its streams file with every metric's name and type; DDATA as it streams; NCMD Rebirth:
    NBIRTH and DBIRTH again with the same bdSeq; a camera removed: DDEATH; SIGKILL: the broker's NDEATH carries the
    NBIRTH's bdSeq. seq numbers every message after each NBIRTH."""
    broker = Broker(tmp_path)
    host = SparkplugListener(broker.port, "plant")
    streams = tmp_path / "cameras.yaml"
    streams.write_text(f"streams:\n  - {{id: line/1, url: '{CAMERA}', track: true}}\n")
    server = ServerProcess("--allow-synthetic", "--no-status", "--instances", "1", "--streams", str(streams),
                           "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--mqtt-sparkplug", "plant/line1")
    try:
        births = wait_until(lambda: host.of("DBIRTH", "line_1"), 30, what="the camera's DBIRTH")
        nbirth = host.of("NBIRTH")[0]
        node = host.metrics(nbirth)
        assert nbirth.seq == 0 and node["Node Control/Rebirth"] == ("Boolean", False), node
        assert node["bdSeq"][0] == "Int64" and node["Status"][0] == "String", node
        device = host.metrics(births[0])
        expected = {"State": "String", "Streaming": "Boolean", "Fps": "Float", "LatencyP99Ms": "Float",
                    "Reconnects": "Int64", "PictureProblem": "String", "LastError": "String", "Objects": "Int64",
                    "LastObject/Class": "String", "LastObject/Score": "Float", "LastObject/TrackId": "Int64",
                    "LastObject/CaptureTime": "DateTime"}
        assert {k: t for k, (t, _) in device.items() if k in expected} == expected, device
        assert any(k.startswith("ObjectsByClass/") and t == "Int64" for k, (t, _) in device.items()), device
        assert all(m.timestamp > 1.6e12 for m in births[0].metrics) and births[0].timestamp > 1.6e12  # ms UTC
        wait_until(lambda: any(host.metrics(p).get("State") == ("String", "STREAMING") for p in
                               [births[-1], *host.of("DDATA", "line_1")]), 30, what="STREAMING")
        data = wait_until(lambda: [p for p in host.of("DDATA", "line_1") if "Objects" in host.metrics(p)], 30,
                          what="objects counted in a DDATA")
        assert host.metrics(data[-1])["Objects"][1] >= 1
        known = dict(device)
        for p in host.of("DDATA", "line_1"):  # report by exception: each names only what changed since
            changes = host.metrics(p)
            assert changes and not [k for k, v in changes.items() if known.get(k) == v], (changes, known)
            known.update(changes)

        host.client.publish("spBv1.0/plant/NCMD/line1", rebirth_command(host.pb), qos=0)
        wait_until(lambda: len(host.of("DBIRTH", "line_1")) >= 2, 10, what="the DBIRTH after the rebirth")
        again = host.of("NBIRTH")
        assert len(again) == 2 and again[1].seq == 0
        assert host.metrics(again[1])["bdSeq"] == node["bdSeq"]  # the same connection: the same bdSeq

        with server.client() as c:
            c.remove_stream("line/1")
        wait_until(lambda: host.of("DDEATH", "line_1"), 10, what="the camera's DDEATH")
        assert host.check_seqs() > 6
        label = 'yolov12_mqtt_messages_total{kind="%s"}'
        assert metric(server, label % "nbirth") == 2 and metric(server, label % "ddeath") == 1
        assert not [t for t, _, _ in host.messages if t not in ("NBIRTH", "DBIRTH", "DDATA", "DDEATH", "NDATA",
                                                                  "NCMD")]
        assert not host.typed_data, host.typed_data[:5]  # data messages leave the births' types out
        server.kill()
        death = wait_until(lambda: host.of("NDEATH"), 10, what="the broker's NDEATH (the last will)")
        assert host.metrics(death[0])["bdSeq"] == node["bdSeq"] and not death[0].HasField("seq")
    finally:
        server.close()
        host.close()
        broker.stop()


class FakeCamera:
    """What the Sparkplug publisher reads of a stream (camera_tags.py), set by the test."""

    def __init__(self, stream_id: str, epoch: int = 1) -> None:
        from yolov12_serve.sources import StreamState

        self.stream_id, self.epoch, self.tracker = stream_id, epoch, None
        self.state, self.reconnects, self.picture_problem, self.last_error = StreamState.STREAMING, 0, "", ""
        self.fps = 10.0

    def view(self):
        from types import SimpleNamespace

        return SimpleNamespace(fps=self.fps, latency_p99_ms=12.5)


def test_sparkplug_seq_wraps_cameras_come_and_go_and_a_reconnection_births_all_again(tmp_path, caplog):
    """The publisher alone, driven as the server drives it: 300 cameras make NBIRTH and 300 DBIRTHs, seq wrapping
    from 255 to 0; a camera's new state is a DDATA of that metric only; a camera removed is a DDEATH, one added a
    DBIRTH; the connection lost: the broker's NDEATH, then an NBIRTH with the next bdSeq and every DBIRTH again;
    closed: its own NDEATH."""
    from yolov12_serve.fanout import Fanout
    from yolov12_serve.mqtt import MqttOptions
    from yolov12_serve.sources import StreamState
    from yolov12_serve.sparkplug import SparkplugPublisher

    broker = Broker(tmp_path)
    host = SparkplugListener(broker.port, "g")
    cameras = {f"cam{i}": FakeCamera(f"cam{i}") for i in range(300)}
    fanout = Fanout()
    publisher = SparkplugPublisher(MqttOptions(f"mqtt://127.0.0.1:{broker.port}", sparkplug="g/edge"),
                                   fanout.subscribe(None, 8), streams=lambda: list(cameras.values()),
                                   status=lambda: "serving", names=lambda r: {}, class_names=lambda s: [])
    publisher.start()
    try:
        wait_until(lambda: host.count("DBIRTH") == 300, 20, what="300 DBIRTHs")
        assert [p.seq for p in host.of("DBIRTH", "cam299")] == [300 % 256]
        cameras["cam7"].state = StreamState.RECONNECTING
        wait_until(lambda: host.of("DDATA", "cam7"), 10, what="cam7's new state")
        assert host.metrics(host.of("DDATA", "cam7")[0]) == {"State": ("String", "RECONNECTING"),
                                                              "Streaming": ("Boolean", False)}
        del cameras["cam3"]
        cameras["new"] = FakeCamera("new")
        wait_until(lambda: host.of("DDEATH", "cam3") and host.of("DBIRTH", "new"), 10, what="DDEATH and DBIRTH")
        assert host.check_seqs() >= 303
        bdseq = host.metrics(host.of("NBIRTH")[0])["bdSeq"]
        assert bdseq == ("Int64", 0)
        # the connection lost (a client with its id takes it over, as a restarted server does): the broker sends
        # its will, and the publisher connects again
        import paho.mqtt.client as mqtt

        thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=publisher.client_id)
        with caplog.at_level("WARNING", logger="yolov12_serve.mqtt"):
            thief.connect("127.0.0.1", broker.port)
            thief.disconnect()
            wait_until(lambda: len(host.of("NBIRTH")) == 2 and host.count("DBIRTH") >= 600, 30,
                       what="the births after the connection came back")
        lost = next(r.getMessage() for r in caplog.records if "lost the connection" in r.getMessage())
        assert f"client id {publisher.client_id} " in lost and "--mqtt-sparkplug g/edge: " in lost \
            and "the births after it carry every value" in lost, lost
        assert [host.metrics(p)["bdSeq"] for p in host.of("NDEATH")] == [bdseq]  # the lost connection's will
        assert host.metrics(host.of("NBIRTH")[1])["bdSeq"][1] > bdseq[1]  # a new connection: the next bdSeq
        assert {d for k, d, _ in host.messages[-300:] if k == "DBIRTH"} == set(cameras)
        host.check_seqs()
        assert not host.typed_data, host.typed_data[:5]
        fanout.close_all()
        publisher.close()  # stopping on purpose: its own NDEATH, with the bdSeq of the NBIRTH it ends
        death = wait_until(lambda: len(host.of("NDEATH")) == 2 and host.of("NDEATH")[1], 10, what="the NDEATH")
        assert host.metrics(death)["bdSeq"] == host.metrics(host.of("NBIRTH")[1])["bdSeq"]
    finally:
        fanout.close_all()
        publisher.close()
        host.close()
        broker.stop()


def test_sparkplug_edge_node_defaults_to_the_host_name_or_the_replica():
    """GROUP alone: the host name is the edge node; replicas sharing the cameras get yolov12-serve-I each."""
    from yolov12_serve.sparkplug import resolve

    assert resolve("plant") == f"plant/{socket.gethostname()}"
    assert resolve("plant", 2) == "plant/yolov12-serve-2"
    assert resolve("plant/press-7", 2) == "plant/press-7"
