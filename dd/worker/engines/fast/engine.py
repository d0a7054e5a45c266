"""The fast GPU path for the same Mask R-CNN weights as the torchvision engine.

Eager torchvision spends most of its time on the host: preprocessing image by
image, hundreds of small kernels launched one by one, host syncs after every
filtering step, and a Python loop that pastes every instance's mask into a
full-image tensor, which pycocotools then scans pixel by pixel. Here:

- the whole network, from the normalised, resized and zero-padded network
  input to each detection's mask probabilities, runs with fixed shapes
  (fixed_shapes.py: padded top-k lists with validity masks, NMS as a batched
  fixed point), so it is captured once per (batch bucket, canvas) as one CUDA
  graph and replayed with one launch. A canvas is a padded network input size
  (canvases.py): the warm-up sizes' own, and the largest two the resize rule
  can make (landscape and portrait), so every input size fits one; a batch
  of any sizes runs on the smallest canvas that holds all its images (a
  batch of portrait and landscape images: a graph per canvas), each
  image at the top left of its slot with zeros around it, and its sizes (the
  resized size that bounds its boxes, the ratio and size back to input
  pixels) as per-image tensors that the graph reads, so no input size needs
  a capture of its own. A batch is padded up to the next captured bucket
  (1, 2, 4, 8, ...), as vLLM does. The largest canvases are captured by a
  background thread right after load (max_canvases_at_load: at load); a
  batch whose canvas is still being captured, or that fits none of a
  configured `canvases`, runs the same network op by op on its canvas
  meanwhile (graph_cache.py), so no request waits for a capture, nor for a
  Triton compilation: the kernels take every size-dependent number
  unspecialized (kernels/specialization.py), and load also pastes masks at an
  "odd" input size (odd_size.py) to compile whatever is still keyed on that;
- an image whose canvas is its own padded size gets exactly the answers it
  got with a graph per input size (the same network input bit for bit, the
  same clamps); on a larger canvas (batched with a larger image, or where
  its own canvas is not one of the canvases) it is padded more, as torchvision
  and detectron2 pad an image batched with larger ones, and its answers may
  differ slightly: features within reach of the extra padding, and RPN
  anchors over it, change;
- preprocessing runs before the replay, per group of equal input size
  (convert, normalise, resize: elementwise ops, interpolate, PIL's taps;
  nothing planned or compiled per size), from the shared-memory slot copied
  through a pinned (page-locked) mapping or a batch's JPEGs decoded by nvJPEG,
  written into each image's slot of the canvas; a batch of one input size and
  depth kind replays it as a graph of its own (input_graphs.py), since its
  dozens of small kernels otherwise leave the GPU waiting for the host;
- backbone, FPN and RPN head run in fp16, channels-last, batch norm folded and
  a ResNet's ReLUs, residual adds and downsample biases inside cuDNN's
  convolutions, the RPN head's conv + ReLU as one (fused_blocks.py); the FPN's
  top-down merges (bias + nearest upsampling + sum), its biases and the stem's
  max pool as one-pass Triton kernels (kernels/channels_last.py); NMS's overlap matrix is
  one Triton kernel (kernels/suppression.py); RoI Align pools each box once, from its
  own level, with one Triton kernel reading the fp16 levels as they are
  (kernels/roi_align.py); the box head under fp16 autocast; the mask head
  computes only each detection's own class, biases and ReLUs fused
  (mask_head.py);
- in a batch of up to graph_masks_max_bucket images, masks are pasted and
  encoded as COCO RLE strings for every detection slot inside the same
  graph (kernels/fixed_rle.py: the sizes live on the device, the buffers
  have capacities from the canvas, ENGINE_OPTIONS mask_changes), so the host
  reads back the strings' bounds and characters and nothing else; a larger
  batch (whose paste then overlaps the next batch's network), one over
  those capacities, or any with graph_masks off has its kept detections'
  masks pasted after the graph (one ragged Triton kernel, kernels/paste.py,
  and kernels/rle.py, through masks.py), only the strings' characters
  coming back.

An image whose NMS did not settle within the graph's iterations, or whose
class-wise NMS would have needed more than the top-k candidates, is redone on
the dynamic path (the earlier, op-by-op version, kept for that and for
`fixed_shapes: false`), so the answers are torchvision's either way.

A model built for detectron2 weights carries detectron2's inference rules as
its `semantics` (dd.models.semantics; torchvision's when it has none), and
both paths follow them: the resized size rounded half up; an RGB image
resized as PIL resizes uint8 images (pil_resize.py), then normalised (an
RGB-D one, color and depth as one float image, with plain bilinear); the RPN
ranking proposals by logit and keeping every non-empty one; RoI Align
aligned with the adaptive grid and detectron2's FPN level formula
(fixed_shapes.py); no size filter before the class-wise NMS, then the boxes
scaled back with detectron2's arithmetic, clipped to the image, and empty
ones dropped; and detectron2's mask paste (masks.py, kernels/paste.py).

Falls back to the torchvision engine (with a log line) where it cannot run: no
GPU. ENGINE_OPTIONS: fp16 (true), cuda_graphs (true), pin_memory (true),
fixed_shapes (true), nms_iterations (24), fold_batchnorm (true; GPU only),
fuse_conv_relu (true; ReLUs, residual adds and biases in cuDNN's convolutions,
GPU only, needs fold_batchnorm), triton_fpn (true; GPU only), triton_nms (true;
GPU only), triton_roi_align (true; GPU only), class_mask_head (true),
input_graphs (true; GPU only, with cuda_graphs and fixed_shapes),
graph_masks (true; GPU only, with fixed_shapes), graph_masks_max_bucket (4),
mask_changes (0.75),
pre_nms_topk (1024 with fixed shapes, 4096 without), batch_buckets ([1, 2, 4,
8, ...] up to MAX_BATCH_SIZE), buckets_at_load (all; the others captured in
the background), warmup_sizes ([[H, W], ...] input sizes whose canvases are
captured at load), canvases ([[H, W], ...] padded network inputs
with graphs; default the warm-up sizes' and the largest two),
max_canvases_at_load (false), exact_canvases (false; true: each image on its own
padded size only, as parity checks want), warmup_odd_size (true on a GPU),
warmup_compressed (true on a GPU), native_depthwise (true), background_capture (true),
cudnn_benchmark (false),
blocking_sync (false), allow_cpu (false; the CPU path exists for tests
and has no graphs or fp16). Each Triton step falls back to torch operations,
with a log line, where its kernel cannot compile (kernels/switch.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from dd.models.build import build_loaded_model
from dd.models.semantics import TORCHVISION, Semantics
from dd.png_rows import PngRows
from dd.worker.engines.base import (Detections, EncodedImage, Engine, EngineInput, EngineUnavailable, RleText,
                                    image_size)
from dd.worker.engines.fast.batchnorm_fold import fold_batchnorm
from dd.worker.engines.fast.canvases import (ROW, Canvas, canvas_of, default_canvases, enclosing, image_row, padded,
                                             parse_canvases, pick_canvas)
from dd.worker.engines.fast.depthwise import native_depthwise
from dd.worker.engines.fast.fixed_shapes import FixedShapeHeads, large_enough, rpn_min_size
from dd.worker.engines.fast.fused_blocks import fuse_conv_relu_pairs, fuse_fpn, fuse_resnet_blocks
from dd.worker.engines.fast.graph_cache import GraphCache
from dd.worker.engines.fast.input_graphs import PNG_ROWS, InputGraph, copy_in, input_key
from dd.worker.engines.fast.input_graphs import buffers as input_buffers
from dd.worker.engines.fast.mask_head import ClassMaskHead
from dd.worker.engines.fast.odd_size import odd_warmup_size
from dd.worker.engines.jpeg_decode import decode_to_device
from dd.worker.engines.masks import paste_and_encode
from dd.worker.engines.fast.pil_resize import PilBilinear
from dd.worker.engines.kernels import fixed_rle
from dd.worker.engines.kernels.switch import KernelSwitch
from dd.worker.engines.pinned import PinnedMappings
from dd.worker.engines.png_unfilter import depth_dtype as depth_dtype_of
from dd.worker.engines.png_unfilter import depth_to_device, depths_into, host_array, unfilter_rows

log = logging.getLogger(__name__)

_GRAPH_MASKS = KernelSwitch("paste and RLE kernels for the graph", "pasting masks after the graph instead",
                            fixed_rle.available)


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's GeneralizedRCNNTransform resizes an h x w image to (the engine asks its
    model's semantics, which may round as detectron2 does)."""
    return TORCHVISION.resized_size(h, w, min_size, max_size)


def batch_buckets(max_batch: int, given: list[int] | None = None) -> list[int]:
    """Batch sizes to capture graphs for: powers of two up to the model's maximum, and the maximum.

    A batch is padded up to the next bucket: at most twice the images' backbone
    work for the padding, in exchange for never capturing a graph (seconds of
    stall) while requests wait.
    """
    if given:
        sizes = {int(b) for b in given if 0 < int(b) <= max_batch}
    else:
        sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return sorted(sizes | {max_batch})


@dataclass
class _FixedGraph:
    """Static inputs and outputs of the fixed-shape network for one (bucket, canvas height, canvas width)."""

    x: torch.Tensor  # bucket x C x CH x CW: the normalised, resized, zero-padded input (network dtype and layout)
    sizes: torch.Tensor  # bucket x ROW float32: each image's numbers (canvases.image_row)
    threshold: torch.Tensor  # 0-d float32: the box score threshold of the batch
    out: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None  # None on the CPU: run eagerly
    # Per slot, the (rows, columns) at its top left that may hold non-zero values (the last image written
    # there; a slot not listed yet: all of it); the rest of the slot is zero. On the host, so that a slot
    # is cleared only where an earlier image reached beyond the new one.
    written: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Answers:
    """A batch's network answers, taken from its graph's outputs in stream order right after its replay,
    so that the next batch's replay (which overwrites them) may be queued before these are read: the
    summary on its way to page-locked host memory, the mask probabilities copied on the device, and
    the event after both. On the CPU the network has run when start returns: no copies, no event."""

    summary: torch.Tensor  # n x (7 d + 1): boxes, scores, labels, kept flags, settled flag (canvases.py)
    probs: torch.Tensor | None  # n x d x M x M mask probabilities; None when no masks are wanted
    detections: int  # d: detections per image
    ready: "torch.cuda.Event | None"
    # With graph_masks: the strings the graph made for every detection slot of the bucket (fixed_rle.encode's
    # head, with the capacities and what the batch needed, on its way to page-locked memory, and its text,
    # copied on the device).
    rle_head: torch.Tensor | None = None
    rle_text: torch.Tensor | None = None


def _shape_key(item: EngineInput) -> tuple[int, int, str | None]:
    """Images with the same key run through the same op-by-op shapes (the dynamic path, and images
    redone on it): size and depth dtype."""
    return (*image_size(item.color), None if item.depth is None else item.depth.dtype.str)


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """NMS within each group, as one NMS call: groups are moved apart so they cannot overlap.

    torchvision's batched_nms switches to one NMS call per group above 20000
    boxes on a GPU; with 90 classes that is 90 calls and 90 host syncs. This is
    its coordinate trick (torchvision.ops.boxes._batched_nms_coordinate_trick),
    which is private there, so it is not imported.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = groups.to(boxes) * (boxes.max() + 1)
    return box_ops.nms(boxes + offsets[:, None], scores, iou)


class FastMaskRCNN(Engine):
    name = "fast"
    decodes_jpeg = True  # a batch's JPEGs in one nvJPEG call, straight into the graph's input (jpeg_decode)
    unfilters_png_rows = True  # 16-bit PNG depth rows reconstructed on the GPU into the graph's input (png_unfilter)

    def load(self) -> None:
        opts: dict[str, Any] = self.config.engine_options
        self.dev = torch.device(self.device)
        cuda = self.dev.type == "cuda"
        if not cuda and not opts.get("allow_cpu", False):
            raise EngineUnavailable("the fast engine needs a CUDA GPU and this worker has none")
        self.fp16 = cuda and bool(opts.get("fp16", True))
        self.use_graphs = cuda and bool(opts.get("cuda_graphs", True))
        self.pin = cuda and bool(opts.get("pin_memory", True))
        self.fixed = bool(opts.get("fixed_shapes", True))
        # Detection candidates (box x class) kept for NMS, by score. Exact whenever the survivors
        # among them fill max_detections (checked per image; otherwise the image is redone).
        self.pre_nms_topk = int(opts.get("pre_nms_topk", 1024 if self.fixed else 4096))
        # Off by default: measured on an H200 (R50-FPN RGB-D 1280x720, batch 1, 100 in a row) blocking
        # waits cost 5.2 instead of 4.4 ms per image and save 2.5 ms of host CPU (1.9 instead of 4.4 ms).
        self.blocking = cuda and bool(opts.get("blocking_sync", False))
        if self.blocking:
            self._blocking_sync()
        t_start = time.perf_counter()
        # Built on the CPU before the first CUDA call: the worker creates the GPU's context meanwhile
        # (dd/worker/cuda_context.py).
        model = build_loaded_model(self.config).eval()
        # A batch's masks are pasted on a stream of their own, at high priority, while the next batch's
        # network runs on the serving stream (start, _fixed_results).
        self._paste_stream = torch.cuda.Stream(self.dev, priority=-1) if cuda else None
        self.model = model.to(self.dev)
        t_built = time.perf_counter()
        # The inference rules the weights were trained with: torchvision's, or detectron2's.
        self.semantics: Semantics = getattr(self.model, "semantics", TORCHVISION)
        sem = self.semantics
        # detectron2 resizes a uint8 (RGB) image with PIL; its RGB-D input is a float image.
        self._pil = PilBilinear() if sem.resize_antialias_uint8 and self.config.input_kind != "rgbd" else None
        if cuda:
            # Off by default: measured on an H200, the same engine speed (R50-FPN 1280x720: 3.9 vs 4.0 ms
            # at batch 1, 530 vs 533 images/s at batch 8) and 0.2-0.3 s per graph capture instead of 1-3 s.
            torch.backends.cudnn.benchmark = bool(opts.get("cudnn_benchmark", False))
            if opts.get("fold_batchnorm", True):
                log.debug("folded %d batch norms into convolutions", fold_batchnorm(self.model.backbone))
            self.model.backbone.to(memory_format=torch.channels_last)
            self.model.rpn.head.to(memory_format=torch.channels_last)  # it convolves the FPN's channels-last levels
        if self.fp16:
            self.model.backbone.half()
            self.model.rpn.head.half()
        if cuda and opts.get("native_depthwise", True):  # MobileNetV3's: no per-shape cuDNN build (depthwise.py)
            log.debug("%d depthwise convolutions on PyTorch's native kernel", native_depthwise(self.model.backbone)[0])
        self.dtype = torch.float16 if self.fp16 else torch.float32
        cfg = self.config
        # The normalisation torchvision's transform would apply (color, then depth for RGB-D).
        self.mean = torch.tensor(self.model.transform.image_mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(self.model.transform.image_std, device=self.dev).view(1, -1, 1, 1)
        if cuda and opts.get("fold_batchnorm", True) and opts.get("fuse_conv_relu", True):
            self._fuse_backbone()
        if cuda and opts.get("triton_fpn", True):
            self._fuse_fpn()
        self.fill = cfg.depth_fill
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self.heads = FixedShapeHeads(self.model, int(opts.get("nms_iterations", 24)), self.pre_nms_topk,
                                     kernel=cuda and bool(opts.get("triton_nms", True)),
                                     roi_kernel=cuda and bool(opts.get("triton_roi_align", True)),
                                     semantics=sem)
        if opts.get("class_mask_head", True):
            try:
                self.heads.class_mask_head = ClassMaskHead(self.model.roi_heads.mask_head,
                                                           self.model.roi_heads.mask_predictor, self.dtype)
            except ValueError as exc:
                log.info("mask head runs as torchvision's (%s)", exc)
        self.buckets = batch_buckets(cfg.max_batch_size, opts.get("batch_buckets"))
        sizes = opts.get("warmup_sizes") or [[cfg.min_size, cfg.min_size]]
        # The padded network inputs with a graph (canvases.py): the warm-up sizes' own and the largest the
        # resize rule makes, unless named; a batch runs on the smallest that holds all its images.
        self.canvases: list[Canvas] = (
            parse_canvases(opts["canvases"]) if opts.get("canvases") is not None else
            default_canvases(sizes, lambda h, w: sem.resized_size(h, w, cfg.min_size, cfg.max_size),
                             cfg.min_size, cfg.max_size))
        # Each image on its own padded size only (answers independent of batching and of the canvases, as a
        # graph per input size gave them; its canvas is captured when first met): for parity checks.
        self.exact_canvases = bool(opts.get("exact_canvases", False))
        self._mask_size: tuple[int, ...] = ()
        self._fixed_graphs: dict[tuple[Any, ...], _FixedGraph] = {}
        self._ratios: dict[tuple[int, ...], torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs and self.fixed else None
        # A batch of one size and depth kind is prepared for the network by one graph (input_graphs.py).
        self.input_graphs = self.use_graphs and self.fixed and bool(opts.get("input_graphs", True))
        self._input_pool = torch.cuda.graph_pool_handle() if self.input_graphs else None
        self._input_buffers: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._input_captures_at_load = [0, 0.0]  # count, seconds: for the load's log line
        # A batch's masks pasted and encoded inside its network's graph (kernels/fixed_rle.py), within
        # capacities per image from its canvas: mask_changes x the canvas's pixels of changes, and change
        # slots (the boxes' areas) for 32 canvases. A batch that needs more is pasted after the graph.
        self.graph_masks = cuda and self.fixed and bool(opts.get("graph_masks", True)) and _GRAPH_MASKS.on
        self.mask_changes = float(opts.get("mask_changes", 0.75))
        # Only up to this batch bucket: a larger batch's host work after the graph is shared by its images and
        # overlaps the next batch's network, which the masks' GPU work inside the graph would delay instead.
        self.graph_masks_max_bucket = int(opts.get("graph_masks_max_bucket", 4))
        if not self.mask_changes > 0:
            raise ValueError(f"ENGINE_OPTIONS mask_changes must be positive, not {self.mask_changes}")
        self._programs = 4 * torch.cuda.get_device_properties(self.dev).multi_processor_count if cuda else 4
        self.masks_over_capacity = 0  # batches whose masks did not fit (benchmarks and logs)
        # Shapes not captured at load are served op by op while a background thread captures them.
        self._graph_cache: GraphCache[_FixedGraph | InputGraph] = GraphCache(
            self._capture, background=bool(opts.get("background_capture", True)), describe=self._describe)
        # Images redone on the dynamic path (NMS not settled, or top-k too small): for benchmarks and logs.
        self.redone_images = 0
        self._loaded = False
        self._anchors: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._pinned = PinnedMappings(self.pin)
        # Set to a dict to collect per-stage wall times (synchronising between stages): benchmarks only.
        self.stage_times: dict[str, list[float]] | None = None
        self._t_last = 0.0
        t_prepared = time.perf_counter()
        # Warm-up captures the graphs; without them (the CPU) one image proves the model runs.
        batches = (self.buckets if self.fixed else sorted({1, cfg.max_batch_size})) if self.use_graphs else [1]
        if self.fixed and opts.get("buckets_at_load") is not None:
            at_load = self._buckets_at_load(opts["buckets_at_load"])
            if self.use_graphs:  # the others go to the background thread with the other canvases (a batch
                batches = at_load  # at one of them runs op by op until its graph is there): serving sooner
        for h, w in sizes:
            for b in batches:
                dummy = [EngineInput(np.zeros((h, w, 3), np.uint8),
                                     np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)] * b
                self.infer(dummy)  # captures the network's graph and the input graph for depth pixels
                if self.input_graphs and cfg.input_kind == "rgbd" and self.unfilters_png_rows:
                    # and for depth as PNG rows, which the frontends send this engine
                    self._input_graph(("inputs", b, *self.canvas_for([(h, w)]), h, w, PNG_ROWS))
        self.redone_images = 0  # blank warm-up images tie everywhere and are redone; count real ones only
        if self.fixed and bool(opts.get("warmup_odd_size", cuda)):
            self._warm_odd_size(sizes)
        if bool(opts.get("warmup_compressed", cuda)):
            self._warm_compressed(*sizes[0])
        # The other canvases (the largest ones, by default): captured here if asked, else by the background
        # thread right after load, so start-up does not wait for them; a batch on one of them runs op by op
        # on it until its graph is there.
        rest = ([(b, *c) for b in self.buckets for c in self.canvases]
                if self.use_graphs and self.fixed and not self.exact_canvases else [])
        if opts.get("max_canvases_at_load", False):
            for key in rest:
                self._graph_cache.capture_now(key)
        self._loaded = True
        for key in rest:
            self._graph_cache.get(key)  # queued unless captured already
        done = time.perf_counter()
        log.info("fast engine loaded in %.1f s: weights and model %.1f s, fusing and kernels %.1f s, "
                 "warm-up and graph captures %.1f s (of which %d input graphs %.2f s)", done - t_start,
                 t_built - t_start, t_prepared - t_built, done - t_prepared, *self._input_captures_at_load)

    def _buckets_at_load(self, given: list[Any]) -> list[int]:
        wanted = sorted({int(b) for b in given})
        unknown = [b for b in wanted if b not in self.buckets]
        if not wanted or unknown:
            raise ValueError(f"ENGINE_OPTIONS buckets_at_load {given}: name some of the batch buckets "
                             f"{self.buckets} (batch_buckets, default powers of two up to MAX_BATCH_SIZE)")
        return wanted

    @torch.inference_mode()
    def _warm_odd_size(self, sizes: list[list[int]]) -> None:
        """An image at an input size whose resized size divides differently from the first warm-up size's
        (odd_size.py) prepared onto its canvas, then a paste and RLE encoding of a few masks at that size.
        The network sees only canvases, all captured (or being captured) already; the paste and RLE
        kernels see the input size, and blank warm-up images may never reach them: whatever they still
        compile per divisibility of a size (their Triton kernels are not specialized on sizes:
        kernels/specialization.py) would otherwise be compiled by the first request that needs it."""
        cfg = self.config
        h, w = odd_warmup_size(sizes, lambda a, b: self.semantics.resized_size(a, b, cfg.min_size, cfg.max_size))
        t0 = time.perf_counter()
        item = EngineInput(np.zeros((h, w, 3), np.uint8),
                           np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)
        self._write_inputs([item], _FixedGraph(*self._static_inputs((1, *self.canvas_for([(h, w)]))), {}, None))
        corner = np.array([[0.1 * w, 0.1 * h], [0.5 * w, 0.3 * h], [0.2 * w, 0.6 * h]], np.float32)
        boxes = np.concatenate([corner, corner + np.float32(0.3 * min(h, w))], 1)
        # masks all on, in boxes inside the image: every kernel of the paste and RLE runs
        paste_and_encode(torch.ones(len(boxes), *self._mask_size, device=self.dev), boxes, h, w, cfg.mask_threshold,
                         rule=self.semantics.paste)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        log.info("prepared an input and pasted masks at %dx%d in %.2f s (what compiles per divisibility of an "
                 "input size compiles now, not at the first request of such a size)", w, h, time.perf_counter() - t0)

    def _blocking_sync(self) -> None:
        """The host sleeps while it waits for the GPU instead of spinning on a core (CUDA's default while
        the GPU is busy): the worker's CPU time per request is then its own work. Set on the device's
        primary context through the driver API (torch has no binding for it); where that fails, CUDA
        keeps spinning and one debug line says why."""
        try:
            libcuda = ctypes.CDLL("libcuda.so.1")
            dev = ctypes.c_int()
            if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGet(ctypes.byref(dev), self.dev.index or 0) != 0:
                raise OSError("cuInit/cuDeviceGet failed")
            err = libcuda.cuDevicePrimaryCtxSetFlags_v2(dev, 0x4)  # CU_CTX_SCHED_BLOCKING_SYNC
            if err != 0:
                raise OSError(f"cuDevicePrimaryCtxSetFlags returned {err}")
        except (OSError, AttributeError) as exc:
            log.debug("cannot ask CUDA for blocking synchronisation (%s); it spins while waiting", exc)

    def _fuse_backbone(self) -> None:
        """ReLUs and residual adds into the convolutions (fused_blocks), if cuDNN runs them here: the
        backbone's blocks and stem, and the RPN head's conv."""
        undo_blocks = fuse_resnet_blocks(self.model.backbone)
        undo_head = fuse_conv_relu_pairs(self.model.rpn.head)
        probe = torch.zeros(1, self.mean.numel(), 64, 64, device=self.dev, dtype=self.dtype)
        try:
            with torch.inference_mode():
                feats = self.model.backbone(probe.contiguous(memory_format=torch.channels_last))
                self.model.rpn.head(list(feats.values()))
        except RuntimeError as exc:
            undo_blocks()
            undo_head()
            log.warning("cuDNN cannot fuse the backbone's ReLUs into its convolutions here (%s); running "
                        "them separately", exc)

    def _fuse_fpn(self) -> None:
        """The FPN's merges and biases and the stem's max pool as one-pass Triton kernels (fused_blocks.
        fuse_fpn), if they compile here."""
        undo = fuse_fpn(self.model.backbone)
        probe = torch.zeros(1, self.mean.numel(), 64, 64, device=self.dev, dtype=self.dtype)

        def trial() -> None:
            with torch.inference_mode():
                self.model.backbone(probe.contiguous(memory_format=torch.channels_last))

        KernelSwitch("FPN kernels", "using torch operations").probe(trial, undo)

    # -- host memory ----------------------------------------------------------------------
    def _pin_source(self, arr: np.ndarray) -> None:
        """Page-locks the shared-memory mapping an input lives in, once, so copies to the GPU are DMA."""
        self._pinned.pin_source(arr)

    def prepare_input_memory(self, mapping: object) -> None:
        if isinstance(mapping, mmap.mmap):
            with self._graph_cache.recording:  # a CUDA call: never while a background capture records
                self._pinned.pin_mapping(mapping)

    def release_input_memory(self, mapping: object) -> None:
        with self._graph_cache.recording:  # a CUDA call: never while a background capture records
            if self.dev.type == "cuda":
                # A started batch may still be copying from it (the worker starts the next batch before
                # it finishes the last): rare (a frontend went), so wait for the device rather than track.
                torch.cuda.synchronize(self.dev)
            self._pinned.release(mapping)

    # -- stages -----------------------------------------------------------------------------
    def _mark(self, stage: str | None) -> None:
        if self.stage_times is None:
            return
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if stage is not None:
            self.stage_times.setdefault(stage, []).append((now - self._t_last) * 1e3)
        self._t_last = now

    def _preprocess(self, items: list[EngineInput], rh: int, rw: int) -> torch.Tensor:
        colors = []
        decoded = iter(decode_to_device([it.color for it in items if isinstance(it.color, EncodedImage)], self.dev))
        for it in items:
            if isinstance(it.color, EncodedImage):
                colors.append(next(decoded))
                continue
            self._pin_source(it.color)
            colors.append(torch.from_numpy(it.color).to(self.dev, non_blocking=True))
        depth = None
        if self.config.input_kind == "rgbd":
            depths = []
            for it in items:
                if it.depth is None:
                    raise ValueError("RGB-D model needs depth")
                self._pin_source(host_array(it.depth))
                depths.append(depth_to_device(it.depth, self.dev))
            depth = torch.stack(depths)
        return self._normalize(torch.stack(colors), depth, rh, rw)

    def _normalize(self, color: torch.Tensor, depth: torch.Tensor | None, rh: int, rw: int) -> torch.Tensor:
        """uint8 B x H x W x 3 (+ depth B x H x W) -> the padded, normalised network input, on the device."""
        return self._pad(self._resized(color, depth, rh, rw), rh, rw)

    def _resized(self, color: torch.Tensor, depth: torch.Tensor | None, rh: int, rw: int) -> torch.Tensor:
        """uint8 B x H x W x 3 (+ depth B x H x W) -> float32 B x C x rh x rw, normalised and resized.

        Normalised, then resized with bilinear interpolation (the same up to rounding as the other way
        round, and what torchvision does); with detectron2's semantics an RGB image is resized first, as
        PIL resizes a uint8 image (what detectron2's ResizeShortestEdge does), then normalised. Every
        output value depends on its own image only, so a batch gives each image's values alone."""
        if self._pil is not None:
            x = self._pil(color, rh, rw).permute(0, 3, 1, 2).float().div_(255.0)
            return (x - self.mean) / self.std
        x = color.permute(0, 3, 1, 2).float().div_(255.0)  # B x 3 x H x W
        if self.config.input_kind == "rgbd":
            assert depth is not None
            d = depth.float()[:, None]
            if depth.dtype == torch.uint16:
                d = d * self.config.depth_unit_m
            d = torch.where(d > 0, d, torch.full_like(d, self.fill))
            x = torch.cat([x, d], dim=1)
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)

    def _pad(self, x: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
        """Zero-padded to multiples of 32 (after normalisation, as both libraries pad), in the network's
        dtype and memory format."""
        out = torch.zeros(x.shape[0], x.shape[1], padded(rh), padded(rw), device=self.dev, dtype=self.dtype)
        out[:, :, :rh, :rw] = x
        return out.contiguous(memory_format=torch.channels_last) if self.dev.type == "cuda" else out

    def _trunk(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        feats = self.model.backbone(x)
        objectness, deltas = self.model.rpn.head(list(feats.values()))
        return feats, objectness, deltas

    def _trunk_graphed(self, x: torch.Tensor):
        if not self.use_graphs or self.fixed:  # with fixed shapes this path only redoes rare images
            return self._trunk(x)
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            static_x = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._trunk(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._trunk(static_x)
            entry = (graph, static_x, static_out)
            self._graphs[key] = entry
            log.info("captured a CUDA graph for input %s", key)
        graph, static_x, static_out = entry
        static_x.copy_(x)
        graph.replay()
        return static_out

    def _anchors_for(self, images: ImageList, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(images.tensors.shape) + tuple(images.image_sizes[0])
        if key not in self._anchors:
            self._anchors[key] = self.model.rpn.anchor_generator(images, feats)
        return self._anchors[key]

    def _proposals(self, objectness: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                   n_images: int, rh: int, rw: int) -> list[torch.Tensor]:
        """torchvision's RPN filtering (top-k per level, clip, drop tiny boxes, NMS per level, top-k),
        for the whole batch at once: one NMS call and one host sync instead of several per image.
        With detectron2's semantics: ranked by logit, no score threshold, only empty boxes dropped."""
        rpn = self.model.rpn
        sem = self.semantics
        num_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        boxes = rpn.box_coder.decode(dl, anchors).view(n_images, -1, 4)
        obj = obj.view(n_images, -1)
        tops, levels, start = [], [], 0
        for level, n in enumerate(num_per_level):
            k = min(rpn.pre_nms_top_n(), n)
            tops.append(obj[:, start:start + n].topk(k, dim=1).indices + start)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=obj.device))
            start += n
        top = torch.cat(tops, dim=1)  # B x K
        lvl = torch.cat(levels)
        k_all = top.shape[1]
        scores = obj.gather(1, top)
        if not sem.rpn_rank_by_logit:
            scores = scores.sigmoid()
        cand = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        cand[..., 0::2] = cand[..., 0::2].clamp(0, rw)
        cand[..., 1::2] = cand[..., 1::2].clamp(0, rh)
        wh = cand[..., 2:] - cand[..., :2]
        valid = large_enough(wh, rpn_min_size(rpn, sem), sem.min_size_strict)
        if not sem.rpn_rank_by_logit:
            valid &= scores >= rpn.score_thresh
        # Invalid candidates sort last and can only suppress each other, so they are removed after NMS.
        floor = -1.0 if not sem.rpn_rank_by_logit else float("-inf")  # below every valid score
        scores = torch.where(valid, scores, torch.full_like(scores, floor))
        image = torch.arange(n_images, device=obj.device)[:, None].expand(-1, k_all)
        groups = (image * len(num_per_level) + lvl[None, :]).reshape(-1)
        keep = grouped_nms(cand.reshape(-1, 4), scores.reshape(-1), groups, rpn.nms_thresh)
        keep = keep[valid.reshape(-1)[keep]]
        # keep is in descending score over all images; a stable sort by image keeps that order within each.
        img_of = keep // k_all
        order = torch.sort(img_of, stable=True).indices
        keep, img_of = keep[order], img_of[order]
        counts = torch.bincount(img_of, minlength=n_images).tolist()
        flat = cand.reshape(-1, 4)
        return [b[: rpn.post_nms_top_n()] for b in flat[keep].split(counts)]

    def _detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: list[torch.Tensor],
                    rh: int, rw: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """torchvision's detection post-processing with the class-wise NMS done as one call.

        Only the pre_nms_topk best (box, class) candidates enter NMS. Greedy NMS
        decides a box by the higher-scoring boxes of its class alone, so the
        survivors among the top-k are exactly the overall survivors above the
        k-th score; when they number max_detections or more, the answer is
        torchvision's exactly. When they do not, the image is redone with every candidate.
        """
        heads = self.model.roi_heads
        n_classes = class_logits.shape[-1]
        pred_boxes = heads.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        per_image = [p.shape[0] for p in proposals]
        out_b, out_s, out_l = [], [], []
        for boxes, scores in zip(pred_boxes.split(per_image), pred_scores.split(per_image)):
            boxes = box_ops.clip_boxes_to_image(boxes, (rh, rw))[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, n_classes, device=boxes.device).repeat(scores.shape[0])
            scores = scores[:, 1:].reshape(-1)
            valid = scores > heads.score_thresh
            if self.semantics.postprocess == "torchvision":  # detectron2 drops empty boxes after rescaling
                valid &= large_enough(boxes[:, 2:] - boxes[:, :2], self.semantics.min_box_size,
                                      self.semantics.min_size_strict)
            masked = torch.where(valid, scores, torch.full_like(scores, -1.0))
            k = min(self.pre_nms_topk, masked.numel())
            while True:
                top_s, top_i = masked.topk(k)
                keep = grouped_nms(boxes[top_i], top_s, labels[top_i], heads.nms_thresh)
                keep = keep[top_s[keep] > heads.score_thresh]
                if len(keep) >= heads.detections_per_img or k == masked.numel() or int(valid.sum()) <= k:
                    break
                k = masked.numel()
            keep = keep[: heads.detections_per_img]
            out_b.append(boxes[top_i][keep])
            out_s.append(top_s[keep])
            out_l.append(labels[top_i][keep])
        return out_b, out_s, out_l

    def _warm_compressed(self, h: int, w: int) -> None:
        """One image as the frontends send it to this engine: a JPEG (decoded here, on the GPU: nvJPEG's
        handle and buffers are made at its first call) and depth as PNG rows (kernels launched for the
        first time: with CUDA's lazy module loading each first launch loads its module). Otherwise the
        first requests after SERVING paid that, tens of ms each."""
        t0 = time.perf_counter()
        color: np.ndarray | EncodedImage = np.zeros((h, w, 3), np.uint8)
        jpeg = self.decodes_jpeg and self.receives_jpeg  # none reaches it where the frontends decode them all
        if jpeg:
            color = EncodedImage(encode_jpeg(torch.from_numpy(color).permute(2, 0, 1)).numpy(), h, w)
        depth: np.ndarray | PngRows | None = None
        if self.config.input_kind == "rgbd":
            # every row filter None (0), samples zero: a valid PNG's rows, the kernels of any filter
            depth = PngRows(np.zeros((h, 1 + 2 * w), np.uint8), h, w) if self.unfilters_png_rows else \
                np.zeros((h, w), np.uint16)
        self.infer([EngineInput(color, depth, 1.0)])
        self.redone_images = 0
        log.info("warmed up compressed inputs (a JPEG on the GPU: %s; PNG depth rows: %s) in %.2f s",
                 "yes" if jpeg else "no",
                 "yes" if depth is not None and self.unfilters_png_rows else "no", time.perf_counter() - t0)

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        with self._graph_cache.recording:  # never while a background capture records
            return self._infer(batch, want_masks)

    def start(self, batch: list[EngineInput], want_masks: bool = True) -> Callable[[], list[Detections]]:
        """A batch that is one graph's (within the largest bucket: any sizes, on the smallest canvas that
        holds them all) is written into the graph's inputs, its replay queued, and its answers copied
        out of the graph's outputs behind it (_collect); the returned call waits for those and pastes
        the masks. The next batch may be started before this one is finished: its network then runs
        while this batch's masks are pasted (on a stream of their own) and its responses encoded.
        Between the calls this engine makes no CUDA call, so a background capture may record.
        Anything else runs whole when finished."""
        canvas = self._batch_canvas(batch)
        if canvas is None:
            return lambda: self.infer(batch, want_masks)
        with self._graph_cache.recording, torch.inference_mode():
            answers = self._collect(self._run_fixed(batch, canvas), len(batch), want_masks)

        def finish() -> list[Detections]:
            with self._graph_cache.recording, torch.inference_mode():
                self.model.roi_heads.score_thresh = min(x.score_threshold for x in batch)  # a redo's op-by-op run
                return self._fixed_results(batch, want_masks, answers)
        return finish

    def _batch_canvas(self, batch: list[EngineInput]) -> Canvas | None:
        """The canvas the whole batch runs on as one graph, or None: not on the fixed-shape path, more
        images than the largest bucket, or no canvas that holds them all."""
        if not self.fixed or not batch or len(batch) > self.buckets[-1]:
            return None
        sizes = [image_size(x.color) for x in batch]
        needs = {self._own_canvas(*s) for s in sizes}
        if len(needs) > 1 and (self.exact_canvases or pick_canvas(needs, self.canvases) is None):
            return None  # a graph per canvas (portrait and landscape images, say): infer splits the batch
        return self.canvas_for(sizes)

    def _own_canvas(self, h: int, w: int) -> Canvas:
        cfg = self.config
        return canvas_of(self.semantics.resized_size(h, w, cfg.min_size, cfg.max_size))

    def canvas_for(self, sizes: list[tuple[int, int]]) -> Canvas:
        """The smallest canvas holding every one of these input sizes (h, w) resized; where none does
        (canvases configured smaller than the resize rule allows), their enclosing canvas, which is
        then added to the canvases (captured in the background like any shape without a graph).
        With exact_canvases, the images' own padded size (the caller groups images by it)."""
        needs = {self._own_canvas(h, w) for h, w in sizes}
        if self.exact_canvases:
            if len(needs) != 1:
                raise ValueError("exact_canvases: one batch per padded size (group the images by _own_canvas)")
            return next(iter(needs))
        canvas = pick_canvas(needs, self.canvases)
        if canvas is None:
            canvas = enclosing(needs)
            self.canvases.append(canvas)
            log.warning("input size(s) %s fit none of the canvases; running them on %dx%d (add it to ENGINE_OPTIONS "
                        "canvases, or leave canvases out so that the largest ones are captured)",
                        ", ".join(f"{w}x{h}" for h, w in sorted(set(sizes))), canvas[1], canvas[0])
        return canvas

    def _infer(self, batch: list[EngineInput], want_masks: bool) -> list[Detections]:
        self.model.roi_heads.score_thresh = min(x.score_threshold for x in batch)
        results: list[Detections | None] = [None] * len(batch)
        groups: dict[tuple[Any, ...], list[int]] = {}
        sizes = [image_size(x.color) for x in batch]
        # Fixed shapes: one graph per chunk of the largest bucket, whatever its sizes, where one canvas holds
        # them all; else (portrait and landscape images, say) a graph per canvas; exact_canvases: per padded size.
        one = self.fixed and not self.exact_canvases and pick_canvas(
            {self._own_canvas(*s) for s in sizes}, self.canvases) is not None
        for i, item in enumerate(batch):
            if not self.fixed:
                key: tuple[Any, ...] = _shape_key(item)
            elif one:
                key = ()
            else:
                key = self._own_canvas(*sizes[i]) if self.exact_canvases else self.canvas_for([sizes[i]])
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            if not self.fixed:
                h, w, _ = key
                dets = self._infer_dynamic([batch[i] for i in idx], h, w, want_masks)
            else:
                dets = []
                for lo in range(0, len(idx), self.buckets[-1]):
                    chunk = [batch[i] for i in idx[lo:lo + self.buckets[-1]]]
                    canvas = self.canvas_for([image_size(x.color) for x in chunk])
                    answers = self._collect(self._run_fixed(chunk, canvas), len(chunk), want_masks)
                    dets += self._fixed_results(chunk, want_masks, answers)
            for i, det in zip(idx, dets):
                results[i] = det
        return results  # type: ignore[return-value]

    # -- the fixed-shape path: one graph from the canvas to mask probabilities ----------------------
    def _fixed_forward(self, x: torch.Tensor, sizes: torch.Tensor, threshold: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network on a canvas: x [B, C, CH, CW] (prepared by _write_inputs), sizes [B, ROW] each
        image's numbers (canvases.image_row). Every size bound inside is a per-image tensor, so the
        same graph serves every input size that fits the canvas."""
        n = x.shape[0]
        canvas = (int(x.shape[-2]), int(x.shape[-1]))
        rh, rw = sizes[:, 0], sizes[:, 1]
        feats, objectness, deltas = self._trunk(x)
        # Anchors follow the feature maps (the canvas), never the image sizes.
        anchors = self._anchors_for(ImageList(x, [canvas] * n), list(feats.values()))
        props, props_valid, settled = self.heads.proposals([o.float() for o in objectness],
                                                           [d.float() for d in deltas], anchors, n, rh, rw)
        autocast = self.dev.type == "cuda" and self.fp16
        # RoI pooling: the Triton kernel reads the float16 levels as they are; torchvision's roi_align
        # reads float32 (what autocast does per call), converted once into the stack both heads pool from.
        heads = self.model.roi_heads
        names = heads.box_roi_pool.featmap_names
        stacks = (self.heads.level_stack([feats[k] for k in names])
                  if names == heads.mask_roi_pool.featmap_names and not self.heads.roi_kernel else None)
        det = self.heads.detections(feats, props, props_valid, rh, rw, threshold, autocast, stacks, canvas=canvas)
        probs = self.heads.mask_probs(feats, det["boxes"], det["labels"], rh, rw, autocast, stacks, canvas=canvas)
        self._mask_size = tuple(probs.shape[-2:])
        boxes, valid = self._to_input_pixels(det["boxes"], det["valid"], sizes[:, 6, None, None],
                                             sizes[:, 7, None, None], sizes[:, None, 2:6])
        exact = det["exact"] & settled
        # Everything the host needs to know, in one tensor: one copy, one sync.
        summary = torch.cat([boxes.flatten(1), det["scores"], det["labels"].float(), valid.float(),
                             exact.float()[:, None]], 1)
        out = {"summary": summary, "probs": probs}
        if self.graph_masks and n <= self.graph_masks_max_bucket:
            strings = self._encode_masks(probs, boxes, valid, sizes, canvas)
            if strings is not None:
                out["rle_head"], out["rle_text"] = strings
        return out

    def _capacity(self, bucket: int, canvas: Canvas) -> tuple[int, int]:
        """fixed_rle.encode's capacities (changes, tiles) for a bucket on a canvas."""
        pixels = canvas[0] * canvas[1]
        return (bucket * max(int(self.mask_changes * pixels), 1),
                bucket * max(32 * pixels // fixed_rle.BLOCK, 1))

    def _encode_masks(self, probs: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor,
                      canvas: Canvas) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every detection slot's mask pasted at its image's input size and encoded (fixed_rle.encode), in
        the graph. None where the kernels cannot run here (logged once; the masks are then pasted after
        the graph, as without graph_masks)."""
        b, d = probs.shape[:2]
        changes, tiles = self._capacity(b, canvas)
        heights, widths = sizes[:, 6].repeat_interleave(d), sizes[:, 7].repeat_interleave(d)

        def encode() -> tuple[torch.Tensor, torch.Tensor]:
            return fixed_rle.encode(probs.flatten(0, 1), boxes.flatten(0, 1), valid.flatten(), heights, widths,
                                    self.config.mask_threshold, changes, tiles, rule=self.semantics.paste,
                                    programs=self._programs)
        strings = _GRAPH_MASKS.run(encode, lambda: None, on=probs)
        if strings is None:
            self.graph_masks = False
        return strings

    def _ratio(self, h: int, w: int, rh: int, rw: int) -> torch.Tensor:
        """Back to input pixels with torchvision's arithmetic (float32 ratios of the sizes), for the
        dynamic path; the fixed path gets the same numbers per image from canvases.image_row.
        detectron2 multiplies by the Python float w / rw, which torch rounds to float32: the same value
        (a float32 quotient is correctly rounded, and rounding the double quotient of two float32
        integers to float32 is too)."""
        key = (h, w, rh, rw)
        if key not in self._ratios:
            self._ratios[key] = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.dev) / torch.tensor(
                [rw, rh, rw, rh], dtype=torch.float32, device=self.dev)
        return self._ratios[key]

    def _passes(self, scores: Any, threshold: float) -> Any:
        """An image's own score threshold (the heads ran at the batch's lowest): scores >= it as the
        torchvision engine keeps them, > it as detectron2 does."""
        return scores > threshold if self.semantics.postprocess == "detectron2" else scores >= threshold

    def _to_input_pixels(self, boxes: torch.Tensor, valid: torch.Tensor, h: int | torch.Tensor,
                         w: int | torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detections' boxes [..., 4] from the resized image to the input's pixels, and which stay valid:
        torchvision scales them (its small boxes went before the NMS); detectron2's detector_postprocess
        scales, clips them to the image and drops those with a side not above min_box_size (empty ones).
        h, w: numbers, or tensors that broadcast against the boxes' coordinates (per image);
        ratio: [..., 4] (w / rw, h / rh, w / rw, h / rh) in float32, broadcasting likewise."""
        boxes = boxes * ratio
        sem = self.semantics
        if sem.postprocess == "detectron2":
            x, y = boxes[..., 0::2], boxes[..., 1::2]
            if isinstance(w, torch.Tensor):
                x, y = torch.minimum(x.clamp(min=0), w), torch.minimum(y.clamp(min=0), h)
            else:
                x, y = x.clamp(0, w), y.clamp(0, h)
            boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
            valid = valid & large_enough(boxes[..., 2:] - boxes[..., :2], sem.min_box_size, sem.min_size_strict)
        return boxes, valid

    def _fixed_graph(self, bucket: int, canvas: Canvas) -> _FixedGraph | None:
        """The captured network for this bucket and canvas; None while it is being captured in the
        background (the caller then runs the same network op by op on that canvas). At load, captures
        in this thread."""
        key = (bucket, *canvas)
        if not self.use_graphs:  # the CPU (tests): static buffers of the padded bucket, run eagerly
            entry = self._fixed_graphs.get(key)
            if entry is None:
                entry = self._fixed_graphs[key] = _FixedGraph(*self._static_inputs(key), {}, None)
            return entry
        entry = self._graph_cache.capture_now(key) if not self._loaded else self._graph_cache.get(key)
        assert entry is None or isinstance(entry, _FixedGraph)
        return entry

    def _static_inputs(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeros on the canvas, each slot's numbers those of an image filling the canvas (the capture's
        warm-up runs then see a plausible batch)."""
        bucket, ch, cw = key
        x = torch.zeros(bucket, self.mean.numel(), ch, cw, dtype=self.dtype, device=self.dev)
        if self.dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        rows = torch.from_numpy(np.tile(image_row(ch, cw, ch, cw), (bucket, 1)))
        return x, rows.to(self.dev), torch.zeros((), dtype=torch.float32, device=self.dev)

    def _describe(self, key: tuple[Any, ...]) -> str:
        if key[0] == "inputs":
            _, bucket, ch, cw, h, w, kind = key
            depth = "" if kind is None else f" + depth as {kind}"
            return f"the input preparation for {bucket} image(s) of {w}x{h}{depth} on the {cw}x{ch} canvas"
        bucket, ch, cw = key
        return f"the network for {bucket} image(s) on the {cw}x{ch} canvas"

    @torch.inference_mode()
    def _capture(self, key: tuple[Any, ...]) -> _FixedGraph | InputGraph:
        """The network's graph for (bucket, canvas), or an input graph (a key starting "inputs")."""
        if key[0] == "inputs":
            return self._capture_inputs(key)
        return self._capture_network(key)

    def _capture_network(self, key: tuple[Any, ...]) -> _FixedGraph:
        """Warm-up runs and one capture on a stream of its own. At load it runs in the engine's thread
        into the shared pool; later in the capture thread (GraphCache), into a pool of its own, while the
        engine's thread keeps serving on the default stream (it waits only while the graph records:
        GraphCache.recording)."""
        background = self._loaded
        torch.cuda.set_device(self.dev)
        x, sizes, threshold = self._static_inputs(key)
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.dev)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # cudnn autotuning, lazy init, anchors and pooler scales outside the capture
                self._fixed_forward(x, sizes, threshold)
        stream.synchronize()
        warmed = time.perf_counter() - t0
        graph = torch.cuda.CUDAGraph()
        with self._graph_cache.recording, torch.cuda.graph(graph, pool=None if background else self._pool,
                                                           stream=stream):
            out = self._fixed_forward(x, sizes, threshold)
        # A graph's first launch also uploads it to the device (what cudaGraphUpload would do): here, on
        # the capture's stream, rather than in the first request that replays it.
        with torch.cuda.stream(stream):
            graph.replay()
        stream.synchronize()
        if not background:
            log.info("captured %s in %.1f s (warm-up runs %.1f s)", self._describe(key),
                     time.perf_counter() - t0, warmed)
        return _FixedGraph(x, sizes, threshold, out, graph)

    def _run_fixed(self, items: list[EngineInput], canvas: Canvas) -> dict[str, torch.Tensor]:
        """Writes the batch into its canvas graph's inputs and queues the graph (or runs the same network
        op by op on that canvas where the graph is not there yet). Returns with the device still working
        on a graph."""
        n = len(items)
        bucket = next(b for b in self.buckets if b >= n)
        if self.config.input_kind == "rgbd" and any(it.depth is None for it in items):
            raise ValueError("RGB-D model needs depth")
        self._mark(None)
        g = self._fixed_graph(bucket, canvas)
        if g is None:  # its graph is being captured: these images run op by op meanwhile, on that canvas
            g = _FixedGraph(*self._static_inputs((n, *canvas)), {}, None)
        self._write_inputs(items, g)
        g.threshold.fill_(min(it.score_threshold for it in items))
        self._mark("preprocess (eager, onto the canvas)")
        if g.graph is not None:
            g.graph.replay()
            return g.out
        # the CPU (tests), or a canvas whose graph is on its way: the same network, op by op
        return self._fixed_forward(g.x, g.sizes, g.threshold)

    def _write_inputs(self, items: list[EngineInput], g: _FixedGraph) -> None:
        """Each image to the device at its own size (pinned copies; one nvJPEG call for the batch's
        JPEGs), normalised and resized with _resized's arithmetic, one call per group of equal size and
        depth type, and written into its slot of the canvas with the rest of the slot zero (an earlier,
        larger image may have left values there: cleared where _FixedGraph.written says); then every image's numbers (canvases.image_row) in
        one copy. Plain torch operations (elementwise, interpolate, PIL's taps): nothing here compiles
        or is planned per size. Slots past the batch keep what they had: their answers are not read."""
        if self._write_through_graph(items, g):
            return
        cfg = self.config
        colors: dict[int, torch.Tensor] = {}
        encoded = [i for i, it in enumerate(items) if isinstance(it.color, EncodedImage)]
        if encoded:  # one decode for the batch's JPEGs
            for i, rgb in zip(encoded, decode_to_device([items[i].color for i in encoded], self.dev)):  # type: ignore[misc]
                colors[i] = rgb
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, it in enumerate(items):
            depth_type = None if it.depth is None or cfg.input_kind != "rgbd" else it.depth.dtype.str
            groups.setdefault((*image_size(it.color), depth_type), []).append(i)
        rows = np.zeros((len(items), ROW), np.float32)
        ch, cw = g.x.shape[-2:]
        for (h, w, depth_type), idx in groups.items():
            rh, rw = self.semantics.resized_size(h, w, cfg.min_size, cfg.max_size)
            color = torch.empty(len(idx), h, w, 3, dtype=torch.uint8, device=self.dev)
            for j, i in enumerate(idx):
                it = items[i]
                if i in colors:
                    color[j].copy_(colors[i])
                else:
                    self._pin_source(it.color)  # type: ignore[arg-type]
                    color[j].copy_(torch.from_numpy(it.color), non_blocking=True)  # type: ignore[arg-type]
            depth = None
            if depth_type is not None:
                depth = torch.empty(len(idx), h, w, dtype=depth_dtype_of(items[idx[0]].depth),  # type: ignore[arg-type]
                                    device=self.dev)
                for i in idx:
                    self._pin_source(host_array(items[i].depth))  # type: ignore[arg-type]
                # PNG rows reconstructed on the device, the group's in one call (png_unfilter)
                depths_into([items[i].depth for i in idx], depth)  # type: ignore[misc]
            x = self._resized(color, depth, rh, rw)
            for j, i in enumerate(idx):
                slot = g.x[i]
                slot[:, :rh, :rw] = x[j]
                # what an earlier image left beyond this one: rows below it, columns right of it
                if len(g.written) <= i:
                    g.written += [(ch, cw)] * (i + 1 - len(g.written))
                old_h, old_w = g.written[i]
                if old_h > rh:
                    slot[:, rh:old_h, :old_w].zero_()
                if old_w > rw:
                    slot[:, :min(rh, old_h), rw:old_w].zero_()
                g.written[i] = (rh, rw)
                rows[i] = image_row(h, w, rh, rw)
        src = torch.from_numpy(rows)
        if self.dev.type == "cuda":  # from PyTorch's caching host allocator: not reused before the copy ran
            src = src.pin_memory()
        g.sizes[:len(items)].copy_(src, non_blocking=True)

    def _write_through_graph(self, items: list[EngineInput], g: _FixedGraph) -> bool:
        """_write_inputs' work as one replay where the batch has an input graph (input_graphs.py): each image
        copied into the graph's buffers, then the graph prepares every slot of the bucket. False where the
        batch has none (yet): mixed sizes or depth kinds, JPEGs for nvJPEG, no network graph, or its
        input graph still being captured."""
        if not self.input_graphs or g.graph is None:
            return False
        colors = [it.color for it in items]
        depths = [it.depth for it in items]
        rgbd = self.config.input_kind == "rgbd"
        key = input_key(colors, depths, rgbd)
        if key is None:
            return False
        bucket, ch, cw = g.x.shape[0], g.x.shape[-2], g.x.shape[-1]
        entry = self._input_graph(("inputs", bucket, ch, cw, *key))
        if entry is None:
            return False
        for it in items:
            self._pin_source(it.color)  # type: ignore[arg-type]
            if rgbd:
                self._pin_source(host_array(it.depth))  # type: ignore[arg-type]
        copy_in(entry, colors, depths if rgbd else [])  # type: ignore[arg-type]
        entry.graph.replay()
        entry.replays += 1
        g.written[:] = [entry.resized] * bucket  # every slot: the graph zeroed the rest of each
        return True

    def _input_graph(self, key: tuple[Any, ...]) -> InputGraph | None:
        """The input graph for `key`: captured now at load, else from the cache (None while it is captured in
        the background). A capture that fails at load turns input graphs off with a warning: the inputs are
        then prepared op by op, as before them, rather than the model failing to load."""
        try:
            entry = self._graph_cache.capture_now(key) if not self._loaded else self._graph_cache.get(key)
        except Exception as exc:  # noqa: BLE001 - an optimisation; the op-by-op preparation serves
            log.warning("cannot capture %s (%s: %s); this engine prepares its inputs op by op (ENGINE_OPTIONS "
                        "input_graphs false says so without trying)", self._describe(key), type(exc).__name__, exc)
            self.input_graphs = False
            return None
        assert entry is None or isinstance(entry, InputGraph)
        return entry

    def _prepare_slots(self, color: torch.Tensor, depth: torch.Tensor | None, kind: str | None,
                       x: torch.Tensor, sizes: torch.Tensor, rows: torch.Tensor, rh: int, rw: int) -> None:
        """What an input graph records: every slot of `x` (the network's canvas) prepared from the static
        buffers as _write_inputs prepares an image (the same operations), the rest of each slot zero,
        and each image's numbers (`rows`, on the device) into `sizes`."""
        if depth is not None and kind == PNG_ROWS:
            depth = unfilter_rows(depth, color.shape[2])
        x[:, :, :rh, :rw] = self._resized(color, depth, rh, rw)
        x[:, :, rh:, :].zero_()
        x[:, :, :rh, rw:].zero_()
        sizes.copy_(rows)

    @torch.inference_mode()
    def _capture_inputs(self, key: tuple[Any, ...]) -> InputGraph:
        """An input graph (input_graphs.py): one warm-up run into scratch (the network may be reading its
        canvas meanwhile), then the capture, on a stream of their own, into the input graphs' pool. Not
        through torch.cuda.graph, which synchronises the device and collects garbage first (tens of ms
        during which serving would wait: GraphCache.recording)."""
        _, bucket, ch, cw, h, w, kind = key
        t0 = time.perf_counter()
        net = self._graph_cache.ready((bucket, ch, cw))
        if not isinstance(net, _FixedGraph) or net.graph is None:
            raise RuntimeError("the network's graph for this bucket and canvas is not there")
        torch.cuda.set_device(self.dev)
        cfg = self.config
        rh, rw = self.semantics.resized_size(h, w, cfg.min_size, cfg.max_size)
        shared = self._input_buffers.get((h, w, kind))
        if shared is None or shared[0].shape[0] < bucket:
            shared = self._input_buffers[(h, w, kind)] = input_buffers(max(bucket, self.buckets[-1]), h, w, kind,
                                                                        self.dev)
        color, depth = shared[0][:bucket], None if shared[1] is None else shared[1][:bucket]
        rows = torch.from_numpy(np.tile(image_row(h, w, rh, rw), (bucket, 1))).to(self.dev)
        stream = torch.cuda.Stream(self.dev)
        stream.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(stream):  # PIL's taps, kernels' first launches: outside the capture
            self._prepare_slots(color, depth, kind, torch.empty_like(net.x), torch.empty_like(net.sizes), rows,
                                rh, rw)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with self._graph_cache.recording, torch.cuda.stream(stream):
            graph.capture_begin(pool=self._input_pool, capture_error_mode="thread_local")
            try:
                self._prepare_slots(color, depth, kind, net.x, net.sizes, rows, rh, rw)
            finally:
                graph.capture_end()
        if not self._loaded:
            self._input_captures_at_load[0] += 1
            self._input_captures_at_load[1] += time.perf_counter() - t0
        return InputGraph(color, depth, (rh, rw), graph, inputs=(rows,))

    def _collect(self, out: dict[str, torch.Tensor], n: int, want_masks: bool) -> _Answers:
        """The batch's answers out of the network's outputs (a graph's are overwritten by its next
        replay), queued behind the network: the summary to page-locked host memory, the masks'
        probabilities to a device buffer of their own (about 5 MB for 16 images), then an event."""
        d = out["probs"].shape[1]  # detections per image: detections_per_img, or fewer candidates if that is all
        if self.dev.type != "cuda":
            return _Answers(out["summary"][:n], out["probs"][:n] if want_masks else None, d, None)
        summary = torch.empty(out["summary"][:n].shape, dtype=out["summary"].dtype, pin_memory=True)
        summary.copy_(out["summary"][:n], non_blocking=True)
        probs = out["probs"][:n].clone() if want_masks else None
        head = text = None
        if want_masks and "rle_head" in out:
            head = torch.empty(out["rle_head"].shape, dtype=torch.int64, pin_memory=True)
            head.copy_(out["rle_head"], non_blocking=True)
            text = out["rle_text"].clone()  # the text's size is not known yet: all of it, device to device
        ready = torch.cuda.Event(blocking=self.blocking)
        ready.record()
        return _Answers(summary, probs, d, ready, head, text)

    def _fixed_results(self, items: list[EngineInput], want_masks: bool, answers: _Answers) -> list[Detections]:
        """Waits for the network, then reads its answers, pastes the masks and makes their RLE (one
        paste per input size of the batch: each image's masks at its own size), on the paste stream:
        a batch started after this one runs its network meanwhile."""
        n = len(items)
        if answers.ready is not None:
            answers.ready.synchronize()  # this batch's network and copies only, not a batch queued behind it
        summary = answers.summary.numpy()
        self._mark("network (one graph)")
        d = answers.detections
        results: list[Detections | None] = [None] * n
        redo: dict[tuple[Any, ...], list[int]] = {}
        by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for i, it in enumerate(items):
            row = summary[i]
            size = image_size(it.color)
            if row[-1] < 0.5:
                redo.setdefault(_shape_key(it), []).append(i)
                continue
            scores = row[4 * d:5 * d]
            keep = np.flatnonzero((row[6 * d:7 * d] > 0.5) & self._passes(scores, it.score_threshold))
            results[i] = Detections(row[:4 * d].reshape(d, 4)[keep].copy(), scores[keep].copy(),
                                    row[5 * d:6 * d][keep].astype(np.int64), None, [] if want_masks else None)
            if len(keep):
                by_size.setdefault(size, []).append((i, keep))
        if want_masks and by_size and not self._strings_from_graph(answers, results, by_size):
            assert answers.probs is not None
            flat = answers.probs.flatten(0, 1)
            side = self._paste_stream
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                if side is not None:
                    side.wait_event(answers.ready)
                    answers.probs.record_stream(side)  # not reused by the serving stream before the paste ran
                for (h, w), picked in by_size.items():
                    index = torch.from_numpy(np.concatenate([keep + i * d for i, keep in picked])).to(self.dev)
                    # The boxes the device holds, as the host read them: the paste plans on the host, no sync.
                    boxes = np.concatenate([results[i].boxes for i, _ in picked])  # type: ignore[union-attr]
                    # Returns with the stream's work done: the strings are read back to the host.
                    rles = paste_and_encode(flat[index], boxes, h, w, self.config.mask_threshold,
                                            rule=self.semantics.paste)
                    start = 0
                    for i, keep in picked:
                        results[i].rle = rles[start:start + len(keep)]  # type: ignore[union-attr]
                        start += len(keep)
        self._mark("paste and RLE")
        if redo:
            # Rare: NMS did not settle in the graph's iterations, or the top-k was too small.
            count = sum(len(v) for v in redo.values())
            before, self.redone_images = self.redone_images, self.redone_images + count
            if before == 0 or before // 1000 != self.redone_images // 1000:
                log.warning("%d image(s) so far needed the slower op-by-op path (NMS not settled in %d "
                            "iterations, or more than %d detection candidates needed); if that is frequent, "
                            "raise ENGINE_OPTIONS nms_iterations or pre_nms_topk", self.redone_images,
                            self.heads.iterations, self.pre_nms_topk)
            for (h, w, _), idx in redo.items():  # op by op at each input size and depth type
                for i, det in zip(idx, self._infer_dynamic([items[i] for i in idx], h, w, want_masks)):
                    results[i] = det
        return results  # type: ignore[return-value]

    def _strings_from_graph(self, answers: _Answers, results: list[Detections | None],
                            by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]]) -> bool:
        """Each kept detection's string from those the graph made (graph_masks): the text is read back in
        one copy, on the paste stream (the serving stream may hold the next batch's network). False where
        there are none, or where the batch did not fit their capacities (then the caller pastes it)."""
        if answers.rle_head is None or answers.rle_text is None:
            return False
        head = answers.rle_head.numpy()
        if not fixed_rle.fits(head):
            before, self.masks_over_capacity = self.masks_over_capacity, self.masks_over_capacity + 1
            if before == 0 or before // 1000 != self.masks_over_capacity // 1000:
                n = len(head) - fixed_rle.HEAD_EXTRA - 1
                log.warning("%d batch(es) so far had masks with more changes than the graph holds (this one: "
                            "%d changes, %d slots' tiles, for %d and %d); they are pasted after the graph, "
                            "which is slower: raise ENGINE_OPTIONS mask_changes (now %g) if that is frequent",
                            self.masks_over_capacity, head[n + 1], head[n + 2], head[n + 3], head[n + 4],
                            self.mask_changes)
            return False
        n = len(head) - fixed_rle.HEAD_EXTRA - 1
        side = self._paste_stream
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            text = answers.rle_text[:int(head[n])].cpu().numpy()
        strings = RleText(text, head[:n + 1].tolist())
        d = answers.detections
        for picked in by_size.values():
            for i, keep in picked:
                results[i].rle = strings.take(keep + i * d)  # type: ignore[union-attr]
        return True

    # -- the dynamic path: op by op, torchvision's shapes ---------------------------------------
    def _infer_dynamic(self, items: list[EngineInput], h: int, w: int, want_masks: bool) -> list[Detections]:
        cfg = self.config
        model = self.model
        rh, rw = self.semantics.resized_size(h, w, cfg.min_size, cfg.max_size)
        self._mark(None)
        x = self._preprocess(items, rh, rw)
        self._mark("preprocess")
        feats, objectness, deltas = self._trunk_graphed(x)
        self._mark("backbone+fpn+rpn head")
        sizes = [(rh, rw)] * len(items)
        images = ImageList(x, sizes)
        feat_list = list(feats.values())
        anchors = self._anchors_for(images, feat_list)
        proposals = self._proposals([o.float() for o in objectness], [d.float() for d in deltas], anchors,
                                    len(items), rh, rw)
        self._mark("proposals")
        heads = model.roi_heads
        cuda = self.dev.type == "cuda"
        pool = self._pool_lists
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and self.fp16):
            bf = heads.box_head(pool(heads.box_roi_pool, feats, proposals, sizes))
            class_logits, box_regression = heads.box_predictor(bf)
        det_boxes, det_scores, det_labels = self._detections(class_logits.float(), box_regression.float(),
                                                             proposals, rh, rw)
        self._mark("box head+nms")
        probs: list[torch.Tensor | None] = [None] * len(items)
        if want_masks and sum(len(b) for b in det_boxes):
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and self.fp16):
                mf = heads.mask_head(pool(heads.mask_roi_pool, feats, det_boxes, sizes))
                mask_logits = heads.mask_predictor(mf)
            probs = maskrcnn_inference(mask_logits.float(), det_labels)
        self._mark("mask head")
        out = []
        for k, item in enumerate(items):
            b, keep = self._to_input_pixels(det_boxes[k], self._passes(det_scores[k], item.score_threshold),
                                            h, w, self._ratio(h, w, rh, rw))
            b = b[keep]
            rle = None
            if want_masks:
                p = probs[k]
                rle = (paste_and_encode(p[keep][:, 0], b, h, w, cfg.mask_threshold, rule=self.semantics.paste)
                       if p is not None and len(b) else [])
            out.append(Detections(b.cpu().numpy(), det_scores[k][keep].cpu().numpy(),
                                  det_labels[k][keep].cpu().numpy().astype(np.int64), None, rle))
        self._mark("paste+rle")
        return out

    def _pool_lists(self, pooler: torch.nn.Module, feats: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                    sizes: list[tuple[int, int]]) -> torch.Tensor:
        """The dynamic path's RoI pooling: the model's own pooler under torchvision's rules (what the
        reference engine runs), else the semantics' rules (FixedShapeHeads.pool_lists)."""
        sem = self.semantics
        if (isinstance(pooler, MultiScaleRoIAlign) and sem.level_mapper == "torchvision"
                and not sem.roi_align_aligned):
            return pooler(feats, boxes, sizes)
        return self.heads.pool_lists(pooler, feats, boxes, sizes[0])

    def close(self) -> None:
        self._pinned.close()
        self._graph_cache.close()
        self._graphs.clear()
        self._fixed_graphs.clear()
        del self.model
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
