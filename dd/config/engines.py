"""The engine registry: every engine's name, where its class lives, and its typed options.

This is the one place engines are named. It is plain data so that the supervisor and
the frontends can check a node_config.json's ENGINE and ENGINE_OPTIONS before any
process starts, without importing torch or an engine: the worker imports the class
(``EngineSpec.target``) only when it loads it (dd.worker.engines.create_engine).

Adding an engine is one ``EngineSpec`` in ``REGISTRY`` below: its name, its
``"module:Class"``, the DETECTION_TYPE values that select it, its option spec, and the
engine that computes the same answers where it cannot run (its fallback).

A user's engine from outside this package is named by ``"ENGINE": "pkg.module:Class"``;
its class may declare ``options: dict[str, Option]`` (checked when the worker loads it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Mapping

from dd.config.errors import ConfigError

JsonType = type | tuple[type, ...]


@dataclass(frozen=True)
class Option:
    """One ENGINE_OPTIONS key: the JSON types it accepts, its default (as documentation) and what it does."""

    types: JsonType
    default: Any = None
    help: str = ""

    def check(self, value: Any) -> bool:
        """True when a JSON value fits: bool is not an int here, an int is a float."""
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        if isinstance(value, bool):
            return bool in types
        if isinstance(value, int) and float in types:
            return True
        return isinstance(value, types)


@dataclass(frozen=True)
class EngineSpec:
    """One engine: name, class ("module:Class"), DETECTION_TYPE aliases, options, fallback."""

    name: str
    target: str
    # DETECTION_TYPE value -> input kind ("rgb" or "rgbd") that selects this engine.
    aliases: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Option] = field(default_factory=dict)
    # The engine that computes the same answers where this one cannot run here (EngineUnavailable).
    fallback: str | None = None
    # False: MODEL_WEIGHT is optional (the null engine has no network).
    needs_weights: bool = True
    # One line for `deep-detection inspect`.
    description: str = ""
    # False: recognised (DETECTION_TYPE values of older servers) so the error is precise, but not in this release.
    available: bool = True


_SIZES = Option(list, None, "input sizes [[H, W], ...] whose graphs are captured at load")

FAST_OPTIONS: dict[str, Option] = {
    "allow_cpu": Option(bool, False, "run on a CPU (tests): no graphs, no fp16, no Triton kernels"),
    "fp16": Option(bool, True, "half-precision backbone and RPN head"),
    "cuda_graphs": Option(bool, True, "replay one CUDA graph per canvas and batch bucket"),
    "input_graphs": Option(bool, True, "prepare a batch of one input size and depth kind with one CUDA graph "
                                       "(with cuda_graphs)"),
    "graph_masks": Option(bool, True, "paste the masks and make their RLE inside the network's CUDA graph (GPU "
                                      "only, with fixed_shapes)"),
    "graph_masks_max_bucket": Option(int, 4, "with graph_masks: the largest batch bucket whose graph pastes the masks "
                                             "(larger batches paste them after the graph, beside the next batch's "
                                             "network)"),
    "mask_changes": Option(float, 0.75, "with graph_masks: the changes of value along the masks' columns one image "
                                       "may have, per pixel of its canvas; a batch with more is pasted after "
                                       "the graph"),
    "pin_memory": Option(bool, True, "page-locked input copies"),
    "fixed_shapes": Option(bool, True, "false runs the older op-by-op path"),
    "pre_nms_topk": Option(int, 1024, "detection candidates entering the class-wise NMS (4096 without fixed_shapes)"),
    "nms_iterations": Option(int, 24, "iterations of the fixed-shape NMS before an image is redone"),
    "fold_batchnorm": Option(bool, True, "fold frozen batch norms into the convolutions"),
    "blocking_sync": Option(bool, False, "the host sleeps while waiting for the GPU instead of spinning a core"),
    "background_capture": Option(bool, True, "a shape not captured at load runs op by op while a thread captures it"),
    "cudnn_benchmark": Option(bool, False, "let cuDNN time its algorithms for each new shape (1-3 s per capture)"),
    "fuse_conv_relu": Option(bool, True, "ReLUs, residual adds and biases inside cuDNN's convolutions"),
    "triton_fpn": Option(bool, True, "the FPN's merges and the stem's max pool as Triton kernels"),
    "triton_nms": Option(bool, True, "NMS's overlap matrix as one Triton kernel"),
    "triton_roi_align": Option(bool, True, "RoI Align as one Triton kernel"),
    "class_mask_head": Option(bool, True, "the mask head computes only each detection's class"),
    "batch_buckets": Option((list, type(None)), None, "batch sizes with a graph (default 1, 2, 4, ... MAX_BATCH_SIZE)"),
    "buckets_at_load": Option((list, type(None)), None, "batch buckets captured at load for the warm-up sizes "
                                                        "(default all); the others in the background after load"),
    "warmup_sizes": _SIZES,
    "canvases": Option((list, type(None)), None, "padded network input sizes [[H, W], ...] with graphs; a batch runs on "
                                                 "the smallest that holds it (default: the warm-up sizes' own and the "
                                                 "largest the resize rule makes)"),
    "exact_canvases": Option(bool, False, "each image on its own padded size only (answers independent of batching, "
                                          "as parity checks want; a canvas per padded size, captured when first met)"),
    "max_canvases_at_load": Option(bool, False, "capture every canvas at load; false captures those beyond the "
                                                "warm-up sizes' in the background right after load"),
    "native_depthwise": Option(bool, True, "depthwise convolutions (MobileNetV3's) on PyTorch's own kernel: cuDNN "
                                           "builds one per new shape (0.2-0.5 s each, every capture)"),
    "warmup_compressed": Option(bool, True, "at load, one image as a JPEG and depth as PNG rows, where this engine "
                                            "decodes them (nvJPEG's set-up and first kernel launches; GPU only by "
                                            "default)"),
    "warmup_odd_size": Option(bool, True, "at load, one op-by-op run at a size whose feature maps divide differently "
                                          "(compiles what is still keyed on that; GPU only by default)"),
}

NULL_OPTIONS: dict[str, Option] = {
    "cost_ms": Option(float, 0.0, "milliseconds each batch takes"),
    "cost_ms_per_image": Option(float, 0.0, "milliseconds each image of a batch adds"),
    "instances": Option(int, 4, "instances per image"),
    "fail_on_pixel": Option((int, type(None)), None, "tests: fail a batch whose image has this value at [0, 0, 0]"),
    "png_rows": Option(bool, False, "benchmarks: take 16-bit PNG depths as their filtered rows, as the fast engine "
                       "on a GPU does (frontends are told to send them), and reconstruct them here with numpy"),
}

ORT_OPTIONS: dict[str, Option] = {
    "provider": Option(str, "auto", '"auto" (CUDA where the worker has a GPU and onnxruntime-gpu, else CPU), "cuda", "cpu"'),
    "intra_op_threads": Option(int, 0, "ONNX Runtime's intra-op threads (0: its default)"),
    "graph_optimization": Option(str, "all", "ONNX Runtime's graph optimisation level"),
}

REGISTRY: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("torchvision", "dd.worker.engines.torchvision_maskrcnn:TorchvisionMaskRCNN",
               {"RGBDMaskRCNNTorchServicer": "rgbd", "RGBMaskRCNNTorchServicer": "rgb",
                "MaskRCNNTorchServicer": "rgb"},
               description="torchvision (eager, CPU or GPU: torchvision's Mask R-CNN answers; the reference)"),
    EngineSpec("detectron2", "dd.worker.engines.detectron2_maskrcnn:Detectron2MaskRCNN",
               description="detectron2 (eager, CPU or GPU: detectron2's DefaultPredictor answers; the reference)"),
    EngineSpec("fast", "dd.worker.engines.fast.engine:FastMaskRCNN",
               {"RGBDMaskRCNNFastServicer": "rgbd", "RGBMaskRCNNFastServicer": "rgb"},
               FAST_OPTIONS, fallback="torchvision",
               description="fast (one CUDA graph per padded input canvas on a GPU; falls back to the reference engine "
                           "without one)"),
    EngineSpec("null", "dd.worker.engines.null:NullEngine",
               {"RGBDNullServicer": "rgbd", "RGBNullServicer": "rgb"}, NULL_OPTIONS,
               needs_weights=False, description="null (no network: test instances)"),
    EngineSpec("onnxruntime", "dd.worker.engines.onnxruntime:OnnxRuntimeMaskRCNN",
               {"RGBDMaskRCNNOnnxServicer": "rgbd", "RGBMaskRCNNOnnxServicer": "rgb"}, ORT_OPTIONS,
               description="onnxruntime (an exported ONNX graph in ONNX Runtime, CPU or CUDA)"),
    EngineSpec("tensorrt", "dd.worker.engines.tensorrt:TensorRTMaskRCNN",
               {"RGBDMaskRCNNTensorRTServicer": "rgbd", "RGBMaskRCNNTensorRTServicer": "rgb",
                "MaskRCNNTensorRTServicer": "rgb"},
               description="tensorrt (a serialized TensorRT engine built from a tensorrt-onnx export; CUDA GPU)"),
    EngineSpec("torchscript", "", available=False),
)}


def available_engines() -> list[str]:
    return [name for name, spec in REGISTRY.items() if spec.available]


def detection_types() -> dict[str, tuple[str, str]]:
    """DETECTION_TYPE value -> (engine, input kind), from every engine's aliases."""
    return {alias: (spec.name, kind) for spec in REGISTRY.values() for alias, kind in spec.aliases.items()}


def is_custom(engine: str) -> bool:
    """A user's engine: "pkg.module:Class"."""
    return ":" in engine


def spec_for(engine: str) -> EngineSpec | None:
    return REGISTRY.get(engine)


def check_custom_target(engine: str) -> str | None:
    """The problem with a "pkg.module:Class" value, or None. Finds the module without running it (the
    supervisor and frontends never import an engine); the class and its options are checked in the worker."""
    module, _, cls = engine.partition(":")
    if not module or not cls or not all(p.isidentifier() for p in module.split(".")) or not cls.isidentifier():
        return f"{engine!r} is not of the form 'package.module:ClassName'"
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"cannot find module {module!r} ({exc}); is its folder on PYTHONPATH?"
    if found is None:
        return f"cannot find module {module!r}; is its folder on PYTHONPATH?"
    return None


def check_options(engine: str, options: Mapping[str, Option], given: Mapping[str, Any], where: str) -> None:
    """Raises ConfigError for an ENGINE_OPTIONS key the engine does not have, or a value of the wrong type."""
    for key, value in given.items():
        opt = options.get(key)
        if opt is None:
            allowed = ", ".join(sorted(options)) or "none"
            raise ConfigError(f"{where}: key 'ENGINE_OPTIONS': {key!r} is not an option of engine {engine!r}; "
                              f"allowed: {allowed}")
        if not opt.check(value):
            types = opt.types if isinstance(opt.types, tuple) else (opt.types,)
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{where}: key 'ENGINE_OPTIONS': {key!r} of engine {engine!r} must be {names}, "
                              f"got {value!r}")
