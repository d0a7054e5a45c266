"""An engine without a network, for tests and benchmarks of the serving path.

Its instances are a pure function of the input pixels, so a test can recompute
them and prove each response belongs to its own request. Its cost is fixed and
configurable (ENGINE_OPTIONS: cost_ms per batch, cost_ms_per_image, instances; png_rows: take
16-bit PNG depths as their filtered rows, as the fast engine on a GPU does, to measure the frontend),
so that a benchmark measures serving overhead against a known engine time.
Never a default: a model must ask for it by DETECTION_TYPE or ENGINE.
"""

from __future__ import annotations

import time

import numpy as np

from dd.png_rows import PngRows, unfilter
from dd.worker.engines.base import Detections, Engine, EngineInput


def null_detections(color: np.ndarray, depth: np.ndarray | None, instances: int, num_categories: int,
                    score_threshold: float, want_masks: bool = True) -> Detections:
    """Deterministic instances: a grid of boxes whose scores come from the pixels under them."""
    h, w = color.shape[:2]
    n = max(1, instances)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    boxes, scores, labels = [], [], []
    for i in range(n):
        r, c = divmod(i, cols)
        x1, x2 = c * w // cols, max(c * w // cols + 1, (c + 1) * w // cols)
        y1, y2 = r * h // rows, max(r * h // rows + 1, (r + 1) * h // rows)
        patch = color[y1:y2, x1:x2]
        value = float(patch.mean()) / 255.0 if patch.size else 0.0
        if depth is not None:
            d = depth[y1:y2, x1:x2]
            value = 0.5 * value + 0.5 * (float(d.mean()) % 1000.0) / 1000.0 if d.size else value
        boxes.append((x1, y1, x2, y2))
        scores.append(0.05 + 0.95 * value)
        labels.append(1 + i % max(1, num_categories))
    boxes_a = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores_a = np.asarray(scores, dtype=np.float32)
    labels_a = np.asarray(labels, dtype=np.int64)
    keep = scores_a >= score_threshold
    boxes_a, scores_a, labels_a = boxes_a[keep], scores_a[keep], labels_a[keep]
    masks = None
    if want_masks:
        masks = np.zeros((len(boxes_a), h, w), dtype=bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes_a.astype(int)):
            # An inset rectangle, so masks are not just their boxes.
            dx, dy = (x2 - x1) // 4, (y2 - y1) // 4
            masks[k, y1 + dy:y2 - dy, x1 + dx:x2 - dx] = True
    return Detections(boxes_a, scores_a, labels_a, masks)


class NullEngine(Engine):
    name = "null"

    def load(self) -> None:
        opts = self.config.engine_options
        self.cost_s = float(opts.get("cost_ms", 0.0)) / 1000.0
        self.cost_per_image_s = float(opts.get("cost_ms_per_image", 0.0)) / 1000.0
        self.instances = int(opts.get("instances", 4))
        self.fail_marker = opts.get("fail_on_pixel")  # tests: raise when color[0, 0, 0] equals this
        # Benchmarks of the frontend's share of a PNG depth: rows come here as they would to a GPU engine.
        self.png_rows = bool(opts.get("png_rows", False))
        if self.png_rows:
            self.unfilters_png_rows = True

    def unfilters_png_rows_on_gpu(self) -> bool:
        return self.png_rows or super().unfilters_png_rows_on_gpu()  # png_rows: as if on a GPU

    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        start = time.perf_counter()
        if self.fail_marker is not None:
            for item in batch:
                if int(item.color[0, 0, 0]) == int(self.fail_marker):
                    raise RuntimeError("null engine asked to fail on this image (fail_on_pixel)")
        for x in batch:
            if isinstance(x.depth, PngRows):
                x.depth = unfilter(x.depth.data, x.depth.height, x.depth.width)
        out = [null_detections(x.color, x.depth, self.instances, len(self.config.categories),
                               x.score_threshold, want_masks) for x in batch]
        remaining = self.cost_s + self.cost_per_image_s * len(batch) - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return out
