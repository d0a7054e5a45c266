"""Which kernel arguments Triton may specialize on, and why: one compilation at load must serve every input size.

Triton compiles a kernel once per *specialization key*: besides the constexprs and the argument types,
every integer argument is keyed on whether it equals 1 and whether it is divisible by 16, and every
pointer on whether it is 16-byte aligned. An argument that follows the input size, the batch or the
number of boxes or detections therefore splits the kernel into variants by how that number happens to
divide, and the first request at a size that divides differently compiled its variant in service: on an
H200, 640x480 after a warm-up at 1280x720 stalled the worker for 1.9 s (0.2 s with a warm Triton cache).
Such arguments are marked `do_not_specialize` on the kernel. This buys nothing back for them: each is a
loop bound, a mask bound, a clamp or a scalar load's index, never the stride of a vectorised access.

What stays specialized does not change with the size (or only outside the engine's use), with the
reason. NOT_SPECIALIZED and SPECIALIZED together name every non-constexpr argument of every kernel
(tests/unit/engines/test_kernel_specialization.py checks that against the kernels' decorators, and that
launches at different sizes share one key): a new argument needs a decision here.

Constexprs are keys too: the channels-last kernels' tiles no longer shrink for narrow images (they did
below 8-16 pixels of feature map), roi_align's WIDE changes only for a level of over 2**31 elements per
image, and roi_align passes 0 as the stride of a dimension of size 1 (PyTorch reports 1 there, which
Triton would turn into a constant) since that dimension is only read at index 0.
"""

from __future__ import annotations

from typing import Any

SIZE = "follows the input size"
BATCH = "follows the batch size"
COUNT = "follows the number of boxes or detections"

_LOOP = "a loop or mask bound, no vectorised access"
_LEVEL_SIZE = f"{SIZE} (a level's height or width); {_LOOP}: only clamps sample indices and masks samples"

# fixed_rle's kernels run inside a graph per batch bucket and canvas; their sizes are capacities and
# detection slots, fixed per graph but different between graphs, and the device's own counts.
_CAP = f"{BATCH} and {SIZE} (a capacity of the graph's bucket and canvas); a loop or mask bound"
_SLOTS = f"{BATCH} (the bucket's detection slots); the fields' row length, a bound, scalar loads"
_STEP = f"{BATCH} (the largest power of two <= the slots); a loop counter"
_TOTAL_VIEW = "the last element of a cumsum over the slots: its alignment follows their parity; one scalar load"

# kernel ("module:function" under dd.worker.engines.kernels) -> argument -> why it is not specialized
NOT_SPECIALIZED: dict[str, dict[str, str]] = {
    "roi_align:_roi_align_kernel": {
        **{f"h{i}": _LEVEL_SIZE for i in range(5)},
        **{f"w{i}": _LEVEL_SIZE for i in range(5)},
        "n_images": f"{BATCH}; only bounds the image index",
    },
    "paste:_paste_kernel": {
        "fields_ptr": f"{COUNT}: the fields follow the N int64 offsets in one buffer, so their 16-byte "
                      "alignment is N's parity; read with scalar loads only",
        "floats_ptr": "the same buffer as fields_ptr (its float32 view): alignment follows N's parity",
        "n": f"{COUNT}; the binary search's bound and the fields' row length, scalar loads",
        "height": f"{SIZE}; masks rows",
        "width": f"{SIZE}; masks columns",
        "step": f"{COUNT} (the largest power of two <= N); a loop counter",
    },
    "paste:_position_kernel": {
        "fields_ptr": "as in _paste_kernel: alignment follows the number of instances' parity; scalar loads",
        "k": f"{COUNT} (changes found); masks the tail",
        "n": f"{COUNT}; the binary search's bound",
        "height": f"{SIZE}; a multiplier of the output position",
        "step": f"{COUNT}; a loop counter",
    },
    "rle:_mark_kernel": {
        "t": f"{COUNT} (changes); masks the tail",
        "total": f"{SIZE} (height * width); compared with positions",
    },
    "rle:_compact_kernel": {
        "t": f"{COUNT}; masks and search bound",
        "count": f"{COUNT} (instances); a bound",
        "step": f"{COUNT}; a loop counter",
    },
    "rle:_run_kernel": {
        "runs": f"{COUNT}; masks the tail",
        "count": f"{COUNT}; the binary search's bound",
        "total": f"{SIZE} (height * width); the last run's end",
        "step": f"{COUNT}; a loop counter",
    },
    "rle:_write_kernel": {
        "runs": f"{COUNT}; masks the tail",
        "count": f"{COUNT}; a bound",
        "text_at": f"{COUNT} (8 * (instances + 1)); the text's byte offset, byte stores",
    },
    **{f"fixed_rle:{k}": args for k, args in {
        "_count_kernel": {"tiles_ptr": _TOTAL_VIEW, "n": _SLOTS, "tiles_cap": _CAP, "step": _STEP},
        "_emit_kernel": {"tiles_ptr": _TOTAL_VIEW, "n": _SLOTS, "tiles_cap": _CAP, "changes_cap": _CAP,
                         "step": _STEP},
        "_mark_kernel": {"changes_cap": _CAP, "n": _SLOTS},
        "_compact_kernel": {"changes_cap": _CAP, "count": _SLOTS, "step": _CAP},
        "_run_kernel": {"changes_cap": _CAP, "count": _SLOTS, "n": _SLOTS, "step": _STEP},
        "_write_kernel": {"changes_cap": _CAP, "count": _SLOTS, "text_cap": _CAP},
    }.items()},
    "channels_last:_bias_add_kernel": {
        "rows": f"{SIZE} and {BATCH} (N * H * W); masks pixel rows, while the vectorised axis is C",
    },
    "channels_last:_upsample_add_kernel": {
        "H": f"{SIZE}; row arithmetic once per program", "W": f"{SIZE}; masks pixels (C is the vectorised axis)",
        "h": f"{SIZE}; clamps the source row", "w": f"{SIZE}; clamps the source column",
        "n_wblocks": f"{SIZE}; splits the program id",
    },
    "channels_last:_max_pool_kernel": {
        "H": f"{SIZE}; masks input rows", "W": f"{SIZE}; masks input columns",
        "Ho": f"{SIZE}; masks output rows", "Wo": f"{SIZE}; masks output columns",
        "n_wblocks": f"{SIZE}; splits the program id", "n_yblocks": f"{SIZE}; splits the program id",
    },
}

_FRESH = "a freshly allocated tensor (torch's allocators align to at least 64 bytes): aligned at every size"
_CL_STRIDE = ("channels-last levels (the engine's): a multiple of C (256), so divisible by 16 at every size, "
              "and that divisibility is what lets a program's channel loads vectorise; contiguous (NCHW) "
              "levels would compile one variant per divisibility of H, W and H * W")

_SAME = "the fields' float32 view: the same fresh buffer"
_FLOAT = "a float: Triton never specializes floats"

# kernel -> argument -> why it stays specialized (pointers: on 16-byte alignment; integers: on == 1, % 16)
SPECIALIZED: dict[str, dict[str, str]] = {
    "roi_align:_roi_align_kernel": {
        "out_ptr": _FRESH, "boxes_ptr": _FRESH, "level_ptr": _FRESH, "image_ptr": _FRESH,
        **{f"f{i}": f"{_FRESH} (the FPN's outputs); the channel loads vectorise on it" for i in range(5)},
        **{f"sc{i}": "the channel stride: 1 for channels-last levels at every size (== 1 makes a pixel's "
                     "channels one vector load)" for i in range(5)},
        **{f"sw{i}": _CL_STRIDE for i in range(5)},
        **{f"sh{i}": _CL_STRIDE for i in range(5)},
        **{f"sn{i}": _CL_STRIDE for i in range(5)},
        "channels": "the model's channel count (256): fixed for a model",
    },
    "suppression:_suppression_kernel": {
        "boxes_ptr": _FRESH, "valid_ptr": _FRESH, "labels_ptr": _FRESH, "out_ptr": _FRESH,
        "threshold": "a float: Triton never specializes floats",
        "k": ("the NMS group's length: the RPN's min(pre_nms_top_n, the largest level's anchors), 1000 for "
              "any resized input over about 75 x 75 pixels (inputs are resized to min_size), and the "
              "detections' pre_nms_topk (1024), so one value per NMS at every served size; K % 16 lets the "
              "matrix rows' stores vectorise (1024)"),
    },
    "paste:_paste_kernel": {
        "masks_ptr": _FRESH, "offsets_ptr": "the start of the packed buffer: aligned", "out_ptr": _FRESH,
        "threshold": "a float: Triton never specializes floats",
    },
    "paste:_position_kernel": {
        "hits_ptr": "nonzero's fresh output (its column 0: offset 0)", "offsets_ptr": "the packed buffer's start",
        "inst_ptr": _FRESH, "pos_ptr": _FRESH,
    },
    "rle:_mark_kernel": {"inst_ptr": _FRESH, "pos_ptr": _FRESH, "keep_ptr": _FRESH},
    "rle:_compact_kernel": {"inst_ptr": _FRESH, "pos_ptr": _FRESH, "keep_ptr": _FRESH, "rank_ptr": _FRESH,
                            "kept_ptr": _FRESH, "run_start_ptr": _FRESH},
    "rle:_run_kernel": {"kept_ptr": _FRESH, "run_start_ptr": _FRESH, "value_ptr": _FRESH, "chars_ptr": _FRESH},
    "rle:_write_kernel": {"value_ptr": _FRESH, "chars_ptr": _FRESH, "ends_ptr": _FRESH, "run_start_ptr": _FRESH,
                          "text_ptr": _FRESH, "bounds_ptr": "the start of the same buffer as text_ptr"},
    **{f"fixed_rle:{k}": {arg: _FRESH for arg in args} | extra for k, args, extra in (
        ("_count_kernel", ("masks_ptr", "fields_ptr", "counts_ptr"), {"floats_ptr": _SAME, "threshold": _FLOAT}),
        ("_emit_kernel", ("masks_ptr", "fields_ptr", "ends_ptr", "inst_ptr", "pos_ptr"),
         {"floats_ptr": _SAME, "threshold": _FLOAT}),
        ("_mark_kernel", ("inst_ptr", "pos_ptr", "fields_ptr", "count_ptr", "keep_ptr"), {}),
        ("_compact_kernel", ("inst_ptr", "pos_ptr", "keep_ptr", "rank_ptr", "count_ptr", "kept_ptr",
                             "run_start_ptr"), {}),
        ("_run_kernel", ("kept_ptr", "run_start_ptr", "fields_ptr", "count_ptr", "value_ptr", "chars_ptr"), {}),
        ("_write_kernel", ("value_ptr", "chars_ptr", "ends_ptr", "run_start_ptr", "count_ptr", "text_ptr",
                           "bounds_ptr"), {}),
    )},
    "channels_last:_bias_add_kernel": {
        "x_ptr": f"{_FRESH} (a convolution's output)", "b_ptr": "a parameter: aligned",
        "C": "the layer's channel count: fixed for a model; % 16 lets the channel accesses vectorise",
    },
    "channels_last:_upsample_add_kernel": {
        "lat_ptr": _FRESH, "top_ptr": _FRESH, "b_ptr": "a parameter: aligned", "out_ptr": _FRESH,
        "C": "the FPN's channel count: fixed; % 16 lets the channel accesses vectorise",
        "scale_h": "a float: Triton never specializes floats", "scale_w": "a float: Triton never specializes floats",
    },
    "channels_last:_max_pool_kernel": {
        "x_ptr": _FRESH, "out_ptr": _FRESH,
        "C": "the stem's channel count (64): fixed; % 16 lets the channel accesses vectorise",
    },
}


def not_specialized(kernel: Any) -> set[str]:
    """The names of a Triton kernel's arguments marked do_not_specialize, whether it is compiled
    (triton.runtime.JITFunction) or interpreted (TRITON_INTERPRET=1: an InterpretedFunction)."""
    if hasattr(kernel, "params"):  # JITFunction: one KernelParam per argument
        return {p.name for p in kernel.params if p.do_not_specialize}
    names = list(kernel.arg_names)
    marked = kernel.kwargs.get("do_not_specialize") or []
    return {names[m] if isinstance(m, int) else m for m in marked}
