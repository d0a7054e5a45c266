"""`deep-detection export`: a served model folder -> an ONNX graph in a model folder that serves it again.

What is inside the graph, and why: the network from the normalised, zero-padded
input tensor to the detections (boxes, scores, classes) and each detection's own
28 x 28 mask probabilities (dd.export.network). Outside it, in the engines and
shared with the other engines: the resize (detectron2's resize of a uint8 image is
PIL's antialiased filter, which no ONNX operator reproduces, and a fixed-shape
engine needs the image fitted to its canvas before the graph), normalisation and
padding (zero padding must come after normalisation, as both libraries pad; inside
the graph it would need the image size to mask the padding), and the mask paste
(its output is the input image's size, which a fixed-shape graph cannot have, and
the shared paste writes COCO RLE directly). This is also where NVIDIA's detectron2
sample cuts its graph (fixed-size input, 28 x 28 masks out).

Exporter: torch.onnx.export with the TorchScript-based exporter (dynamo=False) at
opset 17: the inference path is traced once with constants for the canvas (anchors,
top-k sizes), and torchvision's roi_align (opset 16+ for `aligned`) and our batched
NMS are exported as RoiAlign and NonMaxSuppression. The TensorRT flavour needs it: its
plugin nodes come from autograd Functions' `symbolic`, which only this exporter calls.
torchvision's own MaskRCNN module does not trace correctly with either exporter (its
Python branches on data freeze at the example's values), which is why dd.export.network
restates the path; that restated module also exports with dynamo=True (opset 18, the
NMS unrolled per image) and gives the same answers in ONNX Runtime (docs/tensorrt.md).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from dd.config import NODE_CONFIG, ModelConfig, load_model_config
from dd.export.network import ExportableMaskRCNN
from dd.export.ops import ExportError, OnnxOps, TensorRTOps
from dd.models.graph_layout import (CONTRACT_FILE, IMAGE_SIZE, INPUT, OUTPUTS, SCORE_THRESHOLD, GraphContract)

log = logging.getLogger(__name__)

OPSET = 17
GRAPH_FILE = "model.onnx"
ENGINE_FILE = "model.engine"


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError("exporting needs the onnx package: pip install 'deep-detection[onnx]' "
                          "(or pip install onnx onnxruntime onnx-graphsurgeon)") from None
    return onnx


def default_canvas(cfg: ModelConfig) -> tuple[int, int]:
    """MIN_SIZE x MAX_SIZE, each rounded up to a multiple of 32: every landscape image fits, resized by the rule."""
    up = lambda n: int(math.ceil(n / 32) * 32)  # noqa: E731
    return up(cfg.min_size), up(cfg.max_size)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ExportError(f"--size must be HEIGHTxWIDTH such as 800x1344, got {text!r}") from None
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ExportError(f"--size {h}x{w}: height and width must be multiples of 32 (the FPN's stride), at least 32")
    return h, w


def contract_for(cfg: ModelConfig, fmt: str, height: int, width: int, batch: int, dynamic: bool,
                 score_threshold: float) -> GraphContract:
    """What the engine must do around the graph to answer as `cfg`'s reference engine does."""
    if cfg.detectron2 is not None:
        mean, std = cfg.detectron2.rgb_mean_std()
        semantics, scale, fill = "detectron2", 1.0, cfg.depth_fill_m
    else:
        mean, std = list(cfg.pixel_mean), list(cfg.pixel_std)
        if cfg.input_kind == "rgbd":
            mean, std = mean + [cfg.depth_mean_m], std + [cfg.depth_std_m]
        semantics, scale, fill = "torchvision", 1.0 / 255.0, (cfg.depth_fill if cfg.input_kind == "rgbd" else None)
    return GraphContract(
        format=fmt, semantics=semantics, batch=batch, height=height, width=width, channels=cfg.channels,
        min_size=cfg.min_size, max_size=cfg.max_size, input_scale=scale, mean=[float(v) for v in mean],
        std=[float(v) for v in std], depth_fill_m=fill,
        max_detections=int(cfg.architecture.get("max_detections", 100)) if cfg.detectron2 is None
        else cfg.detectron2.detections_per_image,
        mask_size=28, score_threshold=score_threshold, score_threshold_input=(fmt == "onnx"),
        dynamic_batch=dynamic, num_classes=len(cfg.categories), opset=OPSET,
        source={"folder": str(cfg.folder), "weights": cfg.weights.name if cfg.weights else None,
                "weights_format": cfg.weights_format, "torch": torch.__version__})


class _FixedThreshold(torch.nn.Module):
    """The TensorRT flavour's module: no threshold input (EfficientNMS_TRT bakes it)."""

    def __init__(self, inner: ExportableMaskRCNN) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor, image_size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(images, image_size, torch.zeros(1))


def example_inputs(contract: GraphContract, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A traced example: random normalised images filling the canvas (any input traces the same graph)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(contract.batch, contract.channels, contract.height, contract.width, generator=g)
    size = torch.tensor([[contract.height, contract.width]] * contract.batch, dtype=torch.float32)
    return x, size, torch.tensor([contract.score_threshold], dtype=torch.float32)


def export_graph(model: torch.nn.Module, contract: GraphContract, path: Path) -> None:
    """Traces `model` into an ONNX file at `path` with the contract's names and axes."""
    _require_onnx()
    images, size, thr = example_inputs(contract)
    if contract.format == "onnx":
        module, args, names = model, (images, size, thr), [INPUT, IMAGE_SIZE, SCORE_THRESHOLD]
    else:
        module, args, names = _FixedThreshold(model), (images, size), [INPUT, IMAGE_SIZE]
    dynamic_axes = None
    if contract.dynamic_batch:
        dynamic_axes = {INPUT: {0: "batch"}, IMAGE_SIZE: {0: "batch"}}
        dynamic_axes.update({name: {0: "batch"} for name in OUTPUTS})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the checks below decide
        torch.onnx.export(module, args, str(path), input_names=names, output_names=list(OUTPUTS),
                          opset_version=OPSET, dynamic_axes=dynamic_axes, dynamo=False, do_constant_folding=True)


def check_with_onnxruntime(model: torch.nn.Module, contract: GraphContract, path: Path) -> dict[str, float]:
    """Runs the exported graph in ONNX Runtime on a random example and compares it with the traced module."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: the exported graph was not run (pip install onnxruntime)")
        return {}
    images, size, thr = example_inputs(contract, seed=1)
    thr = torch.tensor([0.0])  # every candidate: random inputs give few confident detections
    with torch.no_grad():
        expected = model(images, size, thr)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(list(OUTPUTS), {INPUT: images.numpy(), IMAGE_SIZE: size.numpy(), SCORE_THRESHOLD: thr.numpy()})
    num_e, num_g = expected[0].numpy(), got[0]
    if not (num_e == num_g).all():
        raise ExportError(f"{path}: ONNX Runtime finds {num_g.ravel().tolist()} detections where the traced model "
                          f"finds {num_e.ravel().tolist()}; the export is wrong, please report it")
    n = int(num_e.ravel()[0])
    box_dev = float(abs(expected[1][0, :n].numpy() - got[1][0, :n]).max()) if n else 0.0
    return {"detections": n, "max_box_deviation_normalised": box_dev}


def write_folder(cfg: ModelConfig, contract: GraphContract, out: Path, graph: Path) -> None:
    """categories.txt, export.json and a node_config.json naming the engine that serves the graph."""
    (out / "categories.txt").write_text("".join(c + "\n" for c in cfg.categories))
    (out / CONTRACT_FILE).write_text(contract.to_json())
    kind = "RGBD" if cfg.input_kind == "rgbd" else "RGB"
    trt = contract.format == "tensorrt-onnx"
    node: dict[str, Any] = {
        "DETECTION_TYPE": f"{kind}MaskRCNNTensorRTServicer" if trt else f"{kind}MaskRCNNOnnxServicer",
        "MODEL_WEIGHT": ENGINE_FILE if trt else graph.name,
        "CATEGORY_FILE": "categories.txt",
        "MIN_SIZE": cfg.min_size,
        "MAX_SIZE": cfg.max_size,
        "SCORE_THRESH_TEST": cfg.score_threshold,
        "MASK_THRESHOLD": cfg.mask_threshold,
        "MAX_BATCH_SIZE": contract.batch if not contract.dynamic_batch else cfg.max_batch_size,
    }
    if cfg.input_kind == "rgbd":
        node["DEPTH_UNIT"] = cfg.depth_unit_m
    (out / NODE_CONFIG).write_text(json.dumps(node, indent=2) + "\n")


def export_model(source: Path | str, out: Path | str, *, fmt: str = "onnx", size: tuple[int, int] | None = None,
                 batch: int = 1, dynamic: bool = False, score_threshold: float | None = None,
                 check: bool = True) -> dict[str, Any]:
    """Exports the model folder `source` into the model folder `out`; returns what was written and checked."""
    from dd.models.build import build_loaded_model

    if fmt not in ("onnx", "tensorrt-onnx"):
        raise ExportError(f"--format must be onnx or tensorrt-onnx, got {fmt!r}")
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}")
    cfg = load_model_config(source)
    if cfg.engine not in ("torchvision", "detectron2", "fast"):
        raise ExportError(f"{cfg.config_path}: engine {cfg.engine!r} has no network to export; export the model "
                          "folder with the weights (torchvision or detectron2)")
    if dynamic and fmt != "onnx":
        raise ExportError("--dynamic is for --format onnx: TensorRT's sample layout is built fixed-shape here "
                          "(build a dynamic-batch engine from a --format onnx graph instead)")
    height, width = size or default_canvas(cfg)
    thr = cfg.score_threshold if score_threshold is None else float(score_threshold)
    if not 0.0 <= thr <= 1.0:
        raise ExportError(f"--score-threshold must be in [0, 1], got {thr}")
    contract = contract_for(cfg, fmt, height, width, batch, dynamic, thr)
    out = Path(out)
    if out.resolve() == cfg.folder:
        raise ExportError(f"-o {out}: write the export to a new folder, not into the source model's")
    model = build_loaded_model(cfg).eval()
    ops = OnnxOps() if fmt == "onnx" else TensorRTOps(thr)
    wrapped = ExportableMaskRCNN(model, cfg.channels, height, width, ops).eval()
    if isinstance(ops, TensorRTOps):
        ops.check_rule(wrapped.box_rule)
        ops.check_rule(wrapped.mask_rule)
    out.mkdir(parents=True, exist_ok=True)
    graph = out / (GRAPH_FILE if fmt == "onnx" else "model.trt.onnx")
    export_graph(wrapped, contract, graph)
    report: dict[str, Any] = {"graph": str(graph), "format": fmt, "canvas": [height, width], "batch": batch}
    if fmt == "tensorrt-onnx":
        from dd.export.tensorrt_graph import write_build_script, to_sample_layout

        report["graph_check"] = to_sample_layout(graph, contract)
        write_build_script(out, graph.name, ENGINE_FILE, contract)
    elif check:
        report["ort_check"] = check_with_onnxruntime(wrapped, contract, graph)
    write_folder(cfg, contract, out, graph)
    return report
