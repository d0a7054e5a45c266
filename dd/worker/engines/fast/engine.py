"""The fast GPU path for the same Mask R-CNN weights as the torchvision engine.

Eager torchvision spends most of its time on the host: preprocessing image by
image, hundreds of small kernels launched one by one, host syncs after every
filtering step, and a Python loop that pastes every instance's mask into a
full-image tensor, which pycocotools then scans pixel by pixel. Here:

- the whole network, from the uint8 pixels to each detection's mask
  probabilities, runs with fixed shapes (fixed_shapes.py: padded top-k lists
  with validity masks, NMS as a batched fixed point), so it is captured once
  per (batch bucket, input size) as one CUDA graph and replayed with one launch;
  a batch is padded up to the next captured bucket (1, 2, 4, 8, ...), as vLLM
  does; an input size not captured at load (warmup_sizes) is served at once on
  the same network run op by op while one background thread captures its
  graph (graph_cache.py), so no request waits for a capture, nor for a Triton
  compilation: the kernels take every size-dependent number unspecialized
  (kernels/specialization.py), so the warm-up's compilation serves every size,
  and load also runs the network once op by op at an "odd" size whose feature
  maps divide differently (odd_size.py) to compile whatever is still keyed on that;
- preprocessing (convert, normalise, resize, pad) runs in that graph too, from
  the shared-memory slot copied through a pinned (page-locked) mapping;
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
- the host learns the counts once per batch; masks are pasted (one ragged
  Triton kernel, kernels/paste.py) and encoded as COCO RLE strings (kernels/rle.py)
  for all instances of the batch together, on the GPU (masks.py), so only the
  strings' characters come back.

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
pre_nms_topk (1024 with fixed shapes, 4096 without), batch_buckets ([1, 2, 4,
8, ...] up to MAX_BATCH_SIZE), warmup_sizes ([[H, W], ...] input sizes to
capture graphs for at load), warmup_odd_size (true on a GPU), background_capture (true),
cudnn_benchmark (false),
blocking_sync (false), allow_cpu (false; the CPU path exists for tests
and has no graphs or fp16). Each Triton step falls back to torch operations,
with a log line, where its kernel cannot compile (kernels/switch.py).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from dd.models.build import build_loaded_model
from dd.models.semantics import TORCHVISION, Semantics
from dd.worker.engines.base import Detections, EncodedImage, Engine, EngineInput, EngineUnavailable, image_size
from dd.worker.engines.fast.batchnorm_fold import fold_batchnorm
from dd.worker.engines.fast.fixed_shapes import FixedShapeHeads, large_enough, rpn_min_size
from dd.worker.engines.fast.fused_blocks import fuse_conv_relu_pairs, fuse_fpn, fuse_resnet_blocks
from dd.worker.engines.fast.graph_cache import GraphCache
from dd.worker.engines.fast.mask_head import ClassMaskHead
from dd.worker.engines.fast.odd_size import odd_warmup_size
from dd.worker.engines.jpeg_decode import decode_to_device
from dd.worker.engines.masks import paste_and_encode
from dd.worker.engines.fast.pil_resize import PilBilinear
from dd.worker.engines.kernels.switch import KernelSwitch
from dd.worker.engines.pinned import PinnedMappings
from dd.worker.engines.png_unfilter import depth_dtype as depth_dtype_of
from dd.worker.engines.png_unfilter import depth_to_device, depths_into, host_array

log = logging.getLogger(__name__)


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's GeneralizedRCNNTransform resizes an h x w image to (the engine asks its
    model's semantics, which may round as detectron2 does)."""
    return TORCHVISION.resized_size(h, w, min_size, max_size)


def padded(n: int, divisible: int = 32) -> int:
    return int(math.ceil(n / divisible) * divisible)


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
    """Static inputs and outputs of the fixed-shape network for one (bucket, height, width, depth type)."""

    color: torch.Tensor  # bucket x H x W x 3 uint8, on the device
    depth: torch.Tensor | None  # bucket x H x W, uint16 (mm) or float32 (m)
    threshold: torch.Tensor  # 0-d float32: the box score threshold of the batch
    out: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None  # None on the CPU: run eagerly


def _shape_key(item: EngineInput) -> tuple[int, int, str | None]:
    """Images with the same key run through the same network shapes: size and depth dtype."""
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
        if cuda and opts.get("blocking_sync", False):
            self._blocking_sync()
        t_start = time.perf_counter()
        self.model = build_loaded_model(self.config).eval().to(self.dev)
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
        self._fixed_graphs: dict[tuple[Any, ...], _FixedGraph] = {}
        self._ratios: dict[tuple[int, ...], torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs and self.fixed else None
        # Shapes not captured at load are served op by op while a background thread captures them.
        self._graph_cache: GraphCache[_FixedGraph] = GraphCache(
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
        sizes = opts.get("warmup_sizes") or [[cfg.min_size, cfg.min_size]]
        # Warm-up captures the graphs; without them (the CPU) one image proves the model runs.
        batches = (self.buckets if self.fixed else sorted({1, cfg.max_batch_size})) if self.use_graphs else [1]
        for h, w in sizes:
            for b in batches:
                dummy = [EngineInput(np.zeros((h, w, 3), np.uint8),
                                     np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)] * b
                self.infer(dummy)
        self.redone_images = 0  # blank warm-up images tie everywhere and are redone; count real ones only
        if self.fixed and bool(opts.get("warmup_odd_size", cuda)):
            self._warm_odd_size(sizes)
        self._loaded = True
        done = time.perf_counter()
        log.info("fast engine loaded in %.1f s: weights and model %.1f s, fusing and kernels %.1f s, "
                 "warm-up and graph captures %.1f s", done - t_start, t_built - t_start,
                 t_prepared - t_built, done - t_prepared)

    @torch.inference_mode()
    def _warm_odd_size(self, sizes: list[list[int]]) -> None:
        """One op-by-op run of the fixed-shape network, then a paste and RLE encoding of a few masks, at an
        input size whose feature maps divide differently from the first warm-up size's (odd_size.py), no
        graph captured. The Triton kernels were compiled by the warm-up already and are not specialized on
        sizes (kernels/specialization.py); whatever is still compiled here (anything keyed on how a size
        divides, and the paste and RLE kernels, which blank warm-up images may never reach) would
        otherwise be compiled by the first request that needs it."""
        cfg = self.config
        h, w = odd_warmup_size(sizes, lambda a, b: self.semantics.resized_size(a, b, cfg.min_size, cfg.max_size))
        depth_dtype = torch.uint16 if cfg.input_kind == "rgbd" else None
        t0 = time.perf_counter()
        color, depth, threshold = self._static_inputs((1, h, w, depth_dtype))
        out = self._fixed_forward(color, depth, threshold)
        probs = out["probs"].flatten(0, 1)[:3]
        if probs.shape[0]:  # masks all on, in boxes inside the image: every kernel of the paste and RLE runs
            corner = np.array([[0.1 * w, 0.1 * h], [0.5 * w, 0.3 * h], [0.2 * w, 0.6 * h]], np.float32)
            boxes = np.concatenate([corner, corner + np.float32(0.3 * min(h, w))], 1)[:probs.shape[0]]
            paste_and_encode(torch.ones_like(probs), boxes, h, w, cfg.mask_threshold, rule=self.semantics.paste)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        log.info("ran the network op by op at %dx%d in %.2f s (what compiles per divisibility of a size "
                 "compiles now, not at the first request of such a size)", w, h, time.perf_counter() - t0)

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
        """uint8 B x H x W x 3 (+ depth B x H x W) -> the padded, normalised network input, on the device.

        Normalised, then resized with bilinear interpolation (the same up to rounding as the other way
        round, and what torchvision does); with detectron2's semantics an RGB image is resized first, as
        PIL resizes a uint8 image (what detectron2's ResizeShortestEdge does), then normalised."""
        if self._pil is not None:
            x = self._pil(color, rh, rw).permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self.mean) / self.std
            return self._pad(x, rh, rw)
        x = color.permute(0, 3, 1, 2).float().div_(255.0)  # B x 3 x H x W
        if self.config.input_kind == "rgbd":
            assert depth is not None
            d = depth.float()[:, None]
            if depth.dtype == torch.uint16:
                d = d * self.config.depth_unit_m
            d = torch.where(d > 0, d, torch.full_like(d, self.fill))
            x = torch.cat([x, d], dim=1)
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
        return self._pad(x, rh, rw)

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

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        with self._graph_cache.recording:  # never while a background capture records
            return self._infer(batch, want_masks)

    def start(self, batch: list[EngineInput], want_masks: bool = True) -> Callable[[], list[Detections]]:
        """A batch that is one captured graph's (one size, within the largest bucket) is written into
        the graph's inputs and its replay queued; the returned call waits for it and reads the answers.
        Between the two the host is free (the worker encodes the previous batch's responses then) and
        this engine makes no CUDA call, so a background capture may record. Anything else runs whole
        when finished."""
        size = self._one_graph_size(batch)
        if size is None:
            return lambda: self.infer(batch, want_masks)
        h, w = size
        with self._graph_cache.recording, torch.inference_mode():
            out = self._run_fixed(batch, h, w)

        def finish() -> list[Detections]:
            with self._graph_cache.recording, torch.inference_mode():
                self.model.roi_heads.score_thresh = min(x.score_threshold for x in batch)  # a redo's op-by-op run
                return self._fixed_results(batch, h, w, want_masks, out)
        return finish

    def _one_graph_size(self, batch: list[EngineInput]) -> tuple[int, int] | None:
        if not self.fixed or not batch or len(batch) > self.buckets[-1]:
            return None
        kinds = {_shape_key(x) for x in batch}
        if len(kinds) != 1:
            return None
        h, w, _ = kinds.pop()
        return h, w

    def _infer(self, batch: list[EngineInput], want_masks: bool) -> list[Detections]:
        self.model.roi_heads.score_thresh = min(x.score_threshold for x in batch)
        results: list[Detections | None] = [None] * len(batch)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(_shape_key(item), []).append(i)
        for (h, w, _), idx in groups.items():
            items = [batch[i] for i in idx]
            if self.fixed:
                dets = []
                for lo in range(0, len(items), self.buckets[-1]):
                    dets += self._infer_fixed(items[lo:lo + self.buckets[-1]], h, w, want_masks)
            else:
                dets = self._infer_dynamic(items, h, w, want_masks)
            for i, det in zip(idx, dets):
                results[i] = det
        return results  # type: ignore[return-value]

    # -- the fixed-shape path: one graph from pixels to mask probabilities ----------------------
    def _fixed_forward(self, color: torch.Tensor, depth: torch.Tensor | None, threshold: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        cfg = self.config
        n, h, w = color.shape[:3]
        rh, rw = self.semantics.resized_size(h, w, cfg.min_size, cfg.max_size)
        x = self._normalize(color, depth, rh, rw)
        feats, objectness, deltas = self._trunk(x)
        anchors = self._anchors_for(ImageList(x, [(rh, rw)] * n), list(feats.values()))
        props, props_valid, settled = self.heads.proposals([o.float() for o in objectness],
                                                           [d.float() for d in deltas], anchors, n, rh, rw)
        autocast = self.dev.type == "cuda" and self.fp16
        # RoI pooling: the Triton kernel reads the float16 levels as they are; torchvision's roi_align
        # reads float32 (what autocast does per call), converted once into the stack both heads pool from.
        heads = self.model.roi_heads
        names = heads.box_roi_pool.featmap_names
        stacks = (self.heads.level_stack([feats[k] for k in names])
                  if names == heads.mask_roi_pool.featmap_names and not self.heads.roi_kernel else None)
        det = self.heads.detections(feats, props, props_valid, rh, rw, threshold, autocast, stacks)
        probs = self.heads.mask_probs(feats, det["boxes"], det["labels"], rh, rw, autocast, stacks)
        boxes, valid = self._to_input_pixels(det["boxes"], det["valid"], h, w, rh, rw)
        exact = det["exact"] & settled
        # Everything the host needs to know, in one tensor: one copy, one sync.
        summary = torch.cat([boxes.flatten(1), det["scores"], det["labels"].float(), valid.float(),
                             exact.float()[:, None]], 1)
        return {"summary": summary, "probs": probs}

    def _ratio(self, h: int, w: int, rh: int, rw: int) -> torch.Tensor:
        """Back to input pixels with torchvision's arithmetic (float32 ratios of the sizes); made on
        the first (uncaptured) call, since a capture cannot copy a constant to the device. detectron2
        multiplies by the Python float w / rw, which torch rounds to float32: the same value (a float32
        quotient is correctly rounded, and rounding the double quotient of two float32 integers to
        float32 is too)."""
        key = (h, w, rh, rw)
        if key not in self._ratios:
            self._ratios[key] = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.dev) / torch.tensor(
                [rw, rh, rw, rh], dtype=torch.float32, device=self.dev)
        return self._ratios[key]

    def _passes(self, scores: Any, threshold: float) -> Any:
        """An image's own score threshold (the heads ran at the batch's lowest): scores >= it as the
        torchvision engine keeps them, > it as detectron2 does."""
        return scores > threshold if self.semantics.postprocess == "detectron2" else scores >= threshold

    def _to_input_pixels(self, boxes: torch.Tensor, valid: torch.Tensor, h: int, w: int, rh: int, rw: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Detections' boxes [..., 4] from the resized image to the input's pixels, and which stay valid:
        torchvision scales them (its small boxes went before the NMS); detectron2's detector_postprocess
        scales, clips them to the image and drops those with a side not above min_box_size (empty ones)."""
        boxes = boxes * self._ratio(h, w, rh, rw)
        sem = self.semantics
        if sem.postprocess == "detectron2":
            x, y = boxes[..., 0::2].clamp(0, w), boxes[..., 1::2].clamp(0, h)
            boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
            valid = valid & large_enough(boxes[..., 2:] - boxes[..., :2], sem.min_box_size, sem.min_size_strict)
        return boxes, valid

    def _fixed_graph(self, bucket: int, h: int, w: int, depth_dtype: torch.dtype | None) -> _FixedGraph | None:
        """The captured network for this shape; None while it is being captured in the background (the
        caller then runs the same network op by op). At load, captures in this thread."""
        key = (bucket, h, w, depth_dtype)
        if not self.use_graphs:  # the CPU (tests): static buffers of the padded bucket, run eagerly
            entry = self._fixed_graphs.get(key)
            if entry is None:
                entry = self._fixed_graphs[key] = _FixedGraph(*self._static_inputs(key), {}, None)
            return entry
        if not self._loaded:
            return self._graph_cache.capture_now(key)
        return self._graph_cache.get(key)

    def _static_inputs(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        bucket, h, w, depth_dtype = key
        color = torch.zeros(bucket, h, w, 3, dtype=torch.uint8, device=self.dev)
        depth = None if depth_dtype is None else torch.zeros(bucket, h, w, dtype=depth_dtype, device=self.dev)
        return color, depth, torch.zeros((), dtype=torch.float32, device=self.dev)

    def _describe(self, key: tuple[Any, ...]) -> str:
        bucket, h, w, depth_dtype = key
        return f"{bucket} image(s) of {w}x{h}" + ("" if depth_dtype is None else f" + {depth_dtype} depth")

    @torch.inference_mode()
    def _capture(self, key: tuple[Any, ...]) -> _FixedGraph:
        """Warm-up runs and one capture on a stream of its own. At load it runs in the engine's thread
        into the shared pool; later in the capture thread (GraphCache), into a pool of its own, while the engine's thread keeps serving on the default stream (it waits
        only while the graph records: GraphCache.recording)."""
        background = self._loaded
        torch.cuda.set_device(self.dev)
        color, depth, threshold = self._static_inputs(key)
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.dev)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # cudnn autotuning, lazy init, anchors and pooler scales outside the capture
                self._fixed_forward(color, depth, threshold)
        stream.synchronize()
        warmed = time.perf_counter() - t0
        graph = torch.cuda.CUDAGraph()
        with self._graph_cache.recording, torch.cuda.graph(graph, pool=None if background else self._pool,
                                                           stream=stream):
            out = self._fixed_forward(color, depth, threshold)
        if not background:
            log.info("captured the network for %s in %.1f s (warm-up runs %.1f s)", self._describe(key),
                     time.perf_counter() - t0, warmed)
        return _FixedGraph(color, depth, threshold, out, graph)

    def _infer_fixed(self, items: list[EngineInput], h: int, w: int, want_masks: bool) -> list[Detections]:
        return self._fixed_results(items, h, w, want_masks, self._run_fixed(items, h, w))

    def _run_fixed(self, items: list[EngineInput], h: int, w: int) -> dict[str, torch.Tensor]:
        """Writes the batch into its graph's inputs and queues the graph (or runs the same network op by
        op where the graph is not there yet). Returns with the device still working on a graph."""
        n = len(items)
        bucket = next(b for b in self.buckets if b >= n)
        depth_dtype = None
        if self.config.input_kind == "rgbd":
            if any(it.depth is None for it in items):
                raise ValueError("RGB-D model needs depth")
            depth_dtype = depth_dtype_of(items[0].depth)  # type: ignore[arg-type]
        self._mark(None)
        g = self._fixed_graph(bucket, h, w, depth_dtype)
        if g is None:  # its graph is being captured: these images run op by op meanwhile, unpadded
            g = _FixedGraph(*self._static_inputs((n, h, w, depth_dtype)), {}, None)
        encoded = [i for i, it in enumerate(items) if isinstance(it.color, EncodedImage)]
        if encoded:  # one decode for the batch's JPEGs, written into the graph's input
            for i, rgb in zip(encoded, decode_to_device([items[i].color for i in encoded], self.dev)):  # type: ignore[misc]
                g.color[i].copy_(rgb)
        for i, it in enumerate(items):
            if not isinstance(it.color, EncodedImage):
                self._pin_source(it.color)
                g.color[i].copy_(torch.from_numpy(it.color), non_blocking=True)
            if g.depth is not None:
                self._pin_source(host_array(it.depth))  # type: ignore[arg-type]
        if g.depth is not None:  # PNG rows reconstructed on the device, the batch's in one call (png_unfilter)
            depths_into([it.depth for it in items], g.depth)  # type: ignore[misc]
        g.threshold.fill_(min(it.score_threshold for it in items))
        if g.graph is not None:
            g.graph.replay()
            return g.out
        # the CPU (tests), or a shape whose graph is on its way: the same network, op by op
        return self._fixed_forward(g.color, g.depth, g.threshold)

    def _fixed_results(self, items: list[EngineInput], h: int, w: int, want_masks: bool,
                       out: dict[str, torch.Tensor]) -> list[Detections]:
        """Waits for the network, then reads its answers, pastes the masks and makes their RLE."""
        n = len(items)
        summary = out["summary"][:n].cpu().numpy()
        self._mark("network (one graph)")
        d = out["probs"].shape[1]  # detections per image: detections_per_img, or fewer candidates if that is all
        results: list[Detections | None] = [None] * n
        redo, picked, picked_boxes, spans, offset = [], [], [], [], 0
        for i, it in enumerate(items):
            row = summary[i]
            if row[-1] < 0.5:
                redo.append(i)
                continue
            scores = row[4 * d:5 * d]
            keep = np.flatnonzero((row[6 * d:7 * d] > 0.5) & self._passes(scores, it.score_threshold))
            results[i] = Detections(row[:4 * d].reshape(d, 4)[keep].copy(), scores[keep].copy(),
                                    row[5 * d:6 * d][keep].astype(np.int64), None, [] if want_masks else None)
            spans.append((i, offset, len(keep)))
            picked.append(keep + i * d)
            picked_boxes.append(results[i].boxes)  # type: ignore[union-attr]
            offset += len(keep)
        if want_masks and offset:
            index = torch.from_numpy(np.concatenate(picked)).to(self.dev)
            probs = out["probs"].flatten(0, 1)[index]
            # The boxes the device holds, as the host read them: the paste plans on the host, no sync.
            rles = paste_and_encode(probs, np.concatenate(picked_boxes), h, w, self.config.mask_threshold,
                                    rule=self.semantics.paste)
            for i, start, count in spans:
                results[i].rle = rles[start:start + count]  # type: ignore[union-attr]
        self._mark("paste and RLE")
        if redo:
            # Rare: NMS did not settle in the graph's iterations, or the top-k was too small.
            before, self.redone_images = self.redone_images, self.redone_images + len(redo)
            if before == 0 or before // 1000 != self.redone_images // 1000:
                log.warning("%d image(s) so far needed the slower op-by-op path (NMS not settled in %d "
                            "iterations, or more than %d detection candidates needed); if that is frequent, "
                            "raise ENGINE_OPTIONS nms_iterations or pre_nms_topk", self.redone_images,
                            self.heads.iterations, self.pre_nms_topk)
            for i, det in zip(redo, self._infer_dynamic([items[i] for i in redo], h, w, want_masks)):
                results[i] = det
        return results  # type: ignore[return-value]

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
                                            h, w, rh, rw)
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
