#!/usr/bin/env python
"""Writes tests/data/detectron2/trainer/: a real detectron2 trainer checkpoint of a minute Mask R-CNN.

Made once with detectron2 itself (its SimpleTrainer with the LRScheduler hook, trained two
iterations on a synthetic image, saved by DetectionCheckpointer with the trainer's state and
the iteration, as DefaultTrainer saves model_final.pth), beside its dumped YAML, so that the
tests read the exact container users have without detectron2 installed. Regenerate with:

    PYTHONPATH=/work/d2src python scripts/make_detectron2_trainer_checkpoint.py
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "detectron2" / "trainer"
OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", True, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES",
    ["res2", "res3", "res4", "res5"], "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]],
    "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"], "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"], "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC", 2, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
    "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.WIDTH_PER_GROUP", 1, "MODEL.RESNETS.RES2_OUT_CHANNELS", 4,
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 4, "MODEL.FPN.OUT_CHANNELS", 4, "MODEL.ROI_BOX_HEAD.FC_DIM", 4,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 4, "MODEL.ROI_HEADS.NUM_CLASSES", 2, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 16, "SOLVER.BASE_LR", 0.001, "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 128,
]


def main() -> None:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.structures import BitMasks, Boxes, Instances

    cfg = get_cfg()
    cfg.merge_from_list(OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            inst = Instances((64, 64))
            inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 44.0]]))
            inst.gt_classes = torch.tensor([1])
            mask = torch.zeros(1, 64, 64, dtype=torch.bool)
            mask[0, 12:44, 10:40] = True
            inst.gt_masks = BitMasks(mask)
            yield [{"image": torch.rand(3, 64, 64, generator=g) * 255, "instances": inst, "height": 64, "width": 64}]

    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, batches(), optimizer)
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer))])
    OUT.mkdir(parents=True, exist_ok=True)
    checkpointer = DetectionCheckpointer(model, str(OUT), trainer=weakref.proxy(trainer))
    trainer.train(0, 2)
    checkpointer.save("model_final", iteration=trainer.iter)
    (OUT / "last_checkpoint").unlink(missing_ok=True)
    (OUT / "config.yaml").write_text(cfg.dump())
    print(f"wrote {OUT / 'model_final.pth'} ({(OUT / 'model_final.pth').stat().st_size} bytes) and config.yaml")


if __name__ == "__main__":
    main()
