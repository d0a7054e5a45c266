"""Fixed-shape NMS and RoI pooling against torchvision's own ops (CPU; the GPU runs the same code)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, batched_nms, nms

from dd.worker.engines.fast.fixed_shapes import FixedShapeHeads, nms_fixed, top_stable


def _clustered_boxes(g: torch.Generator, n: int, clusters: int = 12) -> torch.Tensor:
    centres = torch.rand(clusters, 2, generator=g) * 200
    which = torch.randint(0, clusters, (n,), generator=g)
    c = centres[which] + torch.randn(n, 2, generator=g) * 6
    wh = 20 + torch.rand(n, 2, generator=g) * 30
    return torch.cat([c - wh / 2, c + wh / 2], 1)


@pytest.mark.parametrize("seed", range(4))
def test_nms_fixed_is_greedy_nms(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    groups, k = 3, 300
    boxes = torch.stack([_clustered_boxes(g, k) for _ in range(groups)])
    scores = torch.rand(groups, k, generator=g)
    scores, order = scores.sort(dim=1, descending=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    valid = torch.rand(groups, k, generator=g) > 0.1
    keep, settled = nms_fixed(boxes, valid, 0.5, iterations=50)
    assert settled.all()
    for i in range(groups):
        idx = valid[i].nonzero()[:, 0]
        expected = idx[nms(boxes[i][idx], scores[i][idx], 0.5)]
        assert torch.equal(keep[i].nonzero()[:, 0], expected.sort().values)


def test_nms_fixed_class_wise_is_batched_nms() -> None:
    g = torch.Generator().manual_seed(7)
    k = 400
    boxes = _clustered_boxes(g, k)
    scores, order = torch.rand(k, generator=g).sort(descending=True)
    boxes = boxes[order]
    labels = torch.randint(1, 4, (k,), generator=g)
    keep, settled = nms_fixed(boxes[None], torch.ones(1, k, dtype=torch.bool), 0.5, 50, labels[None])
    assert settled.all()
    assert torch.equal(keep[0].nonzero()[:, 0], batched_nms(boxes, scores, labels, 0.5).sort().values)


def test_nms_fixed_says_when_it_has_not_settled() -> None:
    """A chain a > b > c where a suppresses b and b would suppress c: c survives, but only the
    second iteration can know it; a third is needed to see that nothing changes."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [3, 0, 13, 10], [6.5, 0, 16.5, 10]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    keep, settled = nms_fixed(boxes, valid, 0.4, iterations=2)
    assert not settled.all()
    keep, settled = nms_fixed(boxes, valid, 0.4, iterations=3)
    assert settled.all() and keep.tolist() == [[True, False, True]]
    assert nms(boxes[0], torch.tensor([3.0, 2, 1]), 0.4).tolist() == [0, 2]


def test_top_stable_keeps_ties_in_index_order() -> None:
    values, index = top_stable(torch.tensor([[0.5, 1.0, 1.0, 0.2, 1.0]]), 3)
    assert index.tolist() == [[1, 2, 4]] and values.tolist() == [[1.0, 1.0, 1.0]]


def test_fixed_roi_pool_matches_multiscale_roi_align() -> None:
    g = torch.Generator().manual_seed(3)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    size = (512, 640)
    feats = {str(i): torch.randn(2, 8, size[0] >> (i + 2), size[1] >> (i + 2), generator=g) for i in range(4)}
    # boxes of every scale, so that all four levels are used, clipped to the image as the heads' are;
    # many reach its bottom or right edge, where roi_align clamps to a level's last row or column
    xy = torch.rand(2, 60, 2, generator=g) * 300
    wh = 16 * 2 ** (torch.rand(2, 60, 1, generator=g) * 6) * (0.7 + 0.6 * torch.rand(2, 60, 2, generator=g))
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, size[1])
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, size[0])
    assert (boxes[..., 3] == size[0]).sum() > 5 and (boxes[..., 2] == size[1]).sum() > 5
    expected = pooler(feats, list(boxes.unbind(0)), [size, size])
    assert pooler.map_levels(list(boxes.unbind(0))).unique().numel() == 4
    heads = FixedShapeHeads(torch.nn.Module())
    got = heads.roi_pool(MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), feats, boxes, size)
    # Same sample positions; at a level's edge the weights of a repeated row may round differently.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Split into one stack per image (as a batch too large for roi_align's 32-bit offsets is): same answer.
    one = FixedShapeHeads.level_stack([feats[str(i)] for i in range(4)], max_elements=4 * 8 * 130 * 162)
    assert len(one) == 2
    torch.testing.assert_close(heads.roi_pool(pooler, feats, boxes, size, one), got, rtol=0, atol=0)
    inside = heads.roi_pool(pooler, feats, boxes * 0.5, size)
    torch.testing.assert_close(inside, pooler(feats, list((boxes * 0.5).unbind(0)), [size, size]), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v3_large"])
def test_folding_batchnorm_keeps_the_backbone_function(arch: str) -> None:
    from dd.config import DEFAULT_ARCHITECTURE
    from dd.models.maskrcnn import build_maskrcnn
    from dd.models.model_folder import SMALL_ARCHITECTURE
    from dd.worker.engines.fast.batchnorm_fold import fold_batchnorm

    torch.manual_seed(0)
    spec = dict(DEFAULT_ARCHITECTURE if arch == "resnet50" else SMALL_ARCHITECTURE)
    model = build_maskrcnn(spec, num_classes=3, channels=4, min_size=128, max_size=160,
                           image_mean=[0.5] * 4, image_std=[0.25] * 4).eval()
    for m in model.modules():  # non-trivial statistics, so that folding has something to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(1, 4, 128, 160)
    with torch.inference_mode():
        before = model.backbone(x)
    n = fold_batchnorm(model.backbone)
    assert n > 10 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    with torch.inference_mode():
        after = model.backbone(x)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-3, atol=1e-3)



def test_decode_boxes_is_boxcoders_decode() -> None:
    from torchvision.models.detection._utils import BoxCoder

    from dd.worker.engines.fast.fixed_shapes import decode_boxes

    g = torch.Generator().manual_seed(2)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    xy = torch.rand(50, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 100], 1)
    codes = torch.randn(50, 3 * 4, generator=g) * 3  # 3 classes; large enough to hit the exp clip
    expected = coder.decode(codes, [boxes])
    assert torch.equal(decode_boxes(coder, codes, boxes), expected)


def test_roi_pool_falls_back_to_the_stack_once_when_the_kernel_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    """With the RoI Align kernel asked for but unable to run (here: CPU tensors outside Triton's
    interpreter), roi_pool says so once and pools with torchvision's roi_align, same answer."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(4)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    size = (256, 320)
    feats = {str(i): torch.randn(1, 4, size[0] >> (i + 2), size[1] >> (i + 2), generator=g) for i in range(4)}
    xy = torch.rand(1, 20, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + 8 + torch.rand(1, 20, 2, generator=g) * 150], -1)
    expected = FixedShapeHeads(torch.nn.Module()).roi_pool(pooler, feats, boxes, size)
    heads = FixedShapeHeads(torch.nn.Module(), roi_kernel=True)
    assert heads.roi_kernel
    with caplog.at_level("WARNING"):
        for _ in range(2):
            torch.testing.assert_close(heads.roi_pool(pooler, feats, boxes, size), expected, rtol=0, atol=0)
    assert not heads.roi_kernel
    assert sum("RoI Align kernel cannot run" in r.message for r in caplog.records) == 1


# -- detectron2's rules (the model's semantics) ------------------------------------------------------

def test_fpn_levels_by_each_librarys_formula_at_the_boundaries() -> None:
    """Boxes whose sqrt(area) is a level's boundary, or a few millionths under it: torchvision's 1e-6
    after the log lifts those to the level above, detectron2's 1e-8 inside it does not (in float32,
    4 + log2 rounds to 4 within ~1.2e-7 of it, so the gap is sides 0.08 to 0.7 millionths short)."""
    from dd.worker.engines.fast.fixed_shapes import assign_levels
    from tests import d2_reference

    sides = torch.tensor([224.0, 112.0, 448.0, 223.99993, 111.999965, 447.99986, 223.99999, 56.0, 1e-3, 0.0,
                          5000.0, 300.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1) + 10.5
    tv = (assign_levels(boxes, 2, 5, "torchvision") + 2).tolist()
    d2 = (assign_levels(boxes, 2, 5, "detectron2") + 2).tolist()
    assert tv == [4, 3, 5, 4, 3, 5, 4, 2, 2, 2, 5, 4]
    assert d2 == [4, 3, 5, 3, 2, 4, 4, 2, 2, 2, 5, 4]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 500
    rand = torch.cat([xy, xy + 2 ** (torch.rand(500, 2, generator=g) * 10)], 1)
    assert torch.equal(assign_levels(rand, 2, 5, "detectron2"), d2_reference.levels(rand, 2, 5))
    with pytest.raises(ValueError, match="detectron2"):
        assign_levels(boxes, 2, 5, "caffe2")


def _d2_heads(**kwargs: object) -> tuple[torch.nn.Module, FixedShapeHeads]:
    from dd.models.maskrcnn import build_maskrcnn
    from dd.models.model_folder import SMALL_ARCHITECTURE
    from dd.models.semantics import DETECTRON2

    torch.manual_seed(0)
    model = build_maskrcnn(dict(SMALL_ARCHITECTURE, backbone="resnet18"), num_classes=3, channels=3, min_size=128,
                           max_size=160, image_mean=[0.5] * 3, image_std=[0.25] * 3).eval()
    model.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)
    model.roi_heads.mask_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 0)
    model.rpn.min_size = 0.0  # detectron2's PROPOSAL_GENERATOR.MIN_SIZE, as its network carries it
    return model, FixedShapeHeads(model, semantics=DETECTRON2, **kwargs)


def test_roi_pool_is_detectron2s_roi_pooler() -> None:
    """ROIAlignV2 (aligned, adaptive grid) from the level detectron2's formula picks, on the fixed path
    (level stack) and the dynamic one (pool_lists), against detectron2's pooler written plainly."""
    from tests import d2_reference

    model, heads = _d2_heads()
    g = torch.Generator().manual_seed(5)
    size = (512, 640)
    feats = {str(i): torch.randn(2, 8, size[0] >> (i + 2), size[1] >> (i + 2), generator=g) for i in range(4)}
    xy = torch.rand(2, 60, 2, generator=g) * 300
    wh = 16 * 2 ** (torch.rand(2, 60, 1, generator=g) * 6) * (0.7 + 0.6 * torch.rand(2, 60, 2, generator=g))
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, size[1])
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, size[0])
    boxes[0, 0] = torch.tensor([10.0, 20.0, 10.0 + 223.99993, 20.0 + 223.99993])  # levels differ here
    names = ["0", "1", "2", "3"]
    for pooler, out in ((model.roi_heads.box_roi_pool, 7), (model.roi_heads.mask_roi_pool, 14)):
        expected = torch.cat([d2_reference.pool([feats[k][i:i + 1] for k in names], boxes[i], out, size)
                              for i in range(2)])
        torch.testing.assert_close(heads.roi_pool(pooler, feats, boxes, size), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(heads.pool_lists(pooler, feats, list(boxes.unbind(0)), size), expected,
                                   rtol=0, atol=1e-6)
    # the rules matter: torchvision's pooling of the same boxes differs
    tv = FixedShapeHeads(model).roi_pool(MultiScaleRoIAlign(names, 7, 2), feats, boxes, size)
    assert (tv - heads.roi_pool(model.roi_heads.box_roi_pool, feats, boxes, size)).abs().max() > 1e-2


def _rpn_case() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Two levels of anchors (zero deltas: the proposals are the anchors) with logits large enough that
    their sigmoids tie at 1.0, a few boxes narrower than 1e-3 and a few empty ones."""
    g = torch.Generator().manual_seed(3)
    per_level, anchors, objectness, deltas = [60, 40], [], [], []
    for n in per_level:
        xy = torch.rand(n, 2, generator=g) * 150
        wh = 4 + torch.rand(n, 2, generator=g) * 60
        a = torch.cat([xy, xy + wh], 1)
        a[:6, 2] = a[:6, 0] + 5e-4  # narrower than torchvision's 1e-3: detectron2 keeps them
        a[6:9, 2] = a[6:9, 0]  # empty: both drop them
        anchors.append(a)
        objectness.append((17 + torch.rand(1, 1, 1, n, generator=g) * 20))  # sigmoid is 1.0 for most
        deltas.append(torch.zeros(1, 4, 1, n))
    return objectness, deltas, [torch.cat(anchors)]


def test_rpn_proposals_by_detectron2s_rules() -> None:
    """Ranked by logit (sigmoids tie), no score threshold, only empty boxes dropped: the fixed path and
    the dynamic one give detectron2's proposals (find_top_rpn_proposals written plainly)."""
    import types

    from dd.worker.engines.fast.engine import FastMaskRCNN
    from tests import d2_reference

    model, heads = _d2_heads()
    rpn = model.rpn
    rpn._pre_nms_top_n = dict(training=50, testing=50)
    rpn._post_nms_top_n = dict(training=30, testing=30)
    objectness, deltas, anchors = _rpn_case()
    size = (160, 200)
    expected = d2_reference.proposals(model, objectness, deltas, anchors[0], size)
    assert len(expected) == 30 and ((expected[:, 2] - expected[:, 0]) < 1e-3).any()
    props, valid, settled = heads.proposals(objectness, deltas, anchors, 1, *size)
    assert settled.all()
    assert torch.equal(props[0][valid[0]], expected)
    engine = types.SimpleNamespace(model=model, semantics=heads.semantics)
    (dynamic,) = FastMaskRCNN._proposals(engine, objectness, deltas, anchors, 1, *size)
    assert torch.equal(dynamic, expected)
    # torchvision's rules (sigmoid ranking, >= its RPN's 1e-3) choose other proposals from the same candidates
    rpn.min_size = 1e-3
    tv, tv_valid, _ = FixedShapeHeads(model).proposals(objectness, deltas, anchors, 1, *size)
    assert not torch.equal(tv[0][tv_valid[0]], expected)
    assert not ((tv[0][tv_valid[0]][:, 2] - tv[0][tv_valid[0]][:, 0]) < 1e-3).any()


def test_detections_keep_small_boxes_under_detectron2s_rules() -> None:
    """torchvision drops detections with a side under 1e-2 before the class-wise NMS; detectron2 keeps
    them (and drops only empty ones, after scaling to the input image, in the engine)."""
    model, heads = _d2_heads()
    g = torch.Generator().manual_seed(1)
    size = (128, 160)
    feats = {str(i): torch.randn(1, 64, size[0] >> (i + 2), size[1] >> (i + 2), generator=g) for i in range(4)}
    xy = torch.rand(1, 40, 2, generator=g) * 100
    props = torch.cat([xy, xy + 0.005], -1)  # 5e-3 wide: every decoded box is narrower than 1e-2
    with torch.no_grad():
        model.roi_heads.box_predictor.bbox_pred.weight.zero_()
        model.roi_heads.box_predictor.bbox_pred.bias.zero_()
    valid = torch.ones(1, 40, dtype=torch.bool)
    threshold = torch.tensor(0.0)
    d2 = heads.detections(feats, props, valid, *size, threshold, autocast=False)
    tv = FixedShapeHeads(model).detections(feats, props, valid, *size, threshold, autocast=False)
    assert d2["valid"].sum() > 0 and tv["valid"].sum() == 0
