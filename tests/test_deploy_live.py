"""The shipped monitoring, live and with real parts: the real server (demo cameras, loopback), a real Prometheus
(Debian's `prometheus`) scraping it with deploy/prometheus's config and rules, and a real Alertmanager (Debian's
`prometheus-alertmanager`) with deploy/alertmanager's config, notifying a webhook receiver in this test.

The copies of the config differ from the shipped files only where a test must: targets and ports on loopback,
scrapes and rule evaluations every second, Alertmanager waiting a second instead of minutes before it notifies,
and every duration in the rules (range windows and `for`) divided by 60, so the 1h/5m burn-rate pair becomes
60s/5s and the alert that pages after minutes pages after seconds.

(1) every expression of every dashboard panel and every recording rule returns at least one series;
(2) a server started with an SLO it cannot meet (--slo-ms 1, --process-late) fires Yolov12LatencyBudgetBurn,
which reaches the webhook's "page" receiver; the same server restarted with an SLO it meets resolves it.
GPU series need NVML, absent here: a second target serves them from the server's own metrics collector
(metrics.Metrics) with its NVML reader replaced by fixed readings, so the GPU panels and rules are exercised on
the exposition the server writes on a GPU machine.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_server_harness import ROOT, ServerProcess, wait_until

DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"),
    pytest.mark.skipif(ALERTMANAGER is None,
                       reason="alertmanager not installed (apt-get install prometheus-alertmanager)"),
    pytest.mark.timeout(300),
]

SCALE = 60  # every duration in the rules is divided by this
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def scale_durations(text: str, factor: int = SCALE) -> str:
    """Rules text with every range window `[5m]` and every `for: 2m` divided by `factor` (at least 1 s)."""

    def scaled(amount: str, unit: str) -> str:
        return f"{max(1, int(amount) * _UNITS[unit] // factor)}s"

    text = re.sub(r"\[(\d+)([smhdw])\]", lambda m: f"[{scaled(m.group(1), m.group(2))}]", text)
    return re.sub(r"(\bfor:\s*)(\d+)([smhdw])\b", lambda m: m.group(1) + scaled(m.group(2), m.group(3)), text)


def test_scale_durations():
    assert scale_durations("rate(x[5m]) and rate(y[1h])\n        for: 2m\n") == \
        "rate(x[5s]) and rate(y[60s])\n        for: 2s\n"
    assert scale_durations("increase(z[3d]) name:ratio_rate5m") == "increase(z[4320s]) name:ratio_rate5m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webhook:
    """An Alertmanager webhook receiver: every notification (path, JSON body) in `received`."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str, status: str, **labels: str) -> list[dict]:
        """Alerts of notifications sent to `path` with this status whose labels include `labels`."""
        return [a for p, body in list(self.received) if p == path for a in body["alerts"]
                if a["status"] == status and all(a["labels"].get(k) == v for k, v in labels.items())]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def query(prom: str, expr: str) -> list[dict]:
    """An instant query's result vector (AssertionError naming the query when Prometheus refuses it)."""
    try:
        data = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as e:
        raise AssertionError(f"Prometheus refused {expr!r}: {e.read().decode()}") from None
    return data["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target, template variables replaced as Grafana would for 'All'."""
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "yolov12-serve.json").read_text())
    out = []
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in (("$instance", ".*"), ("$stream", ".*"), ("$device", ".*"),
                               ("$__rate_interval", "5s")):
                expr = expr.replace(var, value)
            assert "$" not in expr.replace("$1", ""), expr
            out.append((panel["title"], expr))
    return out


def recording_rules() -> list[str]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "yolov12-recording.yml").read_text())
    return [r["record"] for g in doc["groups"] for r in g["rules"]]


class Process:
    """A binary run in the background with its output in a temp file; `stop()` ends it."""

    def __init__(self, args: list[str], ready_url: str, what: str, timeout: float = 30) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - lives as long as it
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{what} exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=2) as r:
                if r.status == 200:
                    return
            if time.monotonic() > end:
                self.stop()
                raise AssertionError(f"{what} not ready in {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def gpu_standin(port: int):
    """The server's metrics registry on `port` with fixed NVML readings for one GPU (see the module docstring)."""
    from yolov12_serve import metrics as metrics_module
    from yolov12_serve.devices import GpuSample

    class FixedTelemetry:
        def __init__(self, devices: list[str]) -> None:
            self.devices = devices

        def sample(self) -> list[GpuSample]:
            return [GpuSample(d, 0.63, 30 * 2**30, 80 * 2**30) for d in self.devices]

    real = metrics_module.GpuTelemetry
    metrics_module.GpuTelemetry = FixedTelemetry
    try:
        m = metrics_module.Metrics(0.045, ["cuda:0"])
    finally:
        metrics_module.GpuTelemetry = real
    m.serve(port, "127.0.0.1")
    return m


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Webhook, Alertmanager and Prometheus with the shipped configs (ports and timings adapted), and the ports."""
    tmp = tmp_path_factory.mktemp("monitoring")
    ports = {"metrics": free_port(), "gpu": free_port(), "prometheus": free_port(), "alertmanager": free_port()}
    hook = Webhook()

    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    am["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for receiver in am["receivers"]:
        for w in receiver["webhook_configs"]:
            w["url"] = f"http://127.0.0.1:{hook.port}{urllib.parse.urlsplit(w['url']).path}"
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(am))

    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prom["global"].update(scrape_interval="1s", evaluation_interval="1s")
    rule_files = []
    for name in prom["rule_files"]:
        scaled = tmp / Path(name).name
        scaled.write_text(scale_durations((DEPLOY / "prometheus" / name).read_text()))
        rule_files.append(str(scaled))
    prom["rule_files"] = rule_files
    prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{ports['alertmanager']}"]
    job = prom["scrape_configs"][0]
    assert job["job_name"] == "yolov12-serve"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports['metrics']}"]
    prom["scrape_configs"].append({"job_name": "yolov12-serve-gpu-standin",
                                   "static_configs": [{"targets": [f"127.0.0.1:{ports['gpu']}"]}]})
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom))

    gpu = gpu_standin(ports["gpu"])
    alertmanager = prometheus = None
    try:
        alertmanager = Process([ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}",
                                f"--storage.path={tmp / 'am'}",
                                f"--web.listen-address=127.0.0.1:{ports['alertmanager']}", "--cluster.listen-address="],
                               f"http://127.0.0.1:{ports['alertmanager']}/-/ready", "alertmanager")
        prometheus = Process([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                             f"http://127.0.0.1:{ports['prometheus']}/-/ready", "prometheus")
        yield {"ports": ports, "hook": hook, "prom": f"http://127.0.0.1:{ports['prometheus']}",
               "am": f"http://127.0.0.1:{ports['alertmanager']}", "prometheus": prometheus,
               "alertmanager": alertmanager}
    finally:
        for p in (prometheus, alertmanager):
            if p is not None:
                p.stop()
        gpu.stop()
        hook.close()


SOURCES = ["--streams", str(Path(tempfile.mkdtemp(prefix="live-cams-")) / "cams.yaml")]  # written by the test


def test_panels_rules_and_the_latency_alert_live(stack):
    prom, hook, ports = stack["prom"], stack["hook"], stack["ports"]
    # two cameras; the second tracks its parts (the objects panel), at a size where the demo model is sure of some
    Path(SOURCES[1]).write_text(
        "streams:\n  - {id: cam0, url: 'synthetic://line1-cam1?fps=8&size=320x180&seed=1'}\n"
        "  - {id: cam1, url: 'synthetic://line1-cam2?fps=8&size=640x360&seed=2', track: true}\n")
    t0 = time.monotonic()
    # an SLO no frame can meet, and late frames processed anyway (not dropped): every frame is published late
    server = ServerProcess("--demo", "--no-status", *SOURCES, "--metrics-port", str(ports["metrics"]),
                           "--slo-ms", "1", "--process-late", "--instances", "1",
                           "--evidence-dir", tempfile.mkdtemp(prefix="live-evidence-"))  # the evidence panel's series
    try:
        # (1) every panel query and every recording rule has a series once a few scrapes are in
        wanted = [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
        wanted += [(f"recording rule {name}", name) for name in recording_rules()]

        def empty() -> list[str]:
            return [f"{what}: {expr}" for what, expr in wanted if not query(prom, expr)]

        deadline = time.monotonic() + 45
        while (missing := empty()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not missing, "no series for:\n" + "\n".join(missing) + "\n" + stack["prometheus"].output()

        # (2) the fast burn pages: the alert reaches the webhook's "page" receiver
        burn = {"alertname": "Yolov12LatencyBudgetBurn", "long": "1h", "severity": "critical"}
        fired = wait_until(lambda: hook.alerts("/page", "firing", **burn), 60, interval=0.5,
                           what="Yolov12LatencyBudgetBurn firing at the webhook")
        assert fired[0]["labels"]["instance"] == f"127.0.0.1:{ports['metrics']}"
        assert fired[0]["annotations"]["runbook_url"].startswith("docs/production.md#")
        fired_after = time.monotonic() - t0
    finally:
        server.close()

    # restored: the same server with an SLO it meets; once the short window holds only good frames, it resolves
    server = ServerProcess("--demo", "--no-status", *SOURCES, "--metrics-port", str(ports["metrics"]),
                           "--slo-ms", "1000", "--instances", "1")
    instance = f'instance="127.0.0.1:{ports["metrics"]}"'
    try:
        try:
            wait_until(lambda: hook.alerts("/page", "resolved", **burn), 60, interval=0.5,
                       what="Yolov12LatencyBudgetBurn resolved at the webhook")
        except AssertionError as e:
            seen = {q: query(prom, q) for q in (f"instance:yolov12_frame_slo_errors:ratio_rate5m{{{instance}}}",
                                                 f"instance:yolov12_slo_seconds:le{{{instance}}}", "ALERTS")}
            raise AssertionError(f"{e}\n{json.dumps(seen, indent=1)}\nwebhook: {hook.received}") from None
        # resolved because the frames are good again, not because the series went away while the server
        # restarted: the ratio is back, and under the page's threshold
        def ratio_low() -> bool:
            ratio = query(prom, f"instance:yolov12_frame_slo_errors:ratio_rate5m{{{instance}}}")
            return bool(ratio) and float(ratio[0]["value"][1]) < 0.144

        wait_until(ratio_low, 30, interval=0.5, what="the 5m error ratio back and below 14.4%")
    finally:
        server.close()
    print(f"\nlatency alert fired after {fired_after:.1f} s, resolved after {time.monotonic() - t0:.1f} s")


def test_alertmanager_routes_by_severity_and_inhibits_stream_alerts_of_a_server_that_is_down(stack):
    """Alerts posted to the real Alertmanager's API: a server-down alert silences its own server's camera alerts
    (not another server's), and severities reach their receivers."""
    am, hook = stack["am"], stack["hook"]
    now = time.time()

    def alert(name: str, **labels: str) -> dict:
        return {"labels": {"alertname": name, "job": "yolov12-serve", **labels},
                "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 10))}

    posted = [alert("Yolov12ServerDown", instance="down:9464", severity="critical", scope="server"),
              alert("Yolov12StreamNotStreaming", instance="down:9464", stream="cam9", severity="critical",
                    scope="stream"),
              alert("Yolov12StreamNotStreaming", instance="up:9464", stream="cam9", severity="critical",
                    scope="stream"),
              alert("Yolov12FramesDropped", instance="up:9464", stream="cam8", reason="late", severity="warning",
                    scope="stream")]

    def post(alerts: list[dict]) -> None:
        req = urllib.request.Request(f"{am}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200

    def states() -> dict[tuple[str, str], dict]:
        return {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]
                for a in get_json(f"{am}/api/v2/alerts") if a["labels"].get("instance", "").endswith(":9464")
                and a["labels"]["instance"] in ("down:9464", "up:9464")}

    # the inhibition's source (server down) first, then the rest: posted in one request, Alertmanager's inhibitor
    # may see the source only after the dispatcher has paged the down server's stream alert
    post(posted[:1])
    wait_until(lambda: states().get(("Yolov12ServerDown", "down:9464"), {}).get("state") == "active", 20,
               interval=0.2, what="the server-down alert active")
    post(posted[1:])

    def settled() -> dict | None:  # every alert processed (a busy Alertmanager shows 'unprocessed' for a while)
        s = states()
        done = len(s) == 4 and all(a.get("state") != "unprocessed" for a in s.values())
        return s if done and s[("Yolov12StreamNotStreaming", "down:9464")].get("inhibitedBy") else None

    s = wait_until(settled, 20, interval=0.3, what="the stream alert of the down server inhibited")
    assert s[("Yolov12StreamNotStreaming", "down:9464")]["state"] == "suppressed"
    assert s[("Yolov12StreamNotStreaming", "up:9464")]["state"] == "active"
    assert s[("Yolov12ServerDown", "down:9464")]["state"] == "active"
    wait_until(lambda: hook.alerts("/page", "firing", alertname="Yolov12StreamNotStreaming", instance="up:9464"), 20,
               what="critical stream alert paged")
    wait_until(lambda: hook.alerts("/ticket", "firing", alertname="Yolov12FramesDropped", instance="up:9464"), 20,
               what="warning ticketed")
    assert not hook.alerts("/page", "firing", alertname="Yolov12StreamNotStreaming", instance="down:9464")
    assert not hook.alerts("/page", "firing", alertname="Yolov12FramesDropped")
