"""torchvision's Mask R-CNN, eager mode: the reference engine, on the CPU or a GPU.

Every other engine is checked against this one. Depth becomes a fourth channel
in metres, missing pixels (0) filled with DEPTH_FILL (default DEPTH_MEAN), and
then normalised by DEPTH_MEAN/DEPTH_STD with the color channels.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dd.models.build import build_loaded_model
from dd.worker.engines.base import Detections, Engine, EngineInput, depth_to_metres

log = logging.getLogger(__name__)




class TorchvisionMaskRCNN(Engine):
    name = "torchvision"

    def load(self) -> None:
        cfg = self.config
        self.model = build_loaded_model(cfg)
        self.torch_device = torch.device(self.device)
        self.model.eval().to(self.torch_device)
        self.fill = cfg.depth_fill
        # Warm up, so that the first request does not pay for lazy initialisation.
        h, w = cfg.min_size, cfg.min_size
        dummy = EngineInput(np.zeros((h, w, 3), np.uint8),
                            np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)
        self.infer([dummy])

    def _tensor(self, item: EngineInput) -> torch.Tensor:
        color = torch.from_numpy(item.color).to(self.torch_device, non_blocking=True)
        chw = color.permute(2, 0, 1).float().div_(255.0)
        if self.config.input_kind != "rgbd":
            return chw
        if item.depth is None:
            raise ValueError("RGB-D model needs depth")
        d = torch.from_numpy(depth_to_metres(item.depth, self.config.depth_unit_m)).to(self.torch_device)
        d = torch.where(d > 0, d, torch.full_like(d, self.fill))
        return torch.cat([chw, d.unsqueeze(0)], dim=0)

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        tensors = [self._tensor(x) for x in batch]
        # One forward for the batch at the lowest threshold asked; each image is filtered to its own below.
        self.model.roi_heads.score_thresh = min(x.score_threshold for x in batch)
        outputs = self.model(tensors)
        results = []
        thr_mask = self.config.mask_threshold
        for item, out in zip(batch, outputs):
            keep = out["scores"] >= item.score_threshold
            boxes = out["boxes"][keep].float().cpu().numpy()
            scores = out["scores"][keep].float().cpu().numpy()
            labels = out["labels"][keep].cpu().numpy().astype(np.int64)
            masks = None
            if want_masks:
                masks = (out["masks"][keep][:, 0] >= thr_mask).cpu().numpy()
            results.append(Detections(boxes, scores, labels, masks))
        return results

    def close(self) -> None:
        del self.model
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
