"""COCO compressed RLE strings of all instances from their change positions, in four Triton launches.

mask_rle.rle_strings' torch path turns the change positions of a batch's
masks into pycocotools' strings with some 55 to 60 small kernels and three or
four syncs (two boolean indexings, then the text and the bounds copied back
apart): 2.1 ms of host time for one image's 100 instances on an H100, 40% of
the engine's latency at batch 1. Here the same strings take, on sorted input
(the paste kernel's, see paste_kernel.transitions):

  1. _mark_kernel: which changes make a mark. Sorted by instance, then
     position, a position of height * width needs none (COCO ends on the last
     run, wherever it ends), and equal positions of one instance cancel (a
     run that reaches the bottom of a column and one that starts at the top
     of the next are one run: the paste gives that position twice).
  2. torch.cumsum of the marks: each kept change's index among the kept ones.
  3. _compact_kernel: the kept positions, packed (a scatter by that index),
     and each instance's first run's slot, run_start[i] = kept changes of
     the instances before i, plus i (a binary search of i in the sorted
     instance ids, then the cumsum there). Instance i's runs are the slots
     run_start[i] .. run_start[i + 1] - 1: one ending at each of its kept
     changes, then the last one, which ends at height * width.
  4. _run_kernel: for every run slot (a binary search over run_start gives
     its instance), pycocotools' value x (the run's count, less the count of
     the run two before it from the fourth run on) and its number of
     characters; slots past the last run (the changes that were dropped)
     get none.
  5. torch.cumsum of the character counts: each run's place in the text.
  6. _write_kernel: the characters (x in 5-bit groups, low first, each as
     48 + group, with 0x20 on every group but the last), and each instance's
     byte bounds, into one buffer: bounds first (int64), then the text.

Then one sync for the text's size (the last bound) and one device-to-host
copy of the bounds and the text together. Measured on an H100 (BENCHMARKS.md,
S4-9, R50 at 800, 100 detections): paste and RLE 1.9 -> 1.3 ms at batch 1,
5.3 -> 4.4 ms at batch 16. Unsorted input is sorted first
(one key per change, instance * (height * width + 1) + position, in int64:
these pass 2**31 at a few hundred instances of a large image).

pycocotools' rleToString (maskApi.c) writes each x as: c = x & 0x1f; x >>= 5;
more = c & 0x10 ? x != -1 : x != 0; c |= more ? 0x20 : 0; c += 48, until not
more. That is floor(bitlen(y) / 5) + 1 characters, y = x for x >= 0 and
-x - 1 for x < 0; with |x| <= height * width < 2**32 (pycocotools' counts are
uint32) at most 7.
"""

from __future__ import annotations

import numpy as np
import torch

from dd.worker.engines.base import RleText

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = 1024  # changes, runs or instances per program
NUM_WARPS = 4
MAX_PIXELS = 1 << 32  # pycocotools' counts are uint32; the kernels' values fit 7 characters below this

if triton is not None:

    # The steps' arithmetic, shared with fixed_rle.py's kernels (the same strings inside a CUDA graph).
    @triton.jit
    def _marks(inst_ptr, pos_ptr, j, ok, t, inst, pos, total):
        """Which of the sorted changes j (inst, pos loaded; t of them) make a mark: below their image's
        height * width (total), and neither neighbour is the same (instance, position)."""
        has_prev = ok & (j > 0)
        prev_inst = tl.load(inst_ptr + j - 1, mask=has_prev, other=0)
        prev_pos = tl.load(pos_ptr + j - 1, mask=has_prev, other=0)
        has_next = j + 1 < t
        next_inst = tl.load(inst_ptr + j + 1, mask=has_next, other=0)
        next_pos = tl.load(pos_ptr + j + 1, mask=has_next, other=0)
        same_prev = has_prev & (prev_inst == inst) & (prev_pos == pos)
        same_next = has_next & (next_inst == inst) & (next_pos == pos)
        return ok & (pos < total) & (same_prev == 0) & (same_next == 0)

    @triton.jit
    def _run_starts(inst_ptr, rank_ptr, i, on, t, step, BLOCK: tl.constexpr):
        """run_start[i] for instances i: the number of kept changes of instances below i, plus i (a binary
        search over the t sorted instance ids; step: the largest power of two <= t, or 0)."""
        p = tl.zeros([BLOCK], tl.int64)  # the number of changes of instances below i
        s = step
        while s > 0:
            cand = p + s
            inside = on & (cand <= t)
            go = inside & (tl.load(inst_ptr + tl.minimum(cand, t) - 1, mask=inside, other=0) < i)
            p = tl.where(go, cand, p)
            s = s // 2
        before = tl.load(rank_ptr + tl.maximum(p - 1, 0), mask=on & (p > 0), other=0)
        return tl.where(p > 0, before, 0) + i

    @triton.jit
    def _run_instance(run_start_ptr, r, count, step, BLOCK: tl.constexpr):
        """Run slot r's instance: the last i in [0, count] with run_start[i] <= r (step: the largest power of
        two <= count; run_start[0] = 0); i == count for the slots past the last run."""
        i = tl.zeros([BLOCK], tl.int64)
        s = step
        while s > 0:
            cand = i + s
            go = (cand <= count) & (tl.load(run_start_ptr + tl.minimum(cand, count)) <= r)
            i = tl.where(go, cand, i)
            s = s // 2
        return i

    @triton.jit
    def _run_value(kept_ptr, run_start_ptr, r, ok, i, count, total):
        """Run slot r of instance i (_run_instance): pycocotools' value x, its number of characters, and
        whether the slot is a run; total: the instance's height * width, where its last run ends."""
        real = ok & (i < count)
        first = tl.load(run_start_ptr + i, mask=ok, other=0)
        after = tl.load(run_start_ptr + tl.minimum(i + 1, count), mask=real, other=0)
        base = first - i  # the instance's first kept change
        n = after - first - 1  # its kept changes: runs 0 .. n - 1 end at them, run n at height * width
        q = r - first  # the run's index in the instance's RLE
        at = kept_ptr + base + q
        end = tl.where(q < n, tl.load(at, mask=real & (q < n), other=0).to(tl.int64), total)
        begin = tl.load(at - 1, mask=real & (q > 0), other=0).to(tl.int64)
        # From the fourth run on, less the count of the run two before: it lies between kept changes
        # q - 3 and q - 2 (q - 2 < n).
        back = (tl.load(at - 2, mask=real & (q > 2), other=0).to(tl.int64)
                - tl.load(at - 3, mask=real & (q > 2), other=0))
        x = tl.where(real, end - begin - back, 0)
        y = tl.where(x < 0, -x - 1, x)
        chars = (1 + (y >= 1 << 4).to(tl.int32) + (y >= 1 << 9).to(tl.int32) + (y >= 1 << 14).to(tl.int32)
                 + (y >= 1 << 19).to(tl.int32) + (y >= 1 << 24).to(tl.int32) + (y >= 1 << 29).to(tl.int32))
        return x, chars, real

    @triton.jit
    def _write_run(out, x, n, ok, room):
        """A run's n characters of value x at out (5-bit groups, low first, 48 + group, 0x20 on all but the
        last), at most `room` of them (what fits in the text)."""
        for g in tl.static_range(7):
            group = ((x >> (5 * g)) & 0x1F) + tl.where(g < n - 1, 0x20, 0) + 48
            tl.store(out + g, group.to(tl.uint8), mask=ok & (g < n) & (g < room))

    @triton.jit
    def _bounds(ends_ptr, run_start_ptr, i, on):
        """Where instance i's string starts in the text (ends: inclusive cumsum of the runs' characters)."""
        first = tl.load(run_start_ptr + i, mask=on, other=0)
        start = tl.load(ends_ptr + tl.maximum(first - 1, 0), mask=on & (first > 0), other=0).to(tl.int64)
        return tl.where(first > 0, start, 0)

    @triton.jit(do_not_specialize=["t", "total"])
    def _mark_kernel(inst_ptr, pos_ptr, keep_ptr, t, total, BLOCK: tl.constexpr):
        """keep[j] = 1 where change j (sorted) makes a mark: below height * width, and neither of its
        neighbours is the same (instance, position)."""
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = j < t
        inst = tl.load(inst_ptr + j, mask=ok, other=0)
        pos = tl.load(pos_ptr + j, mask=ok, other=0)
        keep = _marks(inst_ptr, pos_ptr, j, ok, t, inst, pos, total)
        tl.store(keep_ptr + j, keep.to(tl.int8), mask=ok)

    @triton.jit(do_not_specialize=["t", "count", "step"])
    def _compact_kernel(inst_ptr, pos_ptr, keep_ptr, rank_ptr, kept_ptr, run_start_ptr, t, count, step,
                        BLOCK: tl.constexpr):
        """The kept positions packed (kept[rank[j] - 1] = pos[j]), and run_start[i] for i in [0, count]:
        the number of kept changes of instances below i, plus i."""
        pid = tl.program_id(0)
        j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = (j < t) & (tl.load(keep_ptr + j, mask=j < t, other=0) != 0)
        rank = tl.load(rank_ptr + j, mask=keep, other=1)  # inclusive cumsum of keep
        pos = tl.load(pos_ptr + j, mask=keep, other=0)
        tl.store(kept_ptr + rank - 1, pos, mask=keep)
        if pid.to(tl.int64) * BLOCK <= count:
            i = j  # this program's instances
            on = i <= count
            tl.store(run_start_ptr + i, _run_starts(inst_ptr, rank_ptr, i, on, t, step, BLOCK), mask=on)

    @triton.jit(do_not_specialize=["runs", "count", "total", "step"])
    def _run_kernel(kept_ptr, run_start_ptr, value_ptr, chars_ptr, runs, count, total, step,
                    BLOCK: tl.constexpr):
        """For every run slot, pycocotools' value x and its number of characters (0 past the last run)."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = r < runs
        i = _run_instance(run_start_ptr, r, count, step, BLOCK)
        x, chars, real = _run_value(kept_ptr, run_start_ptr, r, ok, i, count, total)
        tl.store(value_ptr + r, x, mask=ok)
        tl.store(chars_ptr + r, tl.where(real, chars, 0), mask=ok)

    @triton.jit(do_not_specialize=["runs", "count", "text_at"])
    def _write_kernel(value_ptr, chars_ptr, ends_ptr, run_start_ptr, text_ptr, bounds_ptr, runs, count,
                      text_at, BLOCK: tl.constexpr):
        """Each run's characters at its place in the text, and bounds[i] for i in [0, count]: where
        instance i's string starts (bounds[count]: the text's size)."""
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = r < runs
        x = tl.load(value_ptr + r, mask=ok, other=0)
        n = tl.load(chars_ptr + r, mask=ok, other=0)
        end = tl.load(ends_ptr + r, mask=ok, other=0)  # inclusive cumsum of the character counts
        _write_run(text_ptr + text_at + end - n, x, n, ok, n)  # the buffer holds every run's characters
        if pid.to(tl.int64) * BLOCK <= count:
            i = r  # this program's instances
            on = i <= count
            tl.store(bounds_ptr + i, _bounds(ends_ptr, run_start_ptr, i, on), mask=on)


def available() -> bool:
    return triton is not None


def _pow2_floor(v: int) -> int:
    return 1 << (v.bit_length() - 1) if v > 0 else 0


def strings(inst: torch.Tensor, pos: torch.Tensor, count: int, height: int, width: int,
            presorted: bool = False, block: int | None = None) -> RleText | list[bytes]:
    """mask_rle.rle_strings with the kernels above: pycocotools' compressed RLE string of each of
    `count` instances, from (instance, column-major position) of each change of its mask.

    presorted: the pairs come sorted by instance, then position (the paste kernel's order); otherwise
    they are sorted here. Two syncs: the text's size, then one copy of the bounds and the text.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if count == 0:
        return []
    total = height * width
    if total >= MAX_PIXELS:
        raise ValueError(f"an image of {height} x {width} is too large for COCO's RLE (uint32 counts)")
    block = BLOCK if block is None else block
    dev = inst.device
    inst = inst.to(torch.int64).contiguous()
    pos = pos.to(torch.int64).contiguous()
    t = inst.shape[0]
    if not presorted and t:
        key, _ = torch.sort(torch.add(pos, inst, alpha=total + 1))
        inst = torch.div(key, total + 1, rounding_mode="floor")
        pos = key - inst * (total + 1)
    runs = t + count  # at most: one run per kept change, and each instance's last
    if t:
        keep = torch.empty(t, dtype=torch.int8, device=dev)
        _mark_kernel[(triton.cdiv(t, block),)](inst, pos, keep, t, total, BLOCK=block, num_warps=NUM_WARPS)
        rank = torch.cumsum(keep, 0, dtype=torch.int64)
        kept = torch.empty(t, dtype=torch.int64, device=dev)
    else:  # nothing to read; the kernels need pointers all the same
        inst = pos = kept = rank = torch.zeros(1, dtype=torch.int64, device=dev)
        keep = torch.zeros(1, dtype=torch.int8, device=dev)
    run_start = torch.empty(count + 1, dtype=torch.int64, device=dev)
    _compact_kernel[(triton.cdiv(max(t, count + 1), block),)](
        inst, pos, keep, rank, kept, run_start, t, count, _pow2_floor(t), BLOCK=block, num_warps=NUM_WARPS)
    value = torch.empty(runs, dtype=torch.int64, device=dev)
    chars = torch.empty(runs, dtype=torch.int32, device=dev)
    _run_kernel[(triton.cdiv(runs, block),)](kept, run_start, value, chars, runs, count, total,
                                             _pow2_floor(count), BLOCK=block, num_warps=NUM_WARPS)
    ends = torch.cumsum(chars, 0, dtype=torch.int64)
    # One buffer for what comes back: the bounds (count + 1 int64), then the text; |x| <= total, so a
    # run takes at most bitlen(total) // 5 + 1 characters.
    head = 8 * (count + 1)
    buf = torch.empty(head + runs * (total.bit_length() // 5 + 1), dtype=torch.uint8, device=dev)
    bounds = buf[:head].view(torch.int64)
    _write_kernel[(triton.cdiv(max(runs, count + 1), block),)](
        value, chars, ends, run_start, buf, bounds, runs, count, head, BLOCK=block, num_warps=NUM_WARPS)
    size = int(bounds[count])  # the one sync before the copy: how much to copy
    host = buf[:head + size].cpu().numpy()
    # The strings stay where they arrived (RleText): no copy per string, none into one bytes object.
    return RleText(host[head:], host[:head].view(np.int64).tolist())
