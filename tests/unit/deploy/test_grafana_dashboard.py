"""deploy/grafana-dashboard.json: valid PromQL over exactly the names dd.metrics exports.

A metric renamed in dd/metrics.py without the dashboard (or the other way round)
fails here rather than as an empty panel in production.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from dd import metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana-dashboard.json"
# Grafana's variables, as Grafana substitutes them before Prometheus sees the query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def selectors(expr: str) -> list[str]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)  # raises on a syntax error
    return names


def _histogram_of(name: str) -> str | None:
    return next((h for h in metrics.HISTOGRAMS if name in (h + "_bucket", h + "_sum", h + "_count")), None)


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_panel_queries_parse_and_read_exported_metrics(panel: dict[str, Any]) -> None:
    assert panel["datasource"]["uid"] == "${datasource}"
    assert panel["targets"], "a panel without a query"
    for target in panel["targets"]:
        for name in selectors(target["expr"]):
            assert name in metrics.EXPORTED or _histogram_of(name), f"{target['expr']}: {name} is not exported"
        if "histogram_quantile" in target["expr"]:
            assert all(_histogram_of(n) for n in selectors(target["expr"])), target["expr"]


def test_every_exported_metric_has_a_panel() -> None:
    used = {_histogram_of(n) or n for p in panels() for t in p["targets"] for n in selectors(t["expr"])}
    assert set(metrics.EXPORTED) - used == set()


def test_a_typo_in_a_query_is_caught() -> None:
    with pytest.raises(ValueError):
        selectors("sum by (model (rate(nv_inference_request_success[$__rate_interval]))")
    assert selectors("rate(nv_inference_request_sucess[1m])") == ["nv_inference_request_sucess"]
    assert "nv_inference_request_sucess" not in metrics.EXPORTED
