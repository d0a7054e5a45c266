"""dd.worker.pipeline: the engine half of the next batch overlaps the encoding of this one.

No test here depends on timing: overlap is shown with events (an encoding that cannot finish until
the next batch's engine call has started), and every wait has a generous bound that only a broken
pipeline reaches.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dd.worker.core import InferredBatch, Outcome, WorkerCore, WorkItem
from dd.worker.pipeline import BatchPipeline
from tests.unit.worker.test_core import _core, _image

BOUND_S = 60.0  # only a pipeline that does not overlap (or lost a batch) waits this long


def _items(*values: int) -> list[WorkItem]:
    return [WorkItem(_image(v), None, request_id=f"r{v}") for v in values]


def test_outcomes_are_the_cores_in_submission_order(tmp_path: Path) -> None:
    core = _core(tmp_path)
    batches = [_items(1, 2, 3), _items(4), _items(5, 6)]
    expected = [[o.body for o in core.run(b)] for b in _copy(batches)]
    got: list[tuple[str, list[bytes]]] = []
    with BatchPipeline(core, lambda outs, tag: got.append((tag, [o.body for o in outs]))) as pipe:
        for k, batch in enumerate(batches):
            pipe.submit(batch, f"batch{k}")
    assert [tag for tag, _ in got] == ["batch0", "batch1", "batch2"]
    # The null engine's answers depend on the pixels only; timings differ, so compare instances.
    assert [_instances(bodies) for _, bodies in got] == [_instances(b) for b in expected]


def test_the_next_batch_enters_the_engine_while_this_one_is_encoded(tmp_path: Path) -> None:
    core = _core(tmp_path)
    second_in_engine = threading.Event()
    encoded_first_after_it = threading.Event()
    real_infer, real_encode = core.infer_batch, core.encode_batch

    def infer_batch(items: list[WorkItem], started: float | None = None) -> InferredBatch:
        if items[0].request_id == "r2":
            second_in_engine.set()
        return real_infer(items, started)

    def encode_batch(batch: InferredBatch) -> list[Outcome]:
        if batch.items[0].request_id == "r1":
            # Serial code would deadlock here: the second batch's engine call comes only after this returns.
            if second_in_engine.wait(BOUND_S):
                encoded_first_after_it.set()
        return real_encode(batch)

    core.infer_batch, core.encode_batch = infer_batch, encode_batch  # type: ignore[method-assign]
    done: list[str] = []
    with BatchPipeline(core, lambda outs, tag: done.append(tag)) as pipe:
        pipe.submit(_items(1), "first")
        pipe.submit(_items(2), "second")
    assert encoded_first_after_it.is_set()
    assert done == ["first", "second"]


def test_a_slow_encoder_holds_the_engine_back(tmp_path: Path) -> None:
    """depth 1: one batch encoding, one waiting; the third submit waits for the encoder (backpressure)."""
    core = _core(tmp_path)
    release = threading.Event()
    real_encode = core.encode_batch

    def encode_batch(batch: InferredBatch) -> list[Outcome]:
        release.wait(BOUND_S)
        return real_encode(batch)

    core.encode_batch = encode_batch  # type: ignore[method-assign]
    pipe: BatchPipeline[int] = BatchPipeline(core, lambda outs, tag: None, depth=1)
    pipe.submit(_items(1), 1)
    pipe.submit(_items(2), 2)  # the encoder may or may not have taken batch 1 yet: queue holds <= 1
    third_submitted = threading.Event()

    def submit_third() -> None:
        pipe.submit(_items(3), 3)
        pipe.submit(_items(4), 4)
        third_submitted.set()

    t = threading.Thread(target=submit_third, daemon=True)
    t.start()
    # Batches 1 and 2 fill the encoder and the queue; 3 and 4 cannot both be queued while the encoder waits.
    assert not third_submitted.wait(0.5)
    release.set()
    assert third_submitted.wait(BOUND_S)
    pipe.close()


def test_an_error_answering_a_batch_fails_that_batch_and_the_pipeline_goes_on(tmp_path: Path) -> None:
    core = _core(tmp_path)
    failed: list[tuple[str, str]] = []
    done: list[str] = []

    def on_done(outs: list[Outcome], tag: str) -> None:
        if tag == "bad":
            raise OSError("socket gone")
        done.append(tag)

    with BatchPipeline(core, on_done, lambda tag, exc: failed.append((tag, str(exc)))) as pipe:
        pipe.submit(_items(1), "bad")
        pipe.submit(_items(2), "good")
        pipe.drain()
        assert pipe.alive
    assert failed == [("bad", "socket gone")]
    assert done == ["good"]


def test_an_engine_error_is_raised_to_the_submitter(tmp_path: Path) -> None:
    core = _core(tmp_path)

    def infer_batch(items: list[WorkItem], started: float | None = None) -> InferredBatch:
        raise RuntimeError("device lost")

    core.infer_batch = infer_batch  # type: ignore[method-assign]
    with BatchPipeline(core, lambda outs, tag: None) as pipe:
        with pytest.raises(RuntimeError, match="device lost"):
            pipe.submit(_items(1), "x")
        assert pipe.alive


def test_close_answers_what_was_submitted(tmp_path: Path) -> None:
    core = _core(tmp_path)
    done: list[int] = []
    pipe: BatchPipeline[int] = BatchPipeline(core, lambda outs, tag: done.append(tag))
    for k in range(5):
        pipe.submit(_items(k + 1), k)
    pipe.close()
    assert done == [0, 1, 2, 3, 4]
    assert not pipe.alive


def _copy(batches: list[list[WorkItem]]) -> list[list[WorkItem]]:
    return [[WorkItem(np.array(i.color), i.depth, request_id=i.request_id) for i in b] for b in batches]


def _instances(bodies: list[bytes]) -> list[list[tuple]]:
    from dd.proto.deep_detection.v1 import detector_pb2 as pb

    out = []
    for body in bodies:
        resp = pb.DetectResponse.FromString(body)
        out.append([(i.class_id, round(i.score, 6), i.box.x1, i.box.y1, i.mask.counts) for i in resp.instances])
    return out


def test_core_run_is_the_two_halves(tmp_path: Path) -> None:
    """The in-process path (benchmarks, tests) and the served path answer alike."""
    core: WorkerCore = _core(tmp_path)
    items = _items(7, 8)
    a = core.run(_copy([items])[0])
    b = core.encode_batch(core.infer_batch(items))
    assert [o.code for o in a] == [o.code for o in b] == ["OK", "OK"]
    assert _instances([o.body for o in a]) == _instances([o.body for o in b])
