"""Sparkplug B on the --mqtt connection (`--mqtt-sparkplug GROUP[/EDGE_NODE]`): Ignition's MQTT Engine and other
Sparkplug host applications (HiveMQ, Cirrus Link, Canary, N3uron) find the server as an edge node and each camera as
a device, their values as tags, with nothing configured (Eclipse Sparkplug 3.0).

Topics spBv1.0/GROUP/TYPE/EDGE_NODE[/DEVICE], DEVICE the camera id with '/', '+' and '#' as '_':
  NBIRTH  at each connection and each rebirth: bdSeq (Int64), Node Control/Rebirth (Boolean, false; writable by
          NCMD), Status (String: starting, serving, unhealthy, draining)
  NDATA   Status when it changes
  NDEATH  the connection's last will (QoS 1, not retained), with the bdSeq of the NBIRTH it ends; published by us
          too when the server stops
  DBIRTH  per camera after the NBIRTH, and when a camera is added: every metric with its name, type and value
  DDATA   the metrics that changed (report by exception): states at once (looked at every STATES_EVERY_S), rates
          (Fps, LatencyP99Ms) at most every RATES_EVERY_S, a tracked camera's objects as they are counted
  DDEATH  when a camera is removed (and before the DBIRTH of an id added again)
  NCMD    read: `Node Control/Rebirth` true sends NBIRTH and every DBIRTH again

Device metrics: State (String), Streaming (Boolean), Fps (Float), LatencyP99Ms (Float), Reconnects (Int64),
PictureProblem (String: '', blank, frozen), LastError (String); on tracked cameras Objects (Int64),
ObjectsByClass/<class> (Int64), LastObject/Class (String), LastObject/Score (Float), LastObject/TrackId (Int64),
LastObject/CaptureTime (DateTime): the values the OPC UA server shows (camera_tags.py). Every message names its
metrics (no aliases: a few more bytes a message, and a host needs no alias table to read one).

seq is 0 in NBIRTH and one more (mod 256) in each message after it; bdSeq is one more at each connection attempt
(the will of each CONNECT carries it, and the NBIRTH of that connection repeats it). Every Sparkplug message but
NDEATH is QoS 0 and none is retained: while the broker is away nothing is queued, and the births at the next
connection carry every value. The default client id is derived from GROUP/EDGE_NODE, so a restarted server takes
over its old session and the broker sends the old NDEATH before the new NBIRTH (two servers must not share an edge
node id). Commands to devices (DCMD) and a primary host's STATE are not acted on: every metric is read-only.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .camera_tags import ObjectTally, camera_rates, camera_states
from .errors import ConfigError
from .fanout import Subscription
from .frames import FrameResult
from .mqtt import MqttOptions, MqttPublisher, topic_name

__all__ = ["KINDS", "NAMESPACE", "SparkplugPublisher", "check_ids", "resolve"]

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
STATES_EVERY_S = 0.25  # camera states and the server's status compared this often
RATES_EVERY_S = 1.0  # Fps and LatencyP99Ms sent at most this often per camera
KINDS = ("nbirth", "ndata", "ndeath", "dbirth", "ddata", "ddeath")  # yolov12_mqtt_messages_total{kind}
REBIRTH = "Node Control/Rebirth"
_RESERVED = ("/", "+", "#")


def check_ids(spec: str, edge_node: bool = True) -> None:
    """ConfigError (one line) unless `spec` is GROUP/EDGE_NODE (GROUP alone where not `edge_node`), each a non-empty
    id without Sparkplug's reserved characters '/', '+' and '#' (nor NUL, which no MQTT topic may hold)."""
    parts = spec.split("/")
    if len(parts) not in ((1, 2) if not edge_node else (2,)) or not all(parts) or \
            any(c in part for part in parts for c in ("+", "#", "\0")):
        raise ConfigError(f"--mqtt-sparkplug {spec!r}: expected GROUP or GROUP/EDGE_NODE, ids without '/', '+' or "
                          "'#' (Sparkplug's reserved characters)")


def resolve(value: str, shard_index: int | None = None) -> str:
    """--mqtt-sparkplug GROUP[/EDGE_NODE] as GROUP/EDGE_NODE: the edge node defaults to the host name, or to
    yolov12-serve-I for replica I of several (--shard-count above 1), so that replicas are edge nodes of their own.
    ConfigError for ids that cannot be."""
    check_ids(value, edge_node=False)
    if "/" not in value:
        edge = f"yolov12-serve-{shard_index}" if shard_index is not None else topic_name(socket.gethostname())
        value = f"{value}/{edge}"
        check_ids(value)
    return value


@dataclass
class _Camera:
    """A camera as its device: its incarnation, its device id (None while another camera holds it), the metrics
    of its last DBIRTH and their values last sent, and its objects."""

    epoch: int
    tracked: bool
    device: str | None = None
    born: bool = False  # a DBIRTH went out on this connection
    classes: tuple[str, ...] = ()  # ObjectsByClass metrics of its DBIRTH
    sent: dict[str, Any] = field(default_factory=dict)
    tally: ObjectTally = field(default_factory=ObjectTally)


class SparkplugPublisher(MqttPublisher):
    """The server as a Sparkplug B edge node, each camera a device (above), on MqttPublisher's connection.

    `streams()`: the registered streams (core.streams()); `status()`: the server's status word; `names(result)`: the
    class names of the model that produced a result; `class_names(stream)`: the classes a tracked camera counts
    (an ObjectsByClass metric for each in its DBIRTH). `on_sent(kind)` counts each message by type (KINDS)."""

    def __init__(self, options: MqttOptions, subscription: Subscription, streams: Callable[[], list[Any]],
                 status: Callable[[], str], names: Callable[[FrameResult], dict[int, str]],
                 class_names: Callable[[Any], list[str]], on_sent: Callable[[str], None] = lambda kind: None,
                 on_dropped: Callable[[str], None] = lambda reason: None,
                 on_connected: Callable[[bool], None] = lambda up: None) -> None:
        from .proto import sparkplug_b_pb2

        assert options.sparkplug is not None
        self.group, self.edge_node = options.sparkplug.split("/")
        self._pb = sparkplug_b_pb2
        self._streams, self._status_word, self._class_names = streams, status, class_names
        self._bdseq = -1  # the bdSeq of the last CONNECT's will (one more at each attempt, from 0)
        self._session_bdseq = 0  # ... of the connection up now: its NBIRTHs repeat it
        self._seq = 0
        self._birth_due = threading.Event()  # a connection came, or NCMD asked for a rebirth
        self._born = False  # an NBIRTH went out on this connection
        self._node_sent: dict[str, Any] = {}
        self._cameras: dict[str, _Camera] = {}
        self._owners: dict[str, str] = {}  # device id -> the camera that has it
        self._warned: set[str] = set()
        self._next_rates = 0.0
        super().__init__(options, subscription, names, states=lambda: {}, on_sent=on_sent, on_dropped=on_dropped,
                         on_connected=on_connected)

    def node_topic(self, kind: str, device: str | None = None) -> str:
        """spBv1.0/GROUP/KIND/EDGE_NODE[/DEVICE]."""
        return "/".join((NAMESPACE, self.group, kind, self.edge_node, *((device,) if device is not None else ())))

    # ------------------------------------------------------------------------------- MqttPublisher's hooks
    def _default_client_id(self, unique: str) -> str:
        # the same for the same edge node: a restart takes over the old session (its NDEATH sent at once, before
        # the new NBIRTH, rather than after the broker's keepalive); 23 characters, as every broker takes
        return "spB-" + hashlib.sha1(f"{self.group}/{self.edge_node}".encode()).hexdigest()[:19]

    def _while_away(self) -> str:
        return "nothing is queued meanwhile: the births after it carry every value"

    def _same_id_hint(self) -> str:
        if self.options.client_id:
            return "each server needs its own --mqtt-client-id"
        return (f"the client id comes from --mqtt-sparkplug {self.group}/{self.edge_node}: a restart of this server "
                "does this once; over and over, another server has this edge node id: give each its own EDGE_NODE")

    def _set_will(self) -> None:
        self._client.on_pre_connect = self._pre_connect

    def _where(self) -> str:
        return f"as Sparkplug B edge node {self.group}/{self.edge_node} ({NAMESPACE}/{self.group}/...)"

    def _pre_connect(self, client: Any, userdata: Any) -> None:
        """Before each CONNECT (paho's thread): the next bdSeq, in the NDEATH that is its will."""
        self._bdseq = (self._bdseq + 1) % 256
        client.will_set(self.node_topic("NDEATH"), self._death(self._bdseq), qos=1, retain=False)

    def _session_started(self, client: Any) -> None:
        self._born = False
        self._session_bdseq = self._bdseq
        client.subscribe(self.node_topic("NCMD"), qos=1)  # before the NBIRTH, as the specification asks
        self._birth_due.set()  # sent from our own thread, which numbers every message

    def _disconnected_cb(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        self._born = False
        super()._disconnected_cb(client, userdata, flags, reason, properties)

    def _message_cb(self, client: Any, userdata: Any, message: Any) -> None:
        if message.topic != self.node_topic("NCMD"):
            return
        command = self._pb.Payload()
        try:
            command.ParseFromString(message.payload)
        except Exception:  # protobuf's DecodeError: not Sparkplug B
            log.warning("mqtt: an NCMD that is no Sparkplug B payload (%d bytes) was ignored", len(message.payload))
            return
        if any(m.name == REBIRTH and m.WhichOneof("value") == "boolean_value" and m.boolean_value
               for m in command.metrics):
            log.info("mqtt: Sparkplug rebirth asked for (NCMD %s): NBIRTH and every DBIRTH again", REBIRTH)
            self._birth_due.set()

    def _goodbye(self) -> Any:
        """NDEATH (QoS 1) before disconnecting, as Sparkplug asks of an edge node that goes on purpose."""
        self._on_sent("ndeath")
        return self._client.publish(self.node_topic("NDEATH"), self._death(self._session_bdseq), qos=1, retain=False)

    def _publish_result(self, result: FrameResult) -> None:
        if result.track_ids is None or result.error or not len(result.track_ids):
            return  # the cost of an untracked camera's result: this look
        cam = self._cameras.get(result.stream_id)
        if cam is None or cam.epoch != result.epoch:
            return  # added since the last look (its DBIRTH comes at the next): counted from its DBIRTH on
        cam.tally.count(result, self._names)  # sent with the next states (within STATES_EVERY_S)

    def _tick(self) -> None:
        """Births when due; then, every STATES_EVERY_S, the cameras looked at: DBIRTH, DDEATH, DDATA."""
        if self._birth_due.is_set() and self._connected:
            self._birth_due.clear()
            self._birth()
        if not self._born or time.monotonic() < self._next_states:
            return
        self._next_states = time.monotonic() + STATES_EVERY_S
        rates = time.monotonic() >= self._next_rates
        if rates:
            self._next_rates = time.monotonic() + RATES_EVERY_S
        self._report(rates)

    # ------------------------------------------------------------------------------- messages
    def _payload(self, seq: bool = True) -> Any:
        payload = self._pb.Payload()
        payload.timestamp = int(time.time() * 1000)
        if seq:
            payload.seq = self._seq
        return payload

    def _metric(self, payload: Any, name: str, value: Any, typed: bool = True) -> None:
        """A metric with its name, type (by name, as _TYPES says) and value, stamped with the payload's time. Not
        `typed` in NDATA and DDATA: the type is the birth's, and Sparkplug 3.0 says data messages should not repeat
        it."""
        pb = self._pb.DataType
        kind = pb.Value(_TYPES.get(name, "Int64"))
        m = payload.metrics.add()
        m.name, m.timestamp = name, payload.timestamp
        if typed:
            m.datatype = kind
        if kind in (pb.Int64, pb.UInt64):
            m.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF  # Int64 as its two's complement, as Sparkplug says
        elif kind == pb.DateTime:
            m.long_value = int(value * 1000)  # seconds -> ms since the epoch
        elif kind == pb.Float:
            m.float_value = value
        elif kind == pb.Boolean:
            m.boolean_value = value
        else:
            m.string_value = value

    def _death(self, bdseq: int) -> bytes:
        payload = self._payload(seq=False)
        self._metric(payload, "bdSeq", bdseq)
        return payload.SerializeToString()

    def _publish(self, kind: str, payload: Any, device: str | None = None) -> bool:
        """Send a numbered message (QoS 0, not retained); the next seq when it went out."""
        sent = self._send(kind.lower(), self.node_topic(kind, device), payload.SerializeToString(), qos=0)
        if sent:
            self._seq = (self._seq + 1) % 256
        return sent

    def _birth(self) -> None:
        """NBIRTH (seq 0, this connection's bdSeq), then a DBIRTH per camera."""
        self._seq = 0
        payload = self._payload()
        status = self._status_word()
        self._metric(payload, "bdSeq", self._session_bdseq)
        self._metric(payload, REBIRTH, False)
        self._metric(payload, "Status", status)
        if not self._publish("NBIRTH", payload):
            return  # the connection went: the next one births again
        self._born = True
        self._node_sent = {"Status": status}
        for cam in self._cameras.values():
            cam.born = False
        self._next_rates = 0.0
        self._report(True)

    def _report(self, rates: bool) -> None:
        """The cameras now against those born: DDEATH for those gone, DBIRTH for those new (or not born on this
        connection), DDATA with what changed of the others; NDATA when the status changed."""
        status = self._status_word()
        if status != self._node_sent.get("Status"):
            payload = self._payload()
            self._metric(payload, "Status", status, typed=False)
            if self._publish("NDATA", payload):
                self._node_sent["Status"] = status
        streams = {s.stream_id: s for s in self._streams()}
        for sid, cam in list(self._cameras.items()):
            if sid not in streams or streams[sid].epoch != cam.epoch:
                self._forget(sid, cam)
        for sid, s in streams.items():
            cam = self._cameras.get(sid)
            if cam is None:
                cam = self._cameras[sid] = _Camera(s.epoch, s.tracker is not None)
            if cam.device is None and not self._claim(sid, cam):
                continue
            values = self._values(s, cam, rates or not cam.born)
            if not cam.born or (cam.tracked and set(cam.tally.by_class) - set(cam.classes)):
                self._device_birth(s, cam, values)  # a class not in its DBIRTH: born again with it
                continue
            changed = {k: v for k, v in values.items() if cam.sent.get(k) != v}
            if changed:
                payload = self._payload()
                for name, value in changed.items():
                    self._metric(payload, name, value, typed=False)
                if self._publish("DDATA", payload, cam.device):
                    cam.sent.update(changed)

    def _claim(self, sid: str, cam: _Camera) -> bool:
        """The camera's device id, unless another camera has it ('a/b' and 'a_b'): said once, tried again later."""
        device = topic_name(sid)
        owner = self._owners.get(device)
        if owner is not None and owner != sid:
            if sid not in self._warned:
                self._warned.add(sid)
                log.warning("mqtt: camera %s is no Sparkplug device: its device id %s is camera %s's (ids that differ "
                            "only in '/', '+', '#' and '_' share one); give it another id", sid, device, owner)
            return False
        self._owners[device] = sid
        cam.device = device
        return True

    def _forget(self, sid: str, cam: _Camera) -> None:
        if cam.born and cam.device is not None:
            self._publish("DDEATH", self._payload(), cam.device)
        if cam.device is not None:
            self._owners.pop(cam.device, None)
        del self._cameras[sid]

    def _device_birth(self, stream: Any, cam: _Camera, values: dict[str, Any]) -> None:
        if cam.tracked:
            cam.classes = tuple(dict.fromkeys([*cam.classes, *self._class_names(stream), *cam.tally.by_class]))
            values.update({f"ObjectsByClass/{c}": cam.tally.by_class.get(c, 0) for c in cam.classes})
        payload = self._payload()
        for name, value in values.items():
            self._metric(payload, name, value)
        if self._publish("DBIRTH", payload, cam.device):
            cam.born, cam.sent = True, dict(values)

    def _values(self, stream: Any, cam: _Camera, rates: bool) -> dict[str, Any]:
        """The device's metrics now; rates only when `rates` (else left out: not compared)."""
        values: dict[str, Any] = camera_states(stream)
        if rates:
            values.update(camera_rates(stream))
        if cam.tracked:
            tally, last = cam.tally, cam.tally.last
            values["Objects"] = tally.objects
            values.update({f"ObjectsByClass/{c}": n for c, n in tally.by_class.items()})
            values["LastObject/Class"] = last.class_name if last else ""
            values["LastObject/Score"] = last.score if last else 0.0
            values["LastObject/TrackId"] = last.track_id if last else 0
            values["LastObject/CaptureTime"] = last.capture_time_s if last else 0.0
        return values


_TYPES = {"bdSeq": "Int64", REBIRTH: "Boolean", "Status": "String", "State": "String", "Streaming": "Boolean",
          "Fps": "Float", "LatencyP99Ms": "Float", "Reconnects": "Int64", "PictureProblem": "String",
          "LastError": "String", "Objects": "Int64", "LastObject/Class": "String", "LastObject/Score": "Float",
          "LastObject/TrackId": "Int64", "LastObject/CaptureTime": "DateTime"}  # ObjectsByClass/<class>: Int64
