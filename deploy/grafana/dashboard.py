"""Writes deploy/grafana/dashboards/yolov12-serve.json, the Grafana dashboard of yolov12-serve (stdlib only).

    python deploy/grafana/dashboard.py           # regenerate the checked-in JSON after editing this file

The JSON is checked in (Grafana provisioning reads it as is); tests/test_deploy.py fails when it is not what
this script writes, and the live test runs every panel's queries against a real Prometheus scraping a real
server. Panels read the recording rules of deploy/prometheus/rules where the alerts read the same figure, so a
graph and the alert about it never disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "yolov12-serve.json"
UID = "yolov12-serve"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
STREAM_SEL = f'{SEL},stream=~"$stream"'
DEVICE_SEL = f'{SEL},device=~"$device"'


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, **extra}


def panel(kind: str, title: str, targets: list[dict[str, Any]], grid: tuple[int, int, int, int],
          description: str = "", unit: str = "", **extra: Any) -> dict[str, Any]:
    """A panel at grid (x, y, w, h) with its queries; refIds are assigned in order."""
    x, y, w, h = grid
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    given = extra.pop("fieldConfig", {})
    defaults = {"unit": unit} if unit else {}
    defaults.update(given.get("defaults", {}))
    field_config = {"defaults": defaults, "overrides": given.get("overrides", [])}
    return {"type": kind, "title": title, "description": description, "datasource": DS, "targets": targets,
            "gridPos": {"x": x, "y": y, "w": w, "h": h}, "fieldConfig": field_config, **extra}


def row(title: str, y: int) -> dict[str, Any]:
    """A row header across the dashboard."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}


def slo_line() -> dict[str, Any]:
    """The SLO as a red dashed line (query B.. of the latency panels)."""
    return target(f"max(yolov12_slo_seconds{{{SEL}}})", "SLO")


SLO_OVERRIDE = {"matcher": {"id": "byName", "options": "SLO"},
                "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                               {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                               {"id": "custom.lineWidth", "value": 2}]}


def latency_panel(level: str, grid: tuple[int, int, int, int]) -> dict[str, Any]:
    """p50/p95/p99 per stream or device (recording rules of the alerts) with the SLO line."""
    sel = STREAM_SEL if level == "stream" else DEVICE_SEL
    targets = [target(f"{level}:yolov12_frame_latency_seconds:{q}_5m{{{sel}}}", f"{{{{{level}}}}} {q}")
               for q in ("p99", "p95", "p50")]
    return panel("timeseries", f"Latency per {level}: p50 / p95 / p99 against the SLO", [*targets, slo_line()], grid,
                 f"Ingest to publish, quantiles over 5 minutes per {level} (recording rules "
                 f"{level}:yolov12_frame_latency_seconds:pNN_5m); the red dashed line is the SLO (--slo-ms).",
                 "s", fieldConfig={"overrides": [SLO_OVERRIDE]})


def build() -> dict[str, Any]:
    """The dashboard model."""
    panels = [
        row("Latency", 0),
        latency_panel("stream", (0, 1, 12, 9)),
        latency_panel("device", (12, 1, 12, 9)),
        panel("heatmap", "Latency heatmap (selected streams and devices)",
              [target(f"sum by (le) (stream_device:yolov12_frame_latency_seconds_bucket:rate5m{{{STREAM_SEL},"
                      'device=~"$device"})', "{{le}}", format="heatmap")],
              (0, 10, 12, 8), "Frames per second in each latency bucket; the buckets are dense around the SLO.",
              options={"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1,
                       "color": {"scheme": "Oranges", "mode": "scheme"}}),
        panel("timeseries", "Latency SLO: share of frames late, and error budget burn rate",
              [target(f"instance:yolov12_frame_slo_errors:ratio_rate5m{{{SEL}}}", "{{instance}} late (5m)"),
               target(f"instance:yolov12_frame_slo_errors:ratio_rate1h{{{SEL}}}", "{{instance}} late (1h)"),
               target(f"instance:yolov12_frame_slo_errors:ratio_rate1h{{{SEL}}} / 0.01",
                      "{{instance}} burn rate (1h)")],
              (12, 10, 12, 8), "Frames published after the SLO or dropped late, as a share of all (left), and the "
              "1h burn rate of the 1% budget (right: 14.4 pages within 5 minutes, 1 spends it in 30 days).",
              "percentunit",
              fieldConfig={"overrides": [{"matcher": {"id": "byRegexp", "options": ".*burn rate.*"},
                                          "properties": [{"id": "unit", "value": "x"},
                                                         {"id": "custom.axisPlacement", "value": "right"}]}]}),
        row("Frames", 18),
        panel("timeseries", "Frames per second per stream: ingested and published",
              [target(f"sum by (stream) (rate(yolov12_frames_total{{{STREAM_SEL}}}[$__rate_interval]))",
                      "{{stream}} in"),
               target(f"sum by (stream) (rate(yolov12_frames_processed_total{{{STREAM_SEL}}}[$__rate_interval]))",
                      "{{stream}} published")],
              (0, 19, 12, 8), "Frames decoded or received, and frames whose detections were published.", "fps"),
        panel("timeseries", "Drops by reason",
              [target(f"sum by (stream, reason) (rate(yolov12_frames_dropped_total{{{STREAM_SEL}}}"
                      "[$__rate_interval]))", "{{stream}} {{reason}}"),
               target(f"sum by (instance) (rate(yolov12_subscriber_results_dropped_total{{{SEL}}}"
                      "[$__rate_interval]))", "{{instance}} results a slow subscriber lost")],
              (12, 19, 12, 8), "superseded: a newer frame of the camera replaced it (the camera is faster than "
              "its share); late: it could no longer meet the SLO; error: its engine run failed; removed: its "
              "stream was removed.", "fps"),
        panel("timeseries", "Batch size per device: mean and p95",
              [target(f"device:yolov12_batch_size:mean_rate5m{{{DEVICE_SEL}}}", "{{device}} mean"),
               target(f"histogram_quantile(0.95, sum by (device, le) (rate(yolov12_batch_size_bucket"
                      f"{{{DEVICE_SEL}}}[$__rate_interval])))", "{{device}} p95")],
              (0, 27, 8, 8), "Frames per engine run: the scheduler picks the largest batch that still meets the "
              "earliest deadline.", "short"),
        panel("timeseries", "Engine run time per device (p99)",
              [target(f"device:yolov12_inference_seconds:p99_5m{{{DEVICE_SEL}}}", "{{device}} p99")],
              (8, 27, 8, 8), "Engine.infer per batch, 99th percentile over 5 minutes.", "s"),
        panel("timeseries", "Queue depth and frames in flight per device",
              [target(f"yolov12_queue_depth{{{DEVICE_SEL}}}", "{{device}} waiting"),
               target(f"yolov12_frames_in_flight{{{DEVICE_SEL}}}", "{{device}} in the engine")],
              (16, 27, 8, 8), "Frames waiting in stream mailboxes, and frames inside an engine run.", "short"),
        row("Streams and devices", 35),
        panel("timeseries", "Streams by state",
              [target(f"sum by (state) (yolov12_streams{{{SEL}}})", "{{state}}")],
              (0, 36, 8, 8), "Registered streams in each state (CONNECTING, STREAMING, RECONNECTING, STOPPED, "
              "FAILED).", "short",
              fieldConfig={"defaults": {"custom": {"stacking": {"mode": "normal"}, "fillOpacity": 30}}}),
        panel("table", "Stream states now",
              [target(f"yolov12_stream_state{{{STREAM_SEL}}} == 1", "", instant=True, range=False,
                      format="table")],
              (8, 36, 8, 8), "Each selected stream's current state (Yolov12StreamNotStreaming pages when one is "
              "not STREAMING for 2 minutes).",
              transformations=[{"id": "organize", "options": {
                  "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                  "indexByName": {"stream": 0, "state": 1, "instance": 2}}}]),
        panel("timeseries", "Reconnects and corrupt packets per minute per stream",
              [target(f"sum by (stream) (rate(yolov12_stream_reconnects_total{{{STREAM_SEL}}}[$__rate_interval]))"
                      " * 60", "{{stream}} reconnects"),
               target(f"sum by (stream) (rate(yolov12_stream_corrupt_packets_total{{{STREAM_SEL}}}"
                      "[$__rate_interval])) * 60", "{{stream}} corrupt packets")],
              (16, 36, 8, 8), "Camera reconnect attempts (lost, failed or stalled), and video packets its decoder "
              "rejected as corrupt (skipped: the camera stays connected, the frames they belong to are damaged).",
              "short"),
        panel("state-timeline", "Device health",
              [target(f"yolov12_device_healthy{{{DEVICE_SEL}}}", "{{instance}} {{device}}")],
              (0, 44, 8, 8), "Whether each device's engine works (a failing device's streams move to the others).",
              fieldConfig={"defaults": {"mappings": [{"type": "value", "options": {
                  "0": {"text": "unhealthy", "color": "red"}, "1": {"text": "healthy", "color": "green"}}}]}}),
        panel("timeseries", "GPU utilisation",
              [target(f"yolov12_gpu_utilization_ratio{{{DEVICE_SEL}}}", "{{instance}} {{device}}")],
              (8, 44, 8, 8), "GPU busy fraction from NVML (GPU servers with nvidia-ml-py).", "percentunit",
              fieldConfig={"defaults": {"min": 0, "max": 1}}),
        panel("timeseries", "GPU memory",
              [target(f"yolov12_gpu_memory_used_bytes{{{DEVICE_SEL}}}", "{{device}} used"),
               target(f"yolov12_gpu_memory_total_bytes{{{DEVICE_SEL}}}", "{{device}} total")],
              (16, 44, 8, 8), "GPU memory in use and its size (NVML); Yolov12GPUMemoryNearFull fires over 95%.",
              "bytes"),
        row("Detections", 52),
        panel("timeseries", "Detections per minute by class",
              [target(f"sum by (class) (rate(yolov12_detections_total{{{STREAM_SEL}}}[$__rate_interval])) * 60",
                      "{{class}}")],
              (0, 53, 12, 8), "What the model finds on the selected streams, per class: the defect rate of the "
              "line (a jump or a drop to zero is worth a look).", "short"),
        panel("timeseries", "Detections per minute per stream",
              [target(f"sum by (stream) (rate(yolov12_detections_total{{{STREAM_SEL}}}[$__rate_interval])) * 60",
                      "{{stream}}")],
              (12, 53, 12, 8), "Detections of every class on each selected stream.", "short"),
        panel("state-timeline", "Camera picture",
              [target(f"max by (instance, stream) (yolov12_stream_picture_problem{{{STREAM_SEL}}})",
                      "{{instance}} {{stream}}")],
              (0, 61, 24, 6), "Cameras that stream but show nothing: blank (covered, dark, dead sensor) or frozen "
              "(one frame repeated) for --blind-after-s; Yolov12CameraPictureLost pages a minute later.",
              fieldConfig={"defaults": {"mappings": [{"type": "value", "options": {
                  "0": {"text": "no problem seen", "color": "green"},
                  "1": {"text": "blank or frozen", "color": "red"}}}]}}),
        panel("timeseries", "Objects per minute by stream and class",
              [target(f"sum by (stream, class) (rate(yolov12_objects_total{{{STREAM_SEL}}}[$__rate_interval])) * 60",
                      "{{stream}} {{class}}")],
              (0, 67, 24, 8), "Parts and defects on cameras that track objects (AddStream track): each object once, "
              "however many frames show it (parts per minute; a defect rate per part).", "short"),
        panel("timeseries", "Evidence pictures per minute: written, and objects left without one",
              [target(f"sum by (instance) (rate(yolov12_evidence_pictures_total{{{SEL}}}[$__rate_interval])) * 60",
                      "{{instance}} written"),
               target(f"sum by (instance, reason) (rate(yolov12_evidence_skipped_total{{{SEL}}}"
                      "[$__rate_interval])) * 60", "{{instance}} none: {{reason}}")],
              (0, 75, 24, 8), "Pictures of counted objects written to --evidence-dir (servers with one), and objects "
              "counted without a picture by reason: write failed and busy are the disk's (Yolov12EvidenceNotWritten "
              "opens a ticket), no picture and not in its pictures the camera's.", "short"),
    ]
    for i, p in enumerate(panels, start=1):
        p["id"] = i

    def variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
                "multi": True, "includeAll": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    return {
        "uid": UID, "title": "yolov12-serve", "tags": ["yolov12-serve"], "timezone": "", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-3h", "to": "now"},
        "description": "Latency against the SLO, frames, drops, batches, queues, streams and devices of "
                       "yolov12-serve (deploy/grafana/dashboard.py writes this file).",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "refresh": 1},
            variable("instance", "Server", "label_values(yolov12_slo_seconds, instance)"),
            variable("stream", "Stream", 'label_values(yolov12_frames_total{instance=~"$instance"}, stream)'),
            variable("device", "Device", 'label_values(yolov12_queue_depth{instance=~"$instance"}, device)'),
        ]},
        "annotations": {"list": [{"name": "Alerts", "type": "dashboard", "builtIn": 1, "enable": True,
                                  "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "iconColor": "rgba(0, 211, 255, 1)", "hide": True}]},
        "links": [], "panels": panels,
    }


def render() -> str:
    """The JSON text as checked in."""
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    """Write the JSON (or, with --check, exit 1 when the checked-in file differs)."""
    text = render()
    if "--check" in sys.argv[1:]:
        return 0 if OUT.read_text() == text else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
