"""The deployment files deploy as written: every manifest in deploy/ passes Kubernetes' own schemas
(strict: unknown fields are errors), and the server's pod agrees with the code it runs: its flags
parse, /dev/shm holds the rings those flags ask for, the grace period outlasts a clean stop, the
probes ask the server's port, it runs as the image's user, and the volumes it mounts are defined."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

from dd.cli import _server_config, build_parser
from dd.config import ServerConfig
from dd.ipc.shm_ring import ring_size
from dd.supervisor import longest_clean_stop_s

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = sorted((REPO / "deploy").glob("*.yaml"))
# The oldest Kubernetes the manifests are written for (gRPC probes: 1.27; preStop sleep: 1.30), and the
# newest whose schemas the installed validator ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

Doc = dict[str, Any]
# Custom resources have no schema in kubernetes-validate: KServe's are checked against its CRDs in
# tests/unit/deploy/test_kserve_manifests.py. Any other group must pass Kubernetes' own schemas here.
CUSTOM_RESOURCE_GROUPS = ("serving.kserve.io",)


def is_custom_resource(doc: Doc) -> bool:
    return doc.get("apiVersion", "").split("/")[0] in CUSTOM_RESOURCE_GROUPS


def documents(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> list[tuple[Path, Doc]]:
    return [(path, doc) for path in MANIFESTS for doc in documents(path)]


def pod_specs(doc: Doc) -> Iterator[Doc]:
    if doc["kind"] == "Pod":
        yield doc["spec"]
    elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield doc["spec"]["template"]["spec"]


def server_deployment() -> Doc:
    found = [doc for _, doc in all_documents() if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "deep-detection"]
    assert len(found) == 1, "deploy/ must define one Deployment named deep-detection"
    return found[0]


def server_container(pod: Doc) -> Doc:
    (container,) = [c for c in pod["containers"] if c["name"] == "server"]
    return container


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (24Gi, 500M, 3) as a number."""
    match = re.fullmatch(r"([0-9.]+)([KMGTPE]i|[kMGTPE]|m)?", str(value))
    assert match, f"not a quantity: {value!r}"
    number, suffix = float(match.group(1)), match.group(2) or ""
    if suffix == "m":
        return number / 1000
    powers = "kMGTPE"
    if suffix.endswith("i"):
        return number * 1024 ** ("KMGTPE".index(suffix[0]) + 1)
    return number * 1000 ** (powers.index(suffix) + 1) if suffix else number


def served_config(container: Doc) -> ServerConfig:
    args = container.get("command", []) + container.get("args", [])
    assert args[:1] == ["serve"], f"the server container must run `deep-detection serve`, not {args}"
    return _server_config(build_parser().parse_args(args))


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"kubernetes.yaml", "models-loader.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_pass_the_kubernetes_schemas(path: Path, version: str) -> None:
    for doc in documents(path):
        if is_custom_resource(doc):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not valid Kubernetes {version}: "
                        f"{where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


@pytest.mark.parametrize("mistake", ["misspelled field", "wrong type", "unknown kind"])
def test_the_schema_check_rejects_a_broken_manifest(mistake: str) -> None:
    """The check above can fail: the real Deployment with one mistake does not pass."""
    doc = copy.deepcopy(server_deployment())
    pod = doc["spec"]["template"]["spec"]
    if mistake == "misspelled field":
        pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
        error: type[Exception] = kubernetes_validate.ValidationError
    elif mistake == "wrong type":
        server_container(pod)["ports"][0]["containerPort"] = "fifty"
        error = kubernetes_validate.ValidationError
    else:
        doc["kind"] = "Deployments"
        error = kubernetes_validate.SchemaNotFoundError
    with pytest.raises(error):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_volume_claim_used_is_defined() -> None:
    defined = {doc["metadata"]["name"] for _, doc in all_documents() if doc["kind"] == "PersistentVolumeClaim"}
    for path, doc in all_documents():
        for pod in pod_specs(doc):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert claim in defined, f"{path.name}: {doc['kind']} uses claim {claim!r}, which deploy/ does not define"


def test_images_name_a_release_not_latest() -> None:
    for path, doc in all_documents():
        for pod in pod_specs(doc):
            for container in pod.get("initContainers", []) + pod["containers"]:
                image = container["image"]
                tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
                assert tag and tag != "latest", f"{path.name}: {image} must name a release (image:TAG, not latest)"
                assert container.get("imagePullPolicy") == "IfNotPresent", \
                    f"{path.name}: {container['name']}: a release tag does not change, pull it if not present"


def test_pods_run_as_the_images_non_root_user() -> None:
    match = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile must set a numeric USER uid[:gid], so that runAsNonRoot can check it"
    uid, gid = int(match.group(1)), int(match.group(2) or match.group(1))
    assert uid != 0
    for path, doc in all_documents():
        for pod in pod_specs(doc):
            sc = pod["securityContext"]
            assert sc["runAsNonRoot"] is True and (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid), \
                f"{path.name}: run as the image's user {uid}:{gid}, non-root"
            for container in pod.get("initContainers", []) + pod["containers"]:
                csc = container.get("securityContext", {})
                assert csc.get("allowPrivilegeEscalation") is False and csc.get("capabilities", {}).get("drop") == ["ALL"], \
                    f"{path.name}: {container['name']}: no privilege escalation, no capabilities"


def test_dev_shm_holds_the_rings_and_fits_in_the_memory_limit() -> None:
    pod = server_deployment()["spec"]["template"]["spec"]
    container = server_container(pod)
    cfg = served_config(container)
    assert cfg.frontends > 0, "pin --frontends: its default follows the node's cores, which /dev/shm must not"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts, "mount a memory-backed emptyDir on /dev/shm: the container's default is 64 MiB"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    size = quantity(volume["emptyDir"]["sizeLimit"])
    needed = cfg.resolved_frontends() * ring_size(cfg.ring_slots, cfg.slot_bytes())
    assert size >= needed, f"/dev/shm sizeLimit {size / 2**30:.2f} GiB < the rings' {needed / 2**30:.2f} GiB"
    memory = quantity(container["resources"]["limits"]["memory"])
    assert memory > size, "the memory limit must hold /dev/shm (its pages count towards it) and the processes"


def test_grace_period_outlasts_a_clean_stop() -> None:
    pod = server_deployment()["spec"]["template"]["spec"]
    container = server_container(pod)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    needed = pre_stop + longest_clean_stop_s(served_config(container))
    assert pod["terminationGracePeriodSeconds"] > needed, \
        f"terminationGracePeriodSeconds must exceed preStop ({pre_stop} s) + the supervisor's longest clean stop"


def test_probes_ask_the_servers_health_service_on_its_port() -> None:
    container = server_container(server_deployment()["spec"]["template"]["spec"])
    port = served_config(container).port
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container.get(probe, {}).get("grpc", {}).get("port") == port, \
            f"{probe} must use the gRPC health service on {port}"


def test_prometheus_scrapes_the_servers_metrics_port() -> None:
    template = server_deployment()["spec"]["template"]
    container = server_container(template["spec"])
    port = served_config(container).metrics_port
    assert port, "the server must serve its metrics (--metrics-port)"
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [port]
    annotations = template["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") == str(port)


def test_one_server_per_gpu_node_with_all_its_gpus() -> None:
    deployment = server_deployment()
    pod = deployment["spec"]["template"]["spec"]
    gpus = int(server_container(pod)["resources"]["limits"]["nvidia.com/gpu"])
    assert pod.get("nodeSelector", {}).get("nvidia.com/gpu.count") == str(gpus), \
        "select nodes by their GPU count and request every GPU they have"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    rules = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(r["topologyKey"] == "kubernetes.io/hostname" and r["labelSelector"]["matchLabels"].items() <= labels.items()
               for r in rules), "two servers must never share a node"


def test_services_reach_the_server_port() -> None:
    deployment = server_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in server_container(deployment["spec"]["template"]["spec"])["ports"]}
    services = [doc for _, doc in all_documents() if doc["kind"] == "Service"]
    assert services
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {svc['metadata']['name']} selects no server"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {svc['metadata']['name']}: no container port {port['targetPort']}"
