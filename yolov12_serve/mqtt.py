"""Detections published to an MQTT broker (`--mqtt`): what a plant's MES, SCADA or Node-RED flow takes without a gRPC
client, as DeepStream's message broker and Frigate's MQTT events do.

Topics under PREFIX (the URL's path; default `yolov12`), STREAM the camera id with '/', '+' and '#' as '_':
  PREFIX/status             `online` (retained) while the server runs; `offline` when it stops, or from the broker
                            (the connection's last will) when the server is gone; PREFIX/status/I for the replica
                            of --shard-index I when replicas share the cameras (--shard-count above 1)
  PREFIX/STREAM/state       the camera's state as JSON (retained): stream_id, state, last_error; cleared (an empty
                            retained message) when the camera is removed, and at each connection for cameras this
                            server (this shard) no longer has: removed while it was down (a camera taken out of
                            the streams file, then a restart), which would otherwise show their last state forever
  PREFIX/STREAM/detections  each result with detections, JSON as `yolov12-ctl watch --json` prints it (QoS 0: the
                            next one follows within a frame; not sent while the broker is away)
  PREFIX/STREAM/objects     each object of a tracked camera once, when first seen, JSON as `yolov12-ctl watch
                            --objects --json` (QoS 1: held in memory while the broker is away, up to --mqtt-queue)

TLS (mqtts://): the broker's certificate is checked with --mqtt-ca (or the system's CAs) and its name; a client
certificate (--mqtt-cert, --mqtt-key) for brokers that require one (mosquitto's require_certificate, AWS IoT Core,
HiveMQ). SIGHUP reads the client certificate again and adds --mqtt-ca's certificates (a CA rotation trusts both for a
while); the next connection uses them, the one open keeps its own. It reads --mqtt-credentials again too (a password
rotation): used from the next connection, and at once while the broker is refusing the ones in use. A file that
cannot be used leaves what is in use, one line saying why.

The publisher reads results from its own fan-out queue in its own thread: a slow or absent broker never holds up
results or watchers. What it loses is counted: yolov12_mqtt_messages_dropped_total{reason}, and results it fell
behind on as a watcher's (yolov12_watcher_results_dropped_total{watcher="mqtt HOST:PORT"}).

With --mqtt-sparkplug the same connection speaks Sparkplug B instead (sparkplug.py, a subclass of the publisher
here: its hooks are the last will, what a new session sends, the periodic tick, the results and the goodbye).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import ConfigError
from .fanout import Subscription
from .faultlog import FaultLog
from .frames import FrameResult
from .tls import load_key_pair, read_pem
from .urls import read_credentials, redact_url

__all__ = ["MqttOptions", "MqttPublisher", "client_tls_context", "topic_name"]

log = logging.getLogger(__name__)

STATE_EVERY_S = 1.0  # how often camera states are compared with what was last published
SWEEP_AFTER_S = 2.0  # after connecting: the broker's retained states have come by then (they follow the SUBACK)
_CLIENT_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII: what brokers take (AWS IoT: up to 128)


@dataclass(frozen=True)
class MqttOptions:
    """Where and how to publish: `mqtt://[USER[:PASSWORD]@]HOST[:PORT][/PREFIX]` (mqtts:// for TLS, with `ca` or
    the system's CAs, and a client certificate `cert` and `key` where the broker wants one)."""

    url: str
    ca: str | None = None
    queue: int = 10000  # QoS 1 messages held while the broker is away; more are dropped (counted)
    detections: bool = True  # PREFIX/CAMERA/detections too (off: objects and states only, a fraction of the cost)
    cert: str | None = None  # the client certificate (chain) shown to the broker, PEM
    key: str | None = None  # its private key, PEM, unencrypted
    client_id: str | None = None  # the MQTT client id (default: yolov12- and a hash unique to the process)
    credentials: str | None = None  # --mqtt-credentials, already in `url`: read again on SIGHUP
    sparkplug: str | None = None  # --mqtt-sparkplug GROUP/EDGE_NODE (the edge node resolved): Sparkplug B instead

    def __post_init__(self) -> None:
        self.target  # noqa: B018 (parsed now: a bad URL stops the server at start, not later)
        if self.queue < 1:
            raise ConfigError(f"--mqtt-queue must be at least 1, got {self.queue}")
        if self.ca is not None and not self.tls:
            raise ConfigError("--mqtt-ca is for TLS: give an mqtts:// URL")
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"--mqtt-cert and --mqtt-key go together: {'--mqtt-key' if self.cert else '--mqtt-cert'}"
                              " is missing")
        if self.cert is not None and not self.tls:
            raise ConfigError("--mqtt-cert is a TLS client certificate: give an mqtts:// URL")
        if self.client_id is not None and not _CLIENT_ID_RE.match(self.client_id):
            raise ConfigError(f"--mqtt-client-id {self.client_id!r}: 1 to 128 printable ASCII characters, no spaces")
        if self.sparkplug is not None:
            from .sparkplug import check_ids

            check_ids(self.sparkplug)
            if urlsplit(self.url).path.strip("/"):
                raise ConfigError(f"--mqtt {redact_url(self.url)}: with --mqtt-sparkplug the topics are "
                                  "spBv1.0/GROUP/...: give the broker's URL without a path (topic prefix)")

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def target(self) -> tuple[str, int, str, str | None, str | None]:
        """(host, port, topic prefix, user, password); ConfigError for a URL that is not one."""
        shown = redact_url(self.url)
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"--mqtt {shown}: expected mqtt://HOST[:PORT][/PREFIX] or mqtts://... (TLS)")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise ConfigError(f"--mqtt {shown}: the port must be 1..65535") from None
        prefix = parts.path.strip("/") or "yolov12"
        if parts.query or "#" in self.url or any(c in prefix for c in "+\0"):
            raise ConfigError(f"--mqtt {shown}: the path is the topic prefix, without wildcards (+ #), a query or "
                              "a fragment")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return parts.hostname, port, prefix, user, password

    @property
    def broker(self) -> str:
        """HOST:PORT, for logs and metric labels."""
        host, port, *_ = self.target
        return f"{host}:{port}"


def client_tls_context(options: MqttOptions) -> ssl.SSLContext:
    """The TLS settings of an mqtts:// connection: the broker checked with --mqtt-ca (else the system's CAs) and by
    name; the client certificate shown when one is given. ConfigError naming the file when one cannot be used."""
    if options.ca is None:
        ctx = ssl.create_default_context()  # the system's CAs
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the CA given only; names checked, a certificate required
        _load_ca(ctx, options.ca)
    if options.cert is not None and options.key is not None:
        _load_client_certificate(ctx, options.cert, options.key)
    return ctx


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    read_pem(ca, "--mqtt-ca", "CERTIFICATE")
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ConfigError(f"--mqtt-ca {ca}: {getattr(e, 'strerror', None) or e}") from None


def _load_client_certificate(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """`cert` and `key` into `ctx`; ConfigError saying which file is wrong and how."""
    read_pem(cert, "--mqtt-cert", "CERTIFICATE")
    read_pem(key, "--mqtt-key", "PRIVATE KEY")
    load_key_pair(ctx, cert, key, "--mqtt-cert", "--mqtt-key")


def _tls_failure(error: str, has_cert: bool) -> str:
    """What a TLS error from connecting to the broker means, and what to check ('' when it is no TLS error)."""
    found = re.search(r"\[SSL: ([A-Z0-9_]+)\] ([^(]+)", error)
    if not found:
        return ""
    code, text = found[1], found[2].strip()
    if "CERTIFICATE_VERIFY_FAILED" in code:
        return (f"its certificate was not accepted ({text}): does --mqtt-ca hold the CA that signed it, and is the "
                "URL's host a name in it?")
    if "CERTIFICATE_REQUIRED" in code or ("HANDSHAKE_FAILURE" in code and not has_cert):
        return f"it wants a client certificate ({text}): give --mqtt-cert and --mqtt-key"
    if any(k in code for k in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED",
                               "CERTIFICATE_REVOKED", "ACCESS_DENIED")):
        return (f"it did not accept our client certificate ({text}): is --mqtt-cert signed by a CA the broker "
                "trusts, and valid now?")
    return f"the TLS handshake failed ({text})"


class _PahoErrors(logging.Handler):
    """paho's error lines, the last one kept: a broker's TLS alert after the handshake (TLS 1.3 refuses a client
    certificate that way) reaches us only as paho's 'failed to receive on socket' line before the disconnect."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


def topic_name(stream_id: str) -> str:
    """A camera id as one topic level: the separator and wildcards become '_' (the id is in the message too)."""
    return stream_id.replace("/", "_").replace("+", "_").replace("#", "_")


class MqttPublisher:
    """Publishes a subscription's results, new objects and camera states to the broker, in a thread of its own.

    `names(result)`: the class names of the model that produced a result. `states()`: {stream id: (state name,
    last error)} of the cameras now. `owns(stream id)`: whether a camera is this server's (its shard's) to clear
    when gone; `settled()`: whether the cameras the server starts with are back (none is cleared before).
    `on_sent(kind)`, `on_dropped(reason)`, `on_connected(up)`: metrics."""

    def __init__(self, options: MqttOptions, subscription: Subscription,
                 names: Callable[[FrameResult], dict[int, str]], states: Callable[[], dict[str, tuple[str, str]]],
                 on_sent: Callable[[str], None] = lambda kind: None,
                 on_dropped: Callable[[str], None] = lambda reason: None,
                 on_connected: Callable[[bool], None] = lambda up: None, shard: str = "",
                 owns: Callable[[str], bool] = lambda stream_id: True,
                 settled: Callable[[], bool] = lambda: True) -> None:
        import paho.mqtt.client as mqtt

        from .client import NewObjects

        self.options = options
        host, port, self.prefix, user, password = options.target
        # replicas sharing the cameras (--shard-count) share the prefix: each says its own status
        self.status_topic = self.topic("status", shard) if shard else self.topic("status")
        self._sub, self._names, self._states = subscription, names, states
        self._owns, self._settled = owns, settled
        self._retained: dict[str, bytes] = {}  # PREFIX/+/state as the broker held them when we connected
        self._sweep_at = 0.0  # when to clear those of cameras gone (0: nothing to do)
        self._on_sent, self._on_dropped, self._on_connected = on_sent, on_dropped, on_connected
        self._objects = NewObjects()
        self._published_states: dict[str, tuple[str, str]] = {}
        self._next_states = 0.0  # when to compare the camera states again
        self._lock = threading.Lock()  # the published states, between this thread and paho's on_connect
        self._stop = threading.Event()
        self._connected = False
        self._refusal = ""  # the last reason the broker gave for refusing us (logged once per reason)
        self._relogin = False  # credentials were reloaded: their first refusal is logged whatever the reason
        self._retry = threading.Event()  # connect again now, not after paho's wait (refused, and new credentials)
        self._unreachable = False  # a failed connection attempt was logged (once until connected again)
        # connections lost: on change, not a line pair per drop (two servers given one client id flap each second)
        self._drops = FaultLog(log, "mqtt: %s", (options.broker,))
        # unique per process, and at most 23 characters: the length every MQTT 3.1.1 broker must accept
        unique = hashlib.sha1(f"{socket.gethostname()} {os.getpid()} {id(self)}".encode()).hexdigest()[:15]
        self.client_id = options.client_id or self._default_client_id(unique)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311)
        if user is not None:
            client.username_pw_set(user, password)
        self._tls: ssl.SSLContext | None = None
        if options.tls:
            self._tls = client_tls_context(options)
            client.tls_set_context(self._tls)
        self._paho_errors = _PahoErrors()
        paho_log = logging.Logger("paho", logging.ERROR)  # apart from logging's tree: paho's own lines stay quiet
        paho_log.addHandler(self._paho_errors)
        client.enable_logger(paho_log)
        self._client = client
        self._set_will()
        client.max_queued_messages_set(options.queue)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._connected_cb
        client.on_disconnect = self._disconnected_cb
        client.on_connect_fail = self._connect_failed_cb
        client.on_message = self._message_cb
        self._host, self._port = host, port
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    def topic(self, *levels: str) -> str:
        return "/".join((self.prefix, *levels))

    def _default_client_id(self, unique: str) -> str:
        """The client id without --mqtt-client-id: `unique` to the process (a hash, 15 characters)."""
        return f"yolov12-{unique}"

    def _while_away(self) -> str:
        """What happens to what is published while the broker is away, for the lost-connection line."""
        return f"objects are held (up to --mqtt-queue {self.options.queue}), detections are not sent meanwhile"

    def _same_id_hint(self) -> str:
        """What to change when another client takes over our client id, for the lost-connection line."""
        return "each server needs its own --mqtt-client-id"

    def _set_will(self) -> None:
        """The connection's last will, published by the broker when the server is gone: PREFIX/status offline."""
        self._client.will_set(self.status_topic, "offline", qos=1, retain=True)

    def _where(self) -> str:
        """Where it publishes, for the log line at start."""
        return f"under {self.prefix}/"

    def start(self) -> None:
        """Connect in the background (a broker that is down is retried, 1 s to 30 s apart) and start publishing."""
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()
        self._thread.start()
        log.info("mqtt: publishing to %s %s", redact_url(self.options.url), self._where())

    def reload_certificate(self) -> None:
        """SIGHUP: read --mqtt-cert and --mqtt-key again and add --mqtt-ca's certificates, for the next connection.
        ConfigError (what is in use stays) when a file is bad: checked on a context of its own first."""
        if self._tls is None or (self.options.cert is None and self.options.ca is None):
            return
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.options.ca is not None:
            _load_ca(trial, self.options.ca)
            _load_ca(self._tls, self.options.ca)
        if self.options.cert is not None and self.options.key is not None:
            _load_client_certificate(trial, self.options.cert, self.options.key)
            _load_client_certificate(self._tls, self.options.cert, self.options.key)
        log.info("mqtt: TLS files reloaded (%s), used from the next connection to %s",
                 ", ".join(f for f in (self.options.cert, self.options.ca) if f), self.options.broker)

    def reload_credentials(self) -> None:
        """SIGHUP: read --mqtt-credentials again, for the next connection; while the broker is refusing us (a
        password rotated there first), connect again now rather than after paho's wait (up to 30 s). ConfigError
        (the ones in use stay) when the file cannot be used."""
        if self.options.credentials is None:
            return
        user, password = read_credentials(self.options.credentials, "--mqtt")
        self._client.username_pw_set(user, password)
        self._relogin = True
        refused = bool(self._refusal) and not self._connected
        if refused:
            self._retry.set()
        log.info("mqtt: credentials reloaded from %s (user %s), %s %s", self.options.credentials, user,
                 "connecting again with them to" if refused else "used from the next connection to",
                 self.options.broker)

    def _connect_again(self) -> None:
        """Restart paho's network loop, which waits out its growing delay between attempts before it tries new
        credentials (its thread sees the stop within a second)."""
        client = self._client
        client.loop_stop()
        if self._stop.is_set():
            return  # closing: close() ends the connection
        if not self._connected:  # connected meanwhile (with the credentials before): that connection stays
            client.reconnect_delay_set(1, 30)  # the delay starts at 1 s again
            client.connect_async(self._host, self._port, keepalive=30)
        client.loop_start()

    def close(self, timeout: float = 2.0) -> None:
        """Publish what is queued and `offline` (retained) within `timeout` seconds, then disconnect (called once
        the subscription is closed: no result comes after)."""
        end = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(max(0.0, end - time.monotonic()))
        if self._connected:
            info = self._goodbye()
            with contextlib.suppress(Exception):  # the connection went meanwhile
                info.wait_for_publish(max(0.1, end - time.monotonic()))
        self._client.disconnect()
        # paho's loop_stop() joins its thread without a limit: one inside a connection attempt to a broker that
        # drops the SYN (or never finishes TLS) holds it for paho's 5 s connect timeout; the thread is a daemon
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.1, end - time.monotonic()))

    def _goodbye(self) -> Any:
        """What is published last when the server stops (`offline`, retained); its MQTTMessageInfo."""
        return self._client.publish(self.status_topic, "offline", qos=1, retain=True)

    # ------------------------------------------------------------------------------------------- paho's thread
    def _connected_cb(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if reason.is_failure:
            why = str(reason)
            if why != self._refusal or self._relogin:
                self._refusal = why
                log.error("mqtt: %s refused the connection%s: %s (check the user and password of --mqtt or "
                          "--mqtt-credentials); trying again", self.options.broker,
                          " with the reloaded credentials" if self._relogin else "", why)
            self._relogin = False
            return
        self._relogin = False
        self._refusal, self._unreachable = "", False
        self._paho_errors.last = ""  # an old outage's error must not explain a later one
        self._connected = True
        self._on_connected(True)
        if self._drops.failures:
            self._drops.ok("connected again")
        else:
            log.info("mqtt: connected to %s", self.options.broker)
        self._session_started(client)

    def _session_started(self, client: Any) -> None:
        """A connection is up (paho's thread): `online`, the states all sent again, the retained ones looked at."""
        client.publish(self.status_topic, "online", qos=1, retain=True)
        with self._lock:
            self._published_states.clear()  # a broker without persistence lost the retained states: sent again
            self._retained.clear()
            self._sweep_at = time.monotonic() + SWEEP_AFTER_S
        client.subscribe(self.topic("+", "state"), qos=1)  # the retained states, to clear those of cameras gone

    def _message_cb(self, client: Any, userdata: Any, message: Any) -> None:
        if message.retain and message.payload:  # held by the broker (not our own publications coming back)
            with self._lock:
                self._retained[message.topic] = message.payload

    def _connect_failed_cb(self, client: Any, userdata: Any) -> None:
        if not self._unreachable:
            self._unreachable = True
            error = sys.exc_info()[1]  # paho calls this inside its `except OSError` around the attempt
            why = (getattr(error, "strerror", None) or str(error) or type(error).__name__) if error else "no reason"
            tls = _tls_failure(f"{error}", self.options.cert is not None) if self.options.tls else ""
            log.warning("mqtt: cannot connect to %s: %s (trying again every 1 to 30 s)", self.options.broker,
                        tls or f"{why}: is the broker up and reachable there?")

    def _disconnected_cb(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if self._connected and not self._stop.is_set():
            why = str(reason)
            if why == "Unspecified error":  # paho's word for a connection that closed under it (MQTT 3.1.1 says none)
                why = (f"closed: the broker stopped, restarted or became unreachable, or another client connected with "
                       f"this client id {self.client_id} and the broker dropped us ({self._same_id_hint()})")
            self._drops.failed(f"lost the connection ({why})", f": reconnecting; {self._while_away()}")
        elif not self._connected and not self._stop.is_set() and not self._refusal and not self._unreachable:
            # TCP connected but no answer to CONNECT: the peer closed it (mqtt:// to a TLS port, not a broker; a
            # TLS 1.3 broker refusing our client certificate after the handshake) or never answered (a hung
            # broker; closed after the keepalive); paho calls no on_connect_fail for these
            self._unreachable = True
            refused = _tls_failure(self._paho_errors.last, self.options.cert is not None) if self.options.tls else ""
            if refused:
                log.warning("mqtt: cannot connect to %s: %s (trying again every 1 to 30 s)", self.options.broker,
                            refused)
            else:
                tls = "" if self.options.tls else "; is it a TLS port (mqtts://)"
                log.warning("mqtt: cannot connect to %s: it took the connection but never answered as an MQTT "
                            "broker (is one listening there%s?); trying again every 1 to 30 s", self.options.broker,
                            tls)
        self._connected = False
        self._on_connected(False)

    # ------------------------------------------------------------------------------------------- own thread
    def _run(self) -> None:
        while True:
            result = self._sub.get(timeout=0.25)
            if result is not None:
                try:
                    self._publish_result(result)
                except Exception:  # a bug here must not end publishing for good
                    log.exception("mqtt: a result of %s could not be published", result.stream_id)
            elif self._stop.is_set():
                return  # closing, and what was queued is out
            elif self._sub.closed:
                self._stop.wait(0.25)
            if self._retry.is_set() and not self._stop.is_set():
                self._retry.clear()
                self._connect_again()
            if not self._stop.is_set():
                self._tick()

    def _tick(self) -> None:
        """After each result, and at least every 0.25 s: the camera states compared every STATE_EVERY_S, the retained
        states of cameras gone cleared once the server has settled."""
        if time.monotonic() >= self._next_states:
            self._next_states = time.monotonic() + STATE_EVERY_S
            self._publish_states()
            if self._sweep_at and time.monotonic() >= self._sweep_at and self._settled():
                self._sweep()

    def _publish_result(self, result: FrameResult) -> None:
        from .client import message_dict, object_dict
        from .messages import frame_detections

        if result.error or not len(result.detections):
            return
        tracked = result.track_ids is not None and bool(result.track_ids.any())
        if not (self.options.detections or tracked):
            return
        fd = frame_detections(result, self._names(result))
        level = topic_name(fd.stream_id)
        if self.options.detections:
            self._send("detections", self.topic(level, "detections"), json.dumps(message_dict(fd)), qos=0)
        for d in self._objects.new(fd):
            self._send("objects", self.topic(level, "objects"), json.dumps(object_dict(fd, d)), qos=1)

    def _publish_states(self) -> None:
        now = self._states()
        with self._lock:
            changed = {sid: s for sid, s in now.items() if self._published_states.get(sid) != s}
            removed = [sid for sid in self._published_states if sid not in now]
        for sid, (state, error) in changed.items():
            payload = json.dumps({"stream_id": sid, "state": state, "last_error": error})
            if self._send("state", self.topic(topic_name(sid), "state"), payload, qos=1, retain=True):
                with self._lock:
                    self._published_states[sid] = (state, error)
        for sid in removed:
            self._objects.forget(sid)
            if self._send("state", self.topic(topic_name(sid), "state"), "", qos=1, retain=True):
                with self._lock:
                    self._published_states.pop(sid, None)

    def _sweep(self) -> None:
        """Clear the retained states of this server's cameras that it no longer has: removed while it was down.
        A state whose camera is another shard's, or that is no state of ours (not JSON with a stream_id naming its
        topic), is left; so is a topic one of the cameras now shares (ids differing only in / + # _)."""
        with self._lock:
            retained, self._retained, self._sweep_at = self._retained, {}, 0.0
        self._client.unsubscribe(self.topic("+", "state"))
        ours = {self.topic(topic_name(sid), "state") for sid in self._states()}
        for topic, payload in retained.items():
            try:
                sid = json.loads(payload).get("stream_id")
            except (ValueError, AttributeError):
                continue
            if (not isinstance(sid, str) or topic in ours or topic != self.topic(topic_name(sid), "state")
                    or not self._owns(sid)):
                continue
            if self._send("state", topic, "", qos=1, retain=True):
                log.info("mqtt: cleared the retained state of camera %s (removed while this server was down)", sid)

    def _send(self, kind: str, topic: str, payload: str | bytes, qos: int, retain: bool = False) -> bool:
        import paho.mqtt.client as mqtt

        if not self._connected and qos == 0:
            self._on_dropped("disconnected")
            return False
        rc = self._client.publish(topic, payload, qos=qos, retain=retain).rc
        if rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and rc == mqtt.MQTT_ERR_NO_CONN):  # the latter held for later
            self._on_sent(kind)
            return True
        self._on_dropped("queue full" if rc == mqtt.MQTT_ERR_QUEUE_SIZE else "disconnected")
        return False
