"""Derives the small JSON schemas in deploy/schemas/ from KServe's CRDs.

kubernetes-validate knows only Kubernetes' own kinds: a ServingRuntime or an
InferenceService is "a kind without a schema" to it, skipped with a warning. So
tests/unit/deploy/test_kserve_manifests.py checks deploy/kserve-*.yaml against schemas cut
from the openAPIV3Schema of KServe's CustomResourceDefinitions. The whole
InferenceService schema is 2 MB (every predictor framework and the full Pod
spec); the cut keeps what our manifests reach:

- along every path the manifests use, the CRD's node with its types, enums,
  required fields and patterns, and the names and types of all its properties;
- at an object node, ``additionalProperties: false`` unless the CRD preserves
  unknown fields: the API server silently drops an unknown (misspelled) field,
  which is worse than an error;
- a property the manifests do not use keeps only its type, marked
  ``x-dd-pruned`` (the test fails if a manifest starts to use it: run this again);
- apiVersion and kind fixed to the CRD's group/version and kind; metadata.name
  required.

Run it with KServe's CRD files (config/crd/full/ in the kserve repository) when
the manifests change or KServe is upgraded:

    python scripts/kserve_crd_schema.py --crd serving.kserve.io_servingruntimes.yaml \
        --crd serving.kserve.io_inferenceservices.yaml --source "kserve v0.16.0" deploy/kserve-*.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

# JSON-schema keywords of a CRD node that say what is valid (descriptions,
# defaults and Kubernetes list/map markers say nothing to a validator).
KEEP = ("type", "format", "enum", "required", "pattern", "minimum", "maximum", "minLength", "maxLength",
        "minItems", "maxItems", "anyOf", "oneOf", "allOf", "x-kubernetes-int-or-string")


def _shallow(node: dict[str, Any]) -> dict[str, Any]:
    out = {k: node[k] for k in ("type", "format", "enum", "anyOf", "x-kubernetes-int-or-string") if k in node}
    if "properties" in node or "items" in node or isinstance(node.get("additionalProperties"), dict):
        out["x-dd-pruned"] = True
    return out


def prune(node: dict[str, Any], used: list[Any]) -> dict[str, Any]:
    """``node`` cut to what the values in ``used`` (every value found at this path) reach."""
    out = {k: node[k] for k in KEEP if k in node}
    dicts = [u for u in used if isinstance(u, dict)]
    if "properties" in node:
        out["properties"] = {}
        for name, child in node["properties"].items():
            below = [d[name] for d in dicts if name in d]
            out["properties"][name] = prune(child, below) if below else _shallow(child)
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):  # a map: every value has this schema
        out["additionalProperties"] = prune(node["additionalProperties"], [v for d in dicts for v in d.values()])
    if "items" in node:
        out["items"] = prune(node["items"], [item for u in used if isinstance(u, list) for item in u])
    return out


def derive(crd: dict[str, Any], manifests: list[dict[str, Any]], source: str) -> dict[str, Any]:
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    api_version = f"{group}/{version['name']}"
    used = [m for m in manifests if m.get("kind") == kind and m.get("apiVersion") == api_version]
    schema = prune(version["schema"]["openAPIV3Schema"], used)
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string", "minLength": 1}}}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"Derived by scripts/kserve_crd_schema.py from KServe's CRD {crd['metadata']['name']} "
                        f"({source}), cut to what deploy/kserve-*.yaml use; regenerate, don't edit.",
            "title": f"{kind} {api_version}", **schema}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crd", action="append", required=True, help="a KServe CRD file (YAML)")
    parser.add_argument("--source", required=True, help="where the CRDs came from, e.g. 'kserve v0.16.0'")
    parser.add_argument("--out", default="deploy/schemas", help="folder for KIND.schema.json")
    parser.add_argument("manifests", nargs="+", help="the manifests to cut the schemas to")
    args = parser.parse_args()
    manifests = [doc for path in args.manifests for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
    for crd_path in args.crd:
        crd = yaml.safe_load(Path(crd_path).read_text())
        schema = derive(crd, manifests, args.source)
        out = Path(args.out) / f"{crd['spec']['names']['kind'].lower()}.schema.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
