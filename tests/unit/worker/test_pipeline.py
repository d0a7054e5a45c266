"""dd.worker.pipeline: a batch is finished and encoded after the next batch has started on the engine.

Order, not time: each test records the calls as they happen and checks their sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.worker.core import InferredBatch, Outcome, StartedBatch, WorkerCore, WorkItem
from dd.worker.engines.base import InputError
from dd.worker.pipeline import BatchPipeline
from tests.unit.worker.test_core import _core, _image


def _items(*values: int) -> list[WorkItem]:
    return [WorkItem(_image(v), None, request_id=f"r{v}") for v in values]


def _instances(bodies: list[bytes]) -> list[list[tuple]]:
    out = []
    for body in bodies:
        resp = pb.DetectResponse.FromString(body)
        out.append([(i.class_id, round(i.score, 6), i.box.x1, i.box.y1, i.mask.counts) for i in resp.instances])
    return out


def _traced(core: WorkerCore, events: list[str]) -> WorkerCore:
    """Records start/finish/encode of each batch, named by its first request id."""
    start, finish, encode = core.start_batch, core.finish_batch, core.encode_batch

    def start_batch(items: list[WorkItem], started: float | None = None) -> StartedBatch:
        events.append(f"start {items[0].request_id}")
        return start(items, started)

    def finish_batch(batch: StartedBatch) -> InferredBatch:
        events.append(f"finish {batch.items[0].request_id}")
        return finish(batch)

    def encode_batch(batch: InferredBatch) -> list[Outcome]:
        events.append(f"encode {batch.items[0].request_id}")
        return encode(batch)

    core.start_batch, core.finish_batch, core.encode_batch = start_batch, finish_batch, encode_batch  # type: ignore[method-assign]
    return core


def test_outcomes_are_the_cores_in_push_order(tmp_path: Path) -> None:
    core = _core(tmp_path)
    values = [(1, 2, 3), (4,), (5, 6)]
    expected = [_instances([o.body for o in core.run(_items(*v))]) for v in values]
    got: list[tuple[str, list[bytes]]] = []
    pipe = BatchPipeline(core, lambda outs, tag: got.append((tag, [o.body for o in outs])))
    for k, v in enumerate(values):
        pipe.push(_items(*v), f"batch{k}")
    pipe.flush()
    assert [tag for tag, _ in got] == ["batch0", "batch1", "batch2"]
    assert [_instances(bodies) for _, bodies in got] == expected
    assert not pipe.busy


def test_a_batch_is_encoded_while_the_next_is_on_the_engine(tmp_path: Path) -> None:
    events: list[str] = []
    core = _traced(_core(tmp_path), events)
    done: list[str] = []
    pipe = BatchPipeline(core, lambda outs, tag: done.append(tag), between=lambda: events.append("between"))
    pipe.push(_items(1), "a")
    assert pipe.busy and done == []  # started, not answered: it waits for the next batch or a flush
    pipe.push(_items(2), "b")
    assert done == ["a"]
    pipe.flush()
    assert done == ["a", "b"]
    assert events == ["start r1",
                      "start r2", "finish r1", "between", "encode r1",  # r1 finished and encoded after r2 started
                      "finish r2", "between", "encode r2"]


def test_flush_with_nothing_in_flight_does_nothing(tmp_path: Path) -> None:
    events: list[str] = []
    pipe = BatchPipeline(_traced(_core(tmp_path), events), lambda outs, tag: None)
    pipe.flush()
    assert events == [] and not pipe.busy


def test_an_error_answering_a_batch_fails_that_batch_and_the_pipeline_goes_on(tmp_path: Path) -> None:
    failed: list[tuple[str, str]] = []
    done: list[str] = []

    def on_done(outs: list[Outcome], tag: str) -> None:
        if tag == "bad":
            raise OSError("socket gone")
        done.append(tag)

    pipe = BatchPipeline(_core(tmp_path), on_done, lambda tag, exc: failed.append((tag, str(exc))))
    pipe.push(_items(1), "bad")
    pipe.push(_items(2), "good")
    pipe.flush()
    assert failed == [("bad", "socket gone")]
    assert done == ["good"]


@pytest.mark.parametrize("error, code", [(InputError("not an image"), "INVALID_ARGUMENT"),
                                         (RuntimeError("device lost"), "INTERNAL")])
def test_an_engine_that_fails_to_start_answers_as_infer_does(tmp_path: Path, error: Exception, code: str) -> None:
    core = _core(tmp_path)

    def start(batch: list, want_masks: bool = True) -> None:
        raise error

    core.engine.start = start  # type: ignore[method-assign]
    got: list[list[str]] = []
    pipe = BatchPipeline(core, lambda outs, tag: got.append([o.code for o in outs]))
    pipe.push(_items(1), "x")
    pipe.flush()
    assert got == [[code]]


def test_a_batch_the_engine_fails_is_retried_image_by_image(tmp_path: Path) -> None:
    """The first try is the started one; the retries call infer per image (the core's rule)."""
    core = _core(tmp_path)
    real_infer = core.engine.infer

    def finish_fails(batch: list, want_masks: bool = True):  # type: ignore[no-untyped-def]
        def finish() -> list:
            raise RuntimeError("batch failed")
        return finish

    def infer(batch: list, want_masks: bool = True) -> list:
        if batch[0].color[0, 0, 0] == 2:
            raise InputError("image 2 is bad")
        return real_infer(batch, want_masks)

    core.engine.start = finish_fails  # type: ignore[method-assign]
    core.engine.infer = infer  # type: ignore[method-assign]
    got: list[list[str]] = []
    pipe = BatchPipeline(core, lambda outs, tag: got.append([o.code for o in outs]))
    pipe.push(_items(1, 2, 3), "x")
    pipe.flush()
    assert got == [["OK", "INVALID_ARGUMENT", "OK"]]


def test_core_run_is_the_two_halves(tmp_path: Path) -> None:
    """The in-process path (benchmarks, tests) and the served path answer alike."""
    core: WorkerCore = _core(tmp_path)
    a = core.run(_items(7, 8))
    b = core.encode_batch(core.finish_batch(core.start_batch(_items(7, 8))))
    assert [o.code for o in a] == [o.code for o in b] == ["OK", "OK"]
    assert _instances([o.body for o in a]) == _instances([o.body for o in b])


def test_the_default_engine_start_defers_the_whole_call(tmp_path: Path) -> None:
    """An engine without asynchronous work runs nothing in start: finish runs infer."""
    core = _core(tmp_path)
    calls: list[str] = []
    real_infer = core.engine.infer

    def infer(batch: list, want_masks: bool = True) -> list:
        calls.append("infer")
        return real_infer(batch, want_masks)

    core.engine.infer = infer  # type: ignore[method-assign]
    finish = core.engine.start([core._inputs(_items(1))[0]])
    assert calls == []
    assert len(finish()) == 1 and calls == ["infer"]
