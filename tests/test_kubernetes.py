"""deploy/kubernetes: every manifest valid against the Kubernetes schemas (kubernetes-validate ships them, so no
network), and the Deployment in agreement with the daemon's own config in the ConfigMap (parsed by daemon/config.py):
ports, probes, paths, grace period and drain, resources, security context."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from daemon.config import Config, parse_config, split_host_port
from daemon.front import RELAY_GRACE_S
from daemon.server import SERVICE_NAME

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
# The oldest Kubernetes with gRPC probes generally available, and the newest the schemas cover.
VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# After the drain the daemon stops its servers side by side: the relays' grace (front.RELAY_GRACE_S) bounds it,
# as does the OpenAI listener's (openai_http.CLOSE_GRACE_S, the same 5 s); then the engine thread ends.
STOP_AFTER_DRAIN_S = RELAY_GRACE_S + 5
POD_LABELS = {"app.kubernetes.io/name": "edgellm", "app.kubernetes.io/component": "inference"}


def documents() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def resources() -> list[dict]:
    return [d for name, docs in documents().items() if name != "kustomization.yaml" for d in docs]


def one(kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in resources() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


@pytest.fixture(scope="module")
def deployment() -> dict:
    return one("Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def config(deployment, container) -> Config:
    """The daemon's config as the pod reads it: the ConfigMap's file at the path the container passes --config."""
    path = Path(container["args"][container["args"].index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    data = yaml.safe_load(one("ConfigMap", volume["configMap"]["name"])["data"][path.name])
    return parse_config(data)


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


# ---- the schemas --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    checked = 0
    for doc in resources():
        kubernetes_validate.validate(doc, version, strict=True)  # strict: an unknown or misspelt field fails
        checked += 1
    assert checked == 6  # ConfigMap, Deployment, 2 Services, PodDisruptionBudget, NetworkPolicy


def test_the_schema_check_catches_mistakes(deployment):
    """The validator is live: a misspelt field and a wrong type both fail."""
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    (k,) = documents()["kustomization.yaml"]
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == sorted(n for n in documents() if n != "kustomization.yaml")


# ---- the Deployment and the daemon's config -----------------------------------------------------------------
def test_ports_are_the_configured_listeners(config, container):
    assert config.listen.unix is None
    named = ports(container)
    for name, address in (("grpc", config.listen.tcp), ("http", config.openai.listen), ("metrics", config.service.metrics)):
        host, port = split_host_port(address, name)
        assert host == "0.0.0.0", f"{name}: the pod's IP must reach it (probes, Services)"
        assert named[name] == port


def test_probes_ask_the_daemons_grpc_health_service(config, container):
    grpc_port = split_host_port(config.listen.tcp, "listen.tcp")[1]
    # The daemon sets these two names in grpc.health.v1 (daemon/lifecycle.py, Daemon._set_serving).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
        assert container[probe]["grpc"].get("service", "") in ("", SERVICE_NAME)
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # the model load, with a wide margin


def test_grace_period_covers_the_prestop_and_the_drain(config, deployment, container):
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = float(pre_stop[1])
    assert sleep_s >= 3  # endpoints and client-side balancers drop the pod before the daemon stops accepting
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + config.service.drain_seconds + STOP_AFTER_DRAIN_S
    # Health reads NOT_SERVING through the drain: the liveness probe must not restart the pod meanwhile.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > sleep_s + config.service.drain_seconds


def test_paths_exist_where_the_config_expects_them(config, deployment, container):
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The bundle is baked into the image where the config looks for it.
    assert re.search(rf"^COPY --from=bundle \S+ {re.escape(config.bundle)}$", CONTAINERFILE.read_text(), re.M)
    # The root filesystem is read-only: the gRPC server's private socket folder goes to TMPDIR, a volume.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TMPDIR"] in mounts and not mounts[env["TMPDIR"]].get("readOnly")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[env["TMPDIR"]]["name"]]
    assert mounts["/etc/edgellm"]["readOnly"] is True
    assert config.logging.file is None  # logs to stderr: the container log


def test_resources_fit_the_engine(config, container):
    res = container["resources"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS: whole CPUs under the static CPU manager policy
    cpus = int(res["limits"]["cpu"])
    # One ONNX Runtime thread per CPU the pod may use; 0 would mean one per CPU of the node.
    assert config.engine.threads == cpus
    memory = res["limits"]["memory"]
    assert memory.endswith("Gi") or memory.endswith("Mi")
    mib = int(memory[:-2]) * (1024 if memory.endswith("Gi") else 1)
    # The demo bundle at 4 slots x context 2048 peaked at 817 MiB (docs/kubernetes.md, "Memory").
    assert config.engine.slots == 4 and mib >= 817 * 1.2


def test_security_context(deployment, container):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    user = re.search(r"^USER (\d+):(\d+)$", CONTAINERFILE.read_text(), re.M)
    assert user and int(user[1]) == pod["securityContext"]["runAsUser"] != 0
    assert int(user[2]) == pod["securityContext"]["runAsGroup"]


def test_containerfile_exposes_the_ports_and_runs_the_config(container):
    text = CONTAINERFILE.read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M)[1].split()}
    assert exposed == set(ports(container).values())
    assert 'ENTRYPOINT ["edgellm", "serve"]' in text and ".[openai]" in text


# ---- Services, budget, network policy ---------------------------------------------------------------------------
def test_services_select_the_pods_and_reach_named_ports(deployment, container):
    assert deployment["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert deployment["spec"]["template"]["metadata"]["labels"] == POD_LABELS
    named = ports(container)
    services = {s["metadata"]["name"]: s for s in resources() if s["kind"] == "Service"}
    assert services["edgellm"]["spec"]["type"] == "ClusterIP"
    assert services["edgellm-headless"]["spec"]["clusterIP"] == "None"  # DNS lists each pod: client-side balancing
    for service in services.values():
        assert service["spec"]["selector"] == POD_LABELS
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named and port["port"] == named[port["targetPort"]]
    assert "grpc" in {p["name"] for p in services["edgellm-headless"]["spec"]["ports"]}


def test_disruption_budget_and_network_policy_cover_the_pods(deployment, container):
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    policy = one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == POD_LABELS
    assert policy["egress"] == [] and "Egress" in policy["policyTypes"]  # the daemon opens no connection
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == set(ports(container))
