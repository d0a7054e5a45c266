"""Replies sent by the worker's inference thread straight to the frontend's reply socket (Ping.reply_to),
on a real server: once a worker's route to a frontend is up, every answer takes it, and answers are right;
a frontend's reply socket goes with it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dd.ipc import endpoints
from tests.faults import Server, null_model
from tests.integration.test_flow_control import _detect_null, _start_and_wait_ready


def test_once_a_route_is_up_every_reply_takes_it(tmp_path: Path) -> None:
    """Through the test's own Dispatcher (the frontend's, in this process) against a running server's worker.
    The first replies may come through the worker's I/O thread while its inference thread connects; from the
    first that comes on the reply socket on, all do (nothing else refuses a reply on a quiet connection)."""
    from dd.frontend.dispatcher import Dispatcher
    from dd.ipc.shm_ring import ShmRing, segment_name

    null_model(tmp_path / "null", kind="rgb")
    with Server(tmp_path / "null") as srv:
        srv.start().wait_serving(120)

        async def scenario() -> tuple[int, list[str | None], bool, Path]:
            dispatcher = Dispatcher(srv.run_dir, lambda model: 4, on_change=lambda: None)
            ring = ShmRing.create(segment_name(srv.tag, "test"), 2, 1 << 16)
            try:
                await _start_and_wait_ready(dispatcher)
                had_socket = dispatcher.reply_path.exists()
                problems, end = [], time.monotonic() + 60
                while dispatcher.direct_replies == 0:
                    assert time.monotonic() < end, "no reply came on the reply socket in 60 s"
                    problems.append(await _detect_null(dispatcher, ring, len(problems)))
                before = dispatcher.direct_replies
                problems += [await _detect_null(dispatcher, ring, i) for i in range(20)]
                return dispatcher.direct_replies - before, problems, had_socket, dispatcher.reply_path
            finally:
                await dispatcher.close()
                ring.close()
                ring.unlink()

        direct, problems, had_socket, path = asyncio.run(scenario())
        assert had_socket
        assert not path.exists(), "the frontend left its reply socket behind"
    assert not any(problems), next(p for p in problems if p)
    assert direct == 20, f"{20 - direct} of 20 replies went through the worker's I/O thread with the route up"


def test_reply_sockets_of_dead_frontends_are_removed_those_of_live_ones_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = endpoints.frontend_reply_socket(run_dir, b"fe-999999999")  # no such process
    mine = endpoints.frontend_reply_socket(run_dir, b"fe-1")  # pid 1 is alive
    for p in (dead, mine):
        p.touch()
    endpoints.remove_reply_sockets(run_dir, only_dead=True)
    assert not dead.exists() and mine.exists()
    endpoints.remove_reply_sockets(run_dir, only_dead=False)
    assert not mine.exists()
    assert endpoints.list_worker_sockets(run_dir) == []


def test_a_run_dir_too_long_for_the_reply_socket_keeps_the_old_way(tmp_path: Path) -> None:
    """Worker sockets have short names; a run directory that fits them but not the frontend's reply socket
    must not stop the frontend: its pings name no reply socket, and the workers answer through theirs."""
    from dd.frontend.dispatcher import Dispatcher
    from dd.ipc import messages

    run_dir = tmp_path / ("r" * max(1, 91 - len(str(tmp_path))))  # 92 bytes: the worker socket fits, not this
    run_dir.mkdir()
    assert endpoints.worker_socket(run_dir, "m", 0)  # fits

    async def scenario() -> str:
        dispatcher = Dispatcher(run_dir, lambda model: 1)
        assert dispatcher.reply_path is None
        await dispatcher.start()
        try:
            return messages.Ping.FromString(dispatcher._ping(time.time())).reply_to
        finally:
            await dispatcher.close()

    assert asyncio.run(scenario()) == ""
    assert list(run_dir.iterdir()) == []


def test_a_worker_whose_inference_thread_died_after_direct_replies_exits_and_comes_back(tmp_path: Path) -> None:
    """The inference thread owns its reply sockets to the frontends. Should it die (here: its engine fails
    to prepare a new frontend's ring, outside any batch), the worker must still exit for a restart: sockets
    left open would keep ZeroMQ's context from terminating, and the process would hang, alive and deaf."""
    import json

    import numpy as np
    import psutil

    from dd.frontend.dispatcher import Dispatcher
    from dd.ipc.shm_ring import ShmRing, segment_name
    from dd.proto.deep_detection.v1 import detector_pb2 as pb
    from tests.faults import detect, wait_for

    folder = tmp_path / "dying"
    folder.mkdir()
    (folder / "categories.txt").write_text("a\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBPrepareFailsAfterServing", "ENGINE": "tests.dying_engine:PrepareFailsAfterServing",
        "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.0, "DEVICES": "cpu"}))
    img = np.zeros((48, 64, 3), np.uint8)
    request = pb.DetectRequest(model="dying", color=pb.Image(encoding=pb.Image.RAW, shape=[48, 64, 3],
                                                             dtype=pb.UINT8, data=img.tobytes()))
    with Server(folder) as srv:
        srv.start().wait_serving(120)
        worker = wait_for(lambda: srv.worker("dying", 0), 60, "the worker")
        detect(srv.target, request)  # answered: the worker's inference thread holds its route to the frontend

        async def new_ring() -> None:  # a new frontend's ring for the worker to prepare: its engine fails
            ring = ShmRing.create(segment_name(srv.tag, "test"), 1, 1 << 16)
            dispatcher = Dispatcher(srv.run_dir, lambda model: 1, ring=ring.name)  # named in its pings
            try:
                await dispatcher.start()
                await asyncio.to_thread(psutil.wait_procs, [worker], 60)
            finally:
                await dispatcher.close()
                ring.close()
                ring.unlink()

        asyncio.run(new_ring())
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, (
            f"the worker whose inference thread died is still running after 60 s\n{srv.log()}")
        assert "the inference thread died; exiting for a restart" in srv.log()
        wait_for(lambda: (w := srv.worker("dying", 0)) is not None and w.pid != worker.pid, 60, "the restart")
        srv.wait_serving(120)
        assert detect(srv.target, request).model == "dying"
