"""Prometheus metrics (prometheus-client, own registry) and the /metrics HTTP endpoint.

Names are a contract (docs/serving.md lists them): yolov12_frame_latency_seconds{stream,device} (buckets dense around
the SLO), yolov12_inference_seconds{device}, yolov12_batch_size{device}, yolov12_frames_total{stream},
yolov12_frames_processed_total{stream,device}, yolov12_frames_dropped_total{stream,reason},
yolov12_detections_total{stream,class} (a class's series from its first detection),
yolov12_objects_total{stream,class} (objects on cameras that track them, each counted once),
yolov12_stream_reconnects_total{stream}, yolov12_stream_corrupt_packets_total{stream} (skipped, no reconnect),
yolov12_streams{state}, yolov12_queue_depth{device}, yolov12_slo_seconds, yolov12_frames_in_flight{device};
device faults: yolov12_device_healthy{device},
yolov12_engine_failures_total{device} (failed batches), yolov12_engine_hangs_total{device},
yolov12_worker_errors_total{device}, yolov12_worker_restarts_total{device} (device processes),
yolov12_stream_moves_total{reason} (failover, rebalance); evidence: yolov12_evidence_pictures_total,
yolov12_evidence_skipped_total{reason}; --mqtt: yolov12_mqtt_connected{broker}, yolov12_mqtt_messages_total{kind},
yolov12_mqtt_messages_dropped_total{reason}; --opcua: yolov12_opcua_sessions{endpoint}; and with
NVML yolov12_gpu_utilization_ratio /
yolov12_gpu_memory_{used,total}_bytes. Read at scrape time for the shipped alerts (deploy/prometheus):
yolov12_stream_state{stream,state} (1 for the stream's current state, 0 for the others, as kube-state-metrics
does), yolov12_stream_picture_problem{stream,problem} (1 while a camera's picture is blank or frozen).
Watchers: yolov12_subscriber_results_dropped_total (all, past ones too), and per connected watcher
yolov12_watcher_results_dropped_total{watcher} and yolov12_watcher_queued_results{watcher} (label '<n> <peer>',
removed when it disconnects).
Per-stream series are removed when the stream is removed (no growth over a long run). /metrics renders in short
stretches with pauses between (PacedScrape), so that a scrape does not hold back the frames being served.
"""

from __future__ import annotations

import contextlib
import copy
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .devices import GpuTelemetry
from .errors import ConfigError
from .picture_check import PROBLEMS

__all__ = ["LiveSnapshot", "Metrics", "PacedScrape", "StreamSeries", "slo_buckets"]

DROP_REASONS = ("superseded", "late", "error", "removed")  # the only values of frames_dropped_total{reason}
STATES = ("CONNECTING", "STREAMING", "RECONNECTING", "STOPPED", "FAILED")
SCRAPE_WORK_S = 0.001  # a scrape renders this long at a stretch, then pauses SCRAPE_PAUSE_S (PacedScrape)
SCRAPE_PAUSE_S = 0.003
SCRAPE_MAX_S = 5.0  # ... until the scrape has taken this long


def slo_buckets(slo_s: float) -> list[float]:
    """Latency buckets dense around the SLO (every 10% from 0.5x to 1.5x) with a coarse tail either side."""
    factors = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0]
    return sorted({round(slo_s * f, 6) for f in factors})


@dataclass
class LiveSnapshot:
    """Gauges read at scrape time from the running server."""

    streams_by_state: dict[str, int] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)  # device -> frames waiting in mailboxes
    in_flight: dict[str, int] = field(default_factory=dict)  # device -> frames running
    stream_states: dict[str, str] = field(default_factory=dict)  # stream -> state name (STATES)
    picture_problems: dict[str, str] = field(default_factory=dict)  # stream -> "", "blank" or "frozen"
    device_healthy: dict[str, bool] = field(default_factory=dict)  # device -> takes streams
    watcher_queued: dict[str, int] = field(default_factory=dict)  # watcher label -> results waiting for it


@dataclass(frozen=True)
class StreamSeries:
    """The per-frame series of one stream on one device."""

    frames: Any
    processed: Any
    latency: Any


class _BeforeScrape(Collector):
    """Runs a callback at the start of every scrape (counts kept outside the counters are added to them) and
    yields no metric, or those of `then` after it."""

    def __init__(self, callback: Callable[[], None], then: Collector | None = None) -> None:
        self._callback, self._then = callback, then

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Any]:
        self._callback()
        return [] if self._then is None else self._then.collect()


class PacedScrape(Collector):
    """The registry as /metrics reads it, its rendering spread out: after every `work_s` of it the scrape sleeps
    `pause_s` (so it takes at most a quarter of the interpreter lock), until it has taken `max_s` (Prometheus
    gives up on a scrape after 10 s by default). Rendering holds the lock throughout (prometheus-client formats
    ~20 us a series, 37 series a camera: 0.12 s at 190 cameras, 0.45-0.6 s at 760 on the 2-core AMD EPYC VM,
    more beside the frames being served), and a scrape served at once held those frames back. One process,
    128 cameras, 3,200 frames/s, scraped every 2 s (bench/scrape.py): frames over the SLO or dropped late
    62.5 +- 3.9 a second at once, 11.3 +- 3.1 paced, 7.6 +- 1.9 unscraped; a scrape takes 0.31 s instead of
    0.15 (1.2 s instead of 0.5 at 380 cameras). Families and samples are the registry's, unchanged, each
    family read as the rendering reaches it (counters taken a second apart still rate the same)."""

    def __init__(self, registry: Collector, work_s: float = SCRAPE_WORK_S, pause_s: float = SCRAPE_PAUSE_S,
                 max_s: float = SCRAPE_MAX_S, sleep: Callable[[float], None] = time.sleep,
                 before_some: Callable[[], None] | None = None) -> None:
        self._registry, self.work_s, self.pause_s, self.max_s, self._sleep = registry, work_s, pause_s, max_s, sleep
        self._before_some = before_some  # what a scrape of some series only runs first (see restricted_registry)

    def collect(self) -> Iterator[Any]:
        start = since = time.perf_counter()

        def breathe() -> None:
            nonlocal since
            t = time.perf_counter()
            if t - since >= self.work_s and t - start < self.max_s:
                self._sleep(self.pause_s)
                since = time.perf_counter()

        for family in self._registry.collect():
            paced = copy.copy(family)
            paced.samples = _paced(family.samples, breathe)  # both encoders read a family's samples once, in order
            yield paced

    def restricted_registry(self, names: Iterable[str]) -> PacedScrape:
        """What a scrape asking for some series only (`?name[]=...`) reads, paced the same. prometheus-client
        collects only the named metrics' collectors then, so Metrics' `before_scrape` (the counts kept outside
        the counters added to them) is run here first: without it such a scrape read yolov12_frames_total as
        the last full scrape left it."""
        some = self._registry.restricted_registry(names)
        if self._before_some is not None:
            some = _BeforeScrape(self._before_some, then=some)
        return PacedScrape(some, self.work_s, self.pause_s, self.max_s, self._sleep)


def _paced(samples: Iterable[Any], breathe: Callable[[], None], every: int = 16) -> Iterator[Any]:
    for i, sample in enumerate(samples):
        if not i % every:  # the clock read every `every` samples (~0.3 ms of formatting)
            breathe()
        yield sample


class _LiveCollector(Collector):
    def __init__(self, snapshot: Callable[[], LiveSnapshot], gpus: GpuTelemetry | None) -> None:
        self._snapshot = snapshot
        self._gpus = gpus

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self._snapshot()
        streams = GaugeMetricFamily("yolov12_streams", "Registered streams by state.", labels=["state"])
        for state in STATES:
            streams.add_metric([state], snap.streams_by_state.get(state, 0))
        yield streams
        depth = GaugeMetricFamily("yolov12_queue_depth", "Frames waiting in stream mailboxes, per device.",
                                  labels=["device"])
        for dev, n in sorted(snap.queue_depth.items()):
            depth.add_metric([dev], n)
        yield depth
        running = GaugeMetricFamily("yolov12_frames_in_flight", "Frames inside the engine now, per device.",
                                    labels=["device"])
        for dev, n in sorted(snap.in_flight.items()):
            running.add_metric([dev], n)
        yield running
        per_stream = GaugeMetricFamily("yolov12_stream_state", "1 for each stream's current state, 0 for the others.",
                                       labels=["stream", "state"])
        for sid, current in sorted(snap.stream_states.items()):
            for state in STATES:
                per_stream.add_metric([sid, state], 1 if state == current else 0)
        yield per_stream
        blind = GaugeMetricFamily("yolov12_stream_picture_problem", "1 while a camera's picture has been blank "
                                  "(covered, dark, dead sensor) or frozen (one frame repeated) for --blind-after-s "
                                  "though frames keep coming, 0 otherwise.", labels=["stream", "problem"])
        for sid, current in sorted(snap.picture_problems.items()):
            for problem in PROBLEMS:
                blind.add_metric([sid, problem], 1 if problem == current else 0)
        yield blind
        healthy = GaugeMetricFamily("yolov12_device_healthy", "1 while a device's engine works and it takes streams, "
                                    "0 once it failed or hung (its streams moved to the healthy devices).",
                                    labels=["device"])
        for dev, ok in sorted(snap.device_healthy.items()):
            healthy.add_metric([dev], 1.0 if ok else 0.0)
        yield healthy
        queued = GaugeMetricFamily("yolov12_watcher_queued_results", "Results waiting to be sent to each connected "
                                   "watcher (WatchDetections, WatchDetectionBatches): one near its queue's size is "
                                   "about to lose results.", labels=["watcher"])
        for label, n in sorted(snap.watcher_queued.items()):
            queued.add_metric([label], n)
        yield queued
        if self._gpus is None:
            return
        samples = self._gpus.sample()
        if not samples:
            return
        util = GaugeMetricFamily("yolov12_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["device"])
        used = GaugeMetricFamily("yolov12_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["device"])
        total = GaugeMetricFamily("yolov12_gpu_memory_total_bytes", "GPU memory size (NVML).", labels=["device"])
        for s in samples:
            util.add_metric([s.device], s.utilization)
            used.add_metric([s.device], s.memory_used_bytes)
            total.add_metric([s.device], s.memory_total_bytes)
        yield from (util, used, total)


class Metrics:
    """All server metrics in one registry; `serve(port)` exposes them at /metrics."""

    def __init__(self, slo_s: float, devices: list[str], max_batch: int = 64,
                 snapshot: Callable[[], LiveSnapshot] | None = None,
                 before_scrape: Callable[[], None] | None = None) -> None:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # the *_created series double the exposition and nobody graphs them
        self.registry = r = CollectorRegistry()
        self.scrape = PacedScrape(r, before_some=before_scrape)  # what /metrics renders, spread out
        if before_scrape is not None:  # registered first: collected (run) before every other metric
            r.register(_BeforeScrape(before_scrape))
        self.devices = list(devices)
        self.frame_latency = Histogram(
            "yolov12_frame_latency_seconds", "Ingest (frame decoded or received) to publish, per stream and device.",
            ["stream", "device"], buckets=slo_buckets(slo_s), registry=r)
        self.inference = Histogram(
            "yolov12_inference_seconds", "Engine.infer run time per batch.", ["device"],
            buckets=[0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                     0.2, 0.3, 0.5, 1.0, 2.0], registry=r)
        sizes = range(1, max_batch + 1) if max_batch <= 16 else {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, max_batch}
        self.batch_size = Histogram("yolov12_batch_size", "Frames per engine batch.", ["device"],
                                    buckets=sorted(s for s in sizes if s <= max(max_batch, 1)), registry=r)
        self.frames = Counter("yolov12_frames", "Frames ingested (decoded from a camera or received).",
                              ["stream"], registry=r)
        self.frames_processed = Counter("yolov12_frames_processed", "Frames whose detections were published.",
                                        ["stream", "device"], registry=r)
        self.frames_dropped = Counter("yolov12_frames_dropped", "Frames dropped before publishing, by reason.",
                                      ["stream", "reason"], registry=r)
        self.detections = Counter("yolov12_detections", "Detections published, per stream and class (a defect rate "
                                  "per line); a class's series appears with its first detection.",
                                  ["stream", "class"], registry=r)
        self._detected: dict[tuple[str, str], Any] = {}
        self.objects = Counter("yolov12_objects", "Objects seen on cameras that track them (AddStream track), per "
                               "stream and class: each counted once, when seen in a second frame (parts per minute).",
                               ["stream", "class"], registry=r)
        self._objects: dict[tuple[str, str], Any] = {}
        self.reconnects = Counter("yolov12_stream_reconnects", "Camera reconnect attempts (lost, failed or stalled).",
                                  ["stream"], registry=r)
        self.corrupt_packets = Counter("yolov12_stream_corrupt_packets", "Video packets a camera's decoder rejected "
                                       "as corrupt (damaged on the network), skipped without a reconnect.",
                                       ["stream"], registry=r)
        self.evidence_written = Counter("yolov12_evidence_pictures",
                                        "Pictures of counted objects written to --evidence-dir.", registry=r)
        self.evidence_skipped = Counter("yolov12_evidence_skipped", "Counted objects with no picture written, by "
                                        "reason: no picture (camera down), not in its pictures (it left or "
                                        "flickered), busy (the writer fell behind), write failed (disk full?).",
                                        ["reason"], registry=r)
        self.mqtt_connected = Gauge("yolov12_mqtt_connected", "1 while the connection to the --mqtt broker is up, "
                                    "0 while it is being retried.", ["broker"], registry=r)
        self.mqtt_messages = Counter("yolov12_mqtt_messages", "Messages handed to the --mqtt broker connection, by "
                                     "kind: detections, objects, state (objects and states held while it is away); "
                                     "with --mqtt-sparkplug nbirth, ndata, ndeath, dbirth, ddata, ddeath.",
                                     ["kind"], registry=r)
        self.mqtt_dropped = Counter("yolov12_mqtt_messages_dropped", "Messages not sent to the --mqtt broker, by "
                                    "reason: disconnected (detections while it is away), queue full (objects and "
                                    "states past --mqtt-queue while it is away).", ["reason"], registry=r)
        self.opcua_sessions = Gauge("yolov12_opcua_sessions", "OPC UA sessions open on the --opcua server (PLCs, "
                                    "SCADA): 0 when the plant's clients are not connected.", ["endpoint"], registry=r)
        self.results_dropped = Counter("yolov12_subscriber_results_dropped",
                                       "Results a slow subscriber lost (its own oldest), summed over subscribers.",
                                       registry=r)
        self.watcher_results_dropped = Counter(
            "yolov12_watcher_results_dropped", "Results one connected watcher lost because it read too slowly (its "
            "oldest first), labelled '<n> <peer>'; the series goes when the watcher disconnects (the sum over all, "
            "past watchers too: yolov12_subscriber_results_dropped_total).", ["watcher"], registry=r)
        self._watchers: dict[str, Any] = {}
        self.slo = Gauge("yolov12_slo_seconds", "The latency objective, ingest to publish.", registry=r)
        self.slo.set(slo_s)
        self.engine_failures = Counter("yolov12_engine_failures", "Batches whose Engine.infer raised.", ["device"],
                                       registry=r)
        self.engine_hangs = Counter("yolov12_engine_hangs", "Engine runs declared hung (no answer by their deadline).",
                                    ["device"], registry=r)
        self.worker_errors = Counter("yolov12_worker_errors", "Exceptions caught in a device worker outside the engine "
                                     "call (the thread goes on).", ["device"], registry=r)
        self.worker_restarts = Counter("yolov12_worker_restarts", "Device processes started again after they ended "
                                       "unasked (--worker-processes).", ["device"], registry=r)
        self.stream_moves = Counter("yolov12_stream_moves", "Streams moved to another device, by reason: failover (its "
                                    "device failed or hung) or rebalance (its device stayed over capacity).",
                                    ["reason"], registry=r)
        for reason in ("failover", "rebalance"):
            self.stream_moves.labels(reason)
        self._runs: dict[str, tuple[Any, Any]] = {}
        for dev in self.devices:
            self.runs(dev)
            for counter in (self.engine_failures, self.engine_hangs, self.worker_errors, self.worker_restarts):
                counter.labels(dev)
        self._gpus = GpuTelemetry(self.devices)
        r.register(_LiveCollector(snapshot or LiveSnapshot, self._gpus))
        self._http = None
        self._tls_context: ssl.SSLContext | None = None  # /metrics over HTTPS: what the next handshake uses
        self._series: dict[tuple[str, str], StreamSeries] = {}
        self._dropped: dict[tuple[str, str], Any] = {}

    def series(self, stream: str, device: str) -> StreamSeries:
        """A stream's per-frame series on a device, looked up once (label lookups cost ~10 us each per frame)."""
        key = (stream, device)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = StreamSeries(self.frames.labels(stream),
                                                     self.frames_processed.labels(stream, device),
                                                     self.frame_latency.labels(stream, device))
        return found

    def runs(self, device: str) -> tuple[Any, Any]:
        """A device's (run time, batch size) histograms, looked up once."""
        found = self._runs.get(device)
        if found is None:
            found = self._runs[device] = (self.inference.labels(device), self.batch_size.labels(device))
        return found

    def dropped(self, stream: str, reason: str) -> Any:
        """A stream's drop counter for `reason`, looked up once (a camera under overload drops about a frame per
        result, in the worker that picks)."""
        found = self._dropped.get((stream, reason))
        if found is None:
            found = self._dropped[(stream, reason)] = self.frames_dropped.labels(stream, reason)
        return found

    def detected(self, stream: str, class_name: str) -> Any:
        """A stream's detection counter for one class, looked up once."""
        found = self._detected.get((stream, class_name))
        if found is None:
            found = self._detected[(stream, class_name)] = self.detections.labels(stream, class_name)
        return found

    def counted(self, stream: str, class_name: str) -> Any:
        """A tracked stream's object counter for one class, looked up once."""
        found = self._objects.get((stream, class_name))
        if found is None:
            found = self._objects[(stream, class_name)] = self.objects.labels(stream, class_name)
        return found

    def watcher_dropped(self, label: str) -> Any:
        """A connected watcher's loss counter (created by `add_watcher`)."""
        found = self._watchers.get(label)
        if found is None:
            found = self._watchers[label] = self.watcher_results_dropped.labels(label)
        return found

    def add_mqtt(self, broker: str, kinds: tuple[str, ...] = ("detections", "objects", "state")) -> None:
        """Create the MQTT series at zero (their rates exist from the start); `kinds`: the messages it sends
        (Sparkplug B's message types with --mqtt-sparkplug)."""
        self.mqtt_connected.labels(broker).set(0)
        for kind in kinds:
            self.mqtt_messages.labels(kind)
        for reason in ("disconnected", "queue full"):
            self.mqtt_dropped.labels(reason)

    def add_evidence(self) -> None:
        """--evidence-dir: create the skipped series at zero, so that increase() sees the first picture not written
        (an alert on a series that appears at its first increment misses that increment)."""
        for reason in ("no picture", "not in its pictures", "busy", "write failed"):
            self.evidence_skipped.labels(reason)

    def add_watcher(self, label: str) -> None:
        """Create a watcher's loss counter at zero (its rate exists from the start)."""
        self.watcher_dropped(label)

    def forget_watcher(self, label: str) -> None:
        """Remove a disconnected watcher's series (their number stays that of the watchers connected)."""
        self._watchers.pop(label, None)
        _remove(self.watcher_results_dropped, (label,))

    def add_stream(self, stream_id: str) -> None:
        """Create a stream's series at zero so rates exist from the start."""
        self.frames.labels(stream_id)
        self.reconnects.labels(stream_id)
        self.corrupt_packets.labels(stream_id)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(stream_id, reason)

    def forget_stream(self, stream_id: str) -> None:
        """Remove every series labelled with this stream (called when it is removed)."""
        for cache, metric in ((self._detected, self.detections), (self._objects, self.objects)):
            for key in [k for k in list(cache) if k[0] == stream_id]:
                cache.pop(key, None)
                _remove(metric, key)
        for cache in (self._series, self._dropped):  # list(): one step, while workers may add keys
            for key in [k for k in list(cache) if k[0] == stream_id]:
                cache.pop(key, None)
        for metric, labelsets in ((self.frames, [(stream_id,)]), (self.reconnects, [(stream_id,)]),
                                  (self.corrupt_packets, [(stream_id,)])):
            for labels in labelsets:
                _remove(metric, labels)
        for dev in self.devices:
            _remove(self.frame_latency, (stream_id, dev))
            _remove(self.frames_processed, (stream_id, dev))
        for reason in DROP_REASONS:
            _remove(self.frames_dropped, (stream_id, reason))

    def serve(self, port: int, host: str = "0.0.0.0", certfile: str | None = None, keyfile: str | None = None,
              client_cafile: str | None = None) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port (port 0: any free one). With
        `certfile` and `keyfile` it speaks HTTPS; with `client_cafile` too, scrapers must present a certificate
        signed by that CA."""
        from prometheus_client import start_http_server

        tls = {"certfile": certfile, "keyfile": keyfile, "client_cafile": client_cafile,
               "client_auth_required": client_cafile is not None} if certfile else {}
        try:
            httpd, _thread = start_http_server(port, addr=host, registry=self.scrape, **tls)
        except ssl.SSLError as e:
            raise ConfigError(f"cannot serve metrics over HTTPS with {certfile}: {e.reason or e}") from None
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}; pick another with "
                          "--metrics-port (0: any free port, -1: off)") from None
        self._http = httpd
        context = getattr(httpd.socket, "context", None)
        if context is not None:  # each handshake takes the context of the latest reload (reload_certificate)
            self._tls_context = context
            context.sni_callback = self._use_latest_context
        return int(httpd.server_port)

    def _use_latest_context(self, sock: ssl.SSLSocket, _server_name: str | None, context: ssl.SSLContext) -> None:
        """Called for every TLS handshake (with or without SNI): the connection gets the current context."""
        if self._tls_context is not context:
            sock.context = self._tls_context

    def reload_certificate(self, certfile: str, keyfile: str, client_cafile: str | None = None) -> None:
        """Use new certificate files for the next HTTPS connections (SIGHUP); ConfigError when they are bad. A fresh
        context each time: loading a client CA into the one in use would add to the CAs it trusts, never drop one."""
        old = self._tls_context
        if old is None:
            return
        from .tls import load_key_pair

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_key_pair(context, certfile, keyfile)  # an encrypted key: ConfigError, not a prompt on the terminal
        try:
            if client_cafile:
                context.load_verify_locations(cafile=client_cafile)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"metrics certificate {certfile} not reloaded: {getattr(e, 'reason', None) or e}") \
                from None
        context.verify_mode = old.verify_mode
        context.minimum_version = old.minimum_version
        self._tls_context = context

    def stop(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def exposition(self) -> bytes:
        """The text a scrape would return (tests and the demo summary use it)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _remove(metric, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
