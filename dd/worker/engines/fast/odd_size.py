"""The input size of the load-time run that compiles, before any request, what is still keyed on how sizes divide.

The Triton kernels take every size-dependent number unspecialized (kernels/specialization.py), so one
compilation serves every input size. Anything still keyed on divisibility (a pointer's alignment, a
stride where a level is one pixel wide, a future kernel argument nobody classified) would compile
again at the first request of a size whose feature maps divide differently from the warm-up sizes'.
The engine therefore runs its op-by-op path once at load at an input size whose padded sizes divide
differently from the first warm-up size's: the network pads to multiples of 32, so a level of stride
s (4 to 32) is (padded / 32) * (32 / s) wide, and its divisibility by 16 at stride 4 (the largest
level) follows the parity of padded / 32. That size is chosen here, from the engine's own resize rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Resize = Callable[[int, int], tuple[int, int]]


def _blocks(n: int, divisible: int) -> int:
    return int(math.ceil(n / divisible))


def odd_warmup_size(sizes: Sequence[Sequence[int]], resized: Resize, divisible: int = 32) -> tuple[int, int]:
    """An input (H, W) near the first of `sizes` whose resized size, padded to `divisible`, has the other
    parity of blocks than that size's in as many dimensions as the resize rule allows (a shorter side
    resized to min_size is fixed unless the longer side is capped, so the candidates also vary the aspect
    ratio), preferring resized sides that are not multiples of 16, then the closest area; never a size
    whose padded size one of `sizes` already has."""
    h0, w0 = (int(v) for v in sizes[0])
    taken = {tuple(_blocks(n, divisible) for n in resized(int(h), int(w))) for h, w in sizes}
    base = [b % 2 for b in _blocks_of(resized(h0, w0), divisible)]
    candidates = [(h0, w) for w in range(max(w0 // 2, 1), 2 * w0 + 1)]
    candidates += [(h, w0) for h in range(max(h0 // 2, 1), 2 * h0 + 1)]
    best, best_score = None, None
    for h, w in candidates:
        rh, rw = resized(h, w)
        blocks = _blocks_of((rh, rw), divisible)
        if tuple(blocks) in taken:
            continue
        score = (sum(b % 2 != p for b, p in zip(blocks, base)), (rh % 16 != 0) + (rw % 16 != 0),
                 -abs(h * w - h0 * w0))
        if best_score is None or score > best_score:
            best, best_score = (h, w), score
    if best is None:  # every candidate pads like a warm-up size: a degenerate resize rule
        return h0 + divisible, w0 + divisible
    return best


def _blocks_of(size: tuple[int, int], divisible: int) -> list[int]:
    return [_blocks(n, divisible) for n in size]
