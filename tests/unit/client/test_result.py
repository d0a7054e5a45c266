"""Result.from_proto: a DetectResponse as the client library's typed result."""

from __future__ import annotations

from dd.client.api import Result
from dd.proto.deep_detection.v1 import detector_pb2 as pb


def test_instances_boxes_scores_and_rle_masks() -> None:
    resp = pb.DetectResponse(request_id="r1", model="m", height=4, width=6, worker="m.0")
    a = resp.instances.add(class_id=2, class_name="carton", score=0.75)
    a.box.x1, a.box.y1, a.box.x2, a.box.y2 = 1.0, 2.0, 3.0, 4.0
    a.mask.format, a.mask.height, a.mask.width, a.mask.counts = pb.RLE, 4, 6, b"24"
    b = resp.instances.add(class_id=1, class_name="bag", score=0.5)  # no mask asked for
    b.mask.format = pb.NONE
    c = resp.instances.add(class_id=1, class_name="bag", score=0.25)  # RLE named, but no counts
    c.mask.format = pb.RLE
    resp.timing.total_us, resp.timing.batch_size = 1234, 2
    r = Result.from_proto(pb.DetectResponse.FromString(resp.SerializeToString()))
    assert (r.request_id, r.model, r.height, r.width, r.worker) == ("r1", "m", 4, 6, "m.0")
    assert [(i.class_id, i.class_name, i.score) for i in r.instances] == [(2, "carton", 0.75), (1, "bag", 0.5),
                                                                          (1, "bag", 0.25)]
    assert r.instances[0].box == (1.0, 2.0, 3.0, 4.0)
    assert r.instances[0].rle == {"size": [4, 6], "counts": b"24"}
    assert r.instances[1].rle is None and r.instances[2].rle is None
    assert r.timing["total_us"] == 1234 and r.timing["batch_size"] == 2
