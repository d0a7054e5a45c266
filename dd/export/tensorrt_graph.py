"""The TensorRT flavour's graph surgery (onnx-graphsurgeon), its structural check, and its build script.

The traced graph already holds TensorRT's plugin nodes where NVIDIA's detectron2
sample has them (dd.export.ops.TensorRTOps emits them, in a private `trt` domain so
that the exporter passes them through). The surgery here makes the graph what
TensorRT's ONNX parser and the sample expect:

- the plugin nodes move to the default domain (the parser finds plugins by op type)
  and get names (nms_rpn, nms_box_outputs, roi_align_box_pooler, roi_align_mask_pooler);
- their outputs get the dtypes and shapes of the plugins' documented I/O (the exporter
  knows nothing of them): EfficientNMS_TRT num_detections [B, 1] int32, boxes [B, K, 4],
  scores [B, K] float32, classes [B, K] int32; PyramidROIAlign_TRT [B, R, C, P, P] float32;
- the graph's inputs and outputs get fixed shapes (the engine is built fixed-shape),
  constants are folded, unused nodes dropped, the graph sorted, shapes inferred.

`check_sample_layout` states the contract as a list of problems (empty when the graph is
what the sample layout promises); the export runs it, and so do the tests, because no
machine here has TensorRT to parse the graph.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dd.export.ops import ExportError
from dd.models.graph_layout import BOXES, CLASSES, IMAGE_SIZE, INPUT, MASKS, NUM_DETECTIONS, SCORES, GraphContract

log = logging.getLogger(__name__)

NMS = "EfficientNMS_TRT"
ROI = "PyramidROIAlign_TRT"
BUILD_SCRIPT = "build_engine.sh"


def _require_gs() -> Any:
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise ExportError("--format tensorrt-onnx needs onnx-graphsurgeon: pip install onnx-graphsurgeon "
                          "(or pip install 'deep-detection[onnx]')") from None
    return gs


def _attr(node: Any, name: str) -> Any:
    return node.attrs.get(name)


def to_sample_layout(path: Path, contract: GraphContract) -> dict[str, Any]:
    """Rewrites the traced TensorRT-flavour graph at `path` in place; returns its plugin nodes' attributes."""
    import onnx
    from onnx import shape_inference

    gs = _require_gs()
    graph = gs.import_onnx(onnx.load(str(path)))
    b, h, w = contract.batch, contract.height, contract.width
    nms = [n for n in graph.nodes if n.op == NMS]
    rois = [n for n in graph.nodes if n.op == ROI]
    if len(nms) != 2 or len(rois) != 2:
        raise ExportError(f"{path}: expected 2 {NMS} and 2 {ROI} nodes, found {len(nms)} and {len(rois)}")
    for node, name in zip(nms, ("nms_rpn", "nms_box_outputs")):
        node.domain = None
        node.name = name
        k = int(_attr(node, "max_output_boxes"))
        for out, dtype, shape in zip(node.outputs, (np.int32, np.float32, np.float32, np.int32),
                                     ([b, 1], [b, k, 4], [b, k], [b, k])):
            out.dtype, out.shape = dtype, shape
    # The detections' NMS takes class-specific boxes [B, P, K, 4] and scores [B, P, K] (background dropped).
    p, k = int(_attr(nms[0], "max_output_boxes")), contract.num_classes
    for t, shape in zip(nms[1].inputs, ([b, p, k, 4], [b, p, k])):
        t.shape, t.dtype = shape, np.float32
    channels = None
    for node, name, count in zip(rois, ("roi_align_box_pooler", "roi_align_mask_pooler"),
                                 (int(_attr(nms[0], "max_output_boxes")), contract.max_detections)):
        node.domain = None
        node.name = name
        size = int(_attr(node, "pooled_size"))
        channels = node.inputs[1].shape[1] if node.inputs[1].shape else channels
        node.outputs[0].dtype = np.float32
        node.outputs[0].shape = [b, count, channels, size, size]
    for t in graph.inputs:
        if t.name == INPUT:
            t.shape, t.dtype = [b, contract.channels, h, w], np.float32
        elif t.name == IMAGE_SIZE:
            t.shape, t.dtype = [b, 2], np.float32
    d, m = contract.max_detections, contract.mask_size
    want = {NUM_DETECTIONS: ([b, 1], np.int32), BOXES: ([b, d, 4], np.float32), SCORES: ([b, d], np.float32),
            CLASSES: ([b, d], np.int32), MASKS: ([b, d, m, m], np.float32)}
    for t in graph.outputs:
        if t.name in want:
            t.shape, t.dtype = want[t.name]
    graph.fold_constants().cleanup().toposort()
    model = gs.export_onnx(graph)
    model.opset_import[0].version = contract.opset
    try:
        model = shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - inference is a courtesy for the parser; the check decides
        log.info("shape inference stopped: %s", exc)
    onnx.save(model, str(path))
    problems = check_sample_layout(model, contract)
    if problems:
        raise ExportError(f"{path}: the TensorRT graph is not in the sample layout: " + "; ".join(problems))
    def plain(v: Any) -> Any:
        return v.decode() if isinstance(v, bytes) else (list(v) if isinstance(v, (list, tuple)) else v)

    return {n.name: {a.name: plain(onnx.helper.get_attribute_value(a)) for a in n.attribute}
            for n in model.graph.node if n.op_type in (NMS, ROI)}


def _shape(value_info: Any) -> list[Any]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def check_sample_layout(model: Any, contract: GraphContract) -> list[str]:
    """What in `model` (an onnx ModelProto) differs from the TensorRT sample layout and the plugins' documented
    I/O; empty when nothing does."""
    import onnx

    problems: list[str] = []
    g = model.graph
    b, d, m = contract.batch, contract.max_detections, contract.mask_size
    dt = onnx.TensorProto
    want_in = {INPUT: ([b, contract.channels, contract.height, contract.width], dt.FLOAT),
               IMAGE_SIZE: ([b, 2], dt.FLOAT)}
    inputs = {i.name: i for i in g.input}
    if set(inputs) != set(want_in):
        problems.append(f"inputs are {sorted(inputs)}, not {sorted(want_in)}")
    for name, (shape, elem) in want_in.items():
        if name in inputs and (_shape(inputs[name]) != shape or inputs[name].type.tensor_type.elem_type != elem):
            problems.append(f"input {name} is {_shape(inputs[name])}, not {shape} float32")
    want_out = [(NUM_DETECTIONS, [b, 1], dt.INT32), (BOXES, [b, d, 4], dt.FLOAT), (SCORES, [b, d], dt.FLOAT),
                (CLASSES, [b, d], dt.INT32), (MASKS, [b, d, m, m], dt.FLOAT)]
    outs = list(g.output)
    if [o.name for o in outs] != [n for n, _, _ in want_out]:
        problems.append(f"outputs are {[o.name for o in outs]}, not {[n for n, _, _ in want_out]}")
    for o, (name, shape, elem) in zip(outs, want_out):
        if _shape(o) != shape or o.type.tensor_type.elem_type != elem:
            problems.append(f"output {name} is {_shape(o)} of type {o.type.tensor_type.elem_type}, not {shape} "
                            f"of type {elem}")
    nodes = list(g.node)
    for banned in ("NonMaxSuppression", "RoiAlign"):
        if any(n.op_type == banned for n in nodes):
            problems.append(f"a {banned} node is left (the plugins replace it)")
    produced = {o: n for n in nodes for o in n.output}
    nms = [n for n in nodes if n.op_type == NMS]
    rois = [n for n in nodes if n.op_type == ROI]
    if len(nms) != 2:
        problems.append(f"{len(nms)} {NMS} nodes, not 2 (proposals, detections)")
    if len(rois) != 2:
        problems.append(f"{len(rois)} {ROI} nodes, not 2 (box and mask poolers)")
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nms + rois}
    for n in nms + rois:
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{n.name} is in domain {n.domain!r}; TensorRT's parser finds plugins in the default one")
    for n in nms:
        a = attrs[n.name]
        need = {"plugin_version": b"1", "background_class": -1, "box_coding": 0, "class_agnostic": 0,
                "score_activation": 0}
        for key, value in need.items():
            if a.get(key) != value:
                problems.append(f"{n.name}: {key} is {a.get(key)!r}, not {value!r}")
        for key in ("max_output_boxes", "score_threshold", "iou_threshold"):
            if key not in a:
                problems.append(f"{n.name}: no {key}")
        if len(n.input) != 2 or len(n.output) != 4:
            problems.append(f"{n.name}: {len(n.input)} inputs and {len(n.output)} outputs, not 2 and 4 "
                            "(standard NMS mode: boxes, scores)")
    if len(nms) == 2:
        if attrs[nms[1].name].get("max_output_boxes") != d:
            problems.append(f"{nms[1].name}: max_output_boxes is not DETECTIONS_PER_IMAGE ({d})")
        last = nms[1]
        for out, name in ((last.output[0], NUM_DETECTIONS), (last.output[2], SCORES), (last.output[3], CLASSES)):
            if out != name:
                problems.append(f"{name} is not the detections' {NMS} output (it is {out!r})")
    for n in rois:
        a = attrs[n.name]
        if len(n.input) != 5:
            problems.append(f"{n.name}: {len(n.input)} inputs, not 5 (rois, P2, P3, P4, P5)")
        if list(a.get("image_size", [])) != [contract.height, contract.width]:
            problems.append(f"{n.name}: image_size {a.get('image_size')} is not the canvas")
        if a.get("fpn_scale") != 224 or a.get("roi_coords_transform") not in (0, 2) or a.get("sampling_ratio", -1) < 0:
            problems.append(f"{n.name}: fpn_scale/roi_coords_transform/sampling_ratio {a}")
        if n.input and n.input[0] not in produced:
            problems.append(f"{n.name}: its rois come from no node")
    if len(rois) == 2 and len(nms) == 2:
        if produced.get(rois[0].input[0]) is not nms[0] or rois[0].input[0] != nms[0].output[1]:
            problems.append("the box pooler does not pool the proposals NMS's boxes")
    return problems


_SCRIPT = """#!/bin/sh
# Builds {engine} from {graph} with TensorRT's trtexec, on the GPU (and TensorRT) that will serve it, and
# records what it was built with in {engine}.json (the tensorrt engine compares it at load).
# Extra trtexec flags pass through, e.g.: ./build_engine.sh --fp16
set -e
cd "$(dirname "$0")"
trtexec --onnx={graph} --saveEngine={engine} "$@" 2>&1 | tee build_engine.log
python3 - <<'PY'
import json, os, re, subprocess
info = {{"graph": "{graph}", "canvas": [{h}, {w}], "batch": {b}}}
try:
    import tensorrt
    info["tensorrt_version"] = tensorrt.__version__
except ImportError:
    found = re.search(r"TensorRT version: ([0-9.]+)", open("build_engine.log").read())
    if found:
        info["tensorrt_version"] = found.group(1)
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
try:
    out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    name, cap = (s.strip() for s in out.rsplit(",", 1))
    info["gpu_name"], info["compute_capability"] = name, cap
except Exception as exc:
    print("could not read the GPU's name:", exc)
open("{engine}.json", "w").write(json.dumps(info, indent=2) + "\\n")
print("wrote {engine}.json:", info)
PY
"""


def write_build_script(folder: Path, graph: str, engine: str, contract: GraphContract) -> Path:
    """build_engine.sh: trtexec's command line for this graph, and the build record the engine checks."""
    path = folder / BUILD_SCRIPT
    path.write_text(_SCRIPT.format(graph=graph, engine=engine, h=contract.height, w=contract.width,
                                   b=contract.batch))
    os.chmod(path, 0o755)
    return path

