"""deploy/kserve-*.yaml are valid KServe resources that fit together and run our command.

kubernetes-validate has no schemas for custom resources (a ServingRuntime is a
kind it skips with a warning, and it takes no extra schemas), so these are
checked with jsonschema against deploy/schemas/, cut from KServe's CRDs by
scripts/kserve_crd_schema.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dd.cli import build_parser

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
# Flags the manifests pass that the CLI does not know yet; remove each from here when it lands
# (the test then checks it like the others). --metrics-port landed with the metrics wiring.
PENDING_FLAGS: set[str] = set()


def load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: one resource expected"
    return docs[0]


def validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((DEPLOY / "schemas" / f"{kind.lower()}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(resource: dict[str, Any]) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator(resource["kind"]).iter_errors(resource))


RUNTIME = "kserve-servingruntime.yaml"
SERVICE = "kserve-inferenceservice.yaml"


@pytest.mark.parametrize("name", [RUNTIME, SERVICE])
def test_manifest_is_valid_for_kserves_crd(name: str) -> None:
    assert errors(load(name)) == []


def _pruned_paths_used(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    if schema.get("x-dd-pruned"):
        return [path]
    found = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                found += _pruned_paths_used(sub, child, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += _pruned_paths_used(schema["items"], item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("name", [RUNTIME, SERVICE])
def test_schema_was_cut_for_what_the_manifest_uses(name: str) -> None:
    resource = load(name)
    schema = validator(resource["kind"]).schema
    assert _pruned_paths_used(schema, resource, "") == [], (
        "the manifest uses fields the schema only knows by type: run scripts/kserve_crd_schema.py with KServe's CRDs")


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["spec"].pop("containers"), "spec: 'containers' is a required property"),
    (lambda r: r["spec"].__setitem__("protocolVersion", ["grpc-v2"]), "'protocolVersion' was unexpected"),
    (lambda r: r["spec"]["supportedModelFormats"][0].pop("name"), "'name' is a required property"),
    (lambda r: r["spec"]["containers"][0]["resources"]["limits"].__setitem__("memory", "16 GB"), "does not match"),
    (lambda r: r.__setitem__("apiVersion", "serving.kserve.io/v1beta1"), "was expected"),
])
def test_a_broken_servingruntime_is_refused(edit: Any, expected: str) -> None:
    resource = copy.deepcopy(load(RUNTIME))
    edit(resource)
    found = errors(resource)
    assert any(expected in e for e in found), found


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["spec"].pop("predictor"), "'predictor' is a required property"),
    (lambda r: r["spec"]["predictor"].__setitem__("scaleMetric", "latency"), "is not one of"),
    (lambda r: r["spec"]["predictor"].__setitem__("minReplicas", "one"), "is not of type 'integer'"),
    (lambda r: r["spec"]["predictor"]["model"]["modelFormat"].pop("name"), "'name' is a required property"),
    (lambda r: r["spec"]["predictor"]["model"].__setitem__("storageURI", "pvc://x"), "'storageURI' was unexpected"),
])
def test_a_broken_inferenceservice_is_refused(edit: Any, expected: str) -> None:
    resource = copy.deepcopy(load(SERVICE))
    edit(resource)
    found = errors(resource)
    assert any(expected in e for e in found), found


def test_the_inferenceservice_uses_the_runtime() -> None:
    runtime, service = load(RUNTIME), load(SERVICE)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_the_runtime_runs_deep_detection_serve_with_its_flags_on_the_grpc_port() -> None:
    container = load(RUNTIME)["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["serve", "/mnt/models"]  # KServe puts the storageUri's files in /mnt/models
    parsed, unknown = build_parser().parse_known_args(args)
    assert parsed.command == "serve" and parsed.path == "/mnt/models"
    flags = {a for a in unknown if a.startswith("--")}
    assert flags == PENDING_FLAGS, f"flags deep-detection serve does not know: {flags - PENDING_FLAGS}"
    (port,) = [p for p in container["ports"] if p["name"] == "h2c"]  # gRPC, as KServe and Knative route it
    assert port["containerPort"] == parsed.port
    annotations = load(RUNTIME)["spec"]["annotations"]  # KServe's Prometheus scraping: the metrics port
    assert parsed.metrics_port and annotations["prometheus.kserve.io/port"] == str(parsed.metrics_port)
    volumes = {v["name"]: v for v in load(RUNTIME)["spec"]["volumes"]}
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
