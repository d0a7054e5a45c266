"""Frontends at a higher nice value (ServerConfig.frontend_nice): every thread of every frontend has it,
threads started while serving included, and the workers and the supervisor keep their own."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from tests.faults import Server, answer_problem, detect, null_case, null_model, wait_for


def thread_nices(proc: psutil.Process) -> dict[int, int]:
    return {t.id: os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()}


def test_frontends_run_at_their_nice_value_and_workers_at_the_servers(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    nice = min(19, own + 7)
    with Server(null_model(tmp_path / "m"), frontends=2, args=["--frontend-nice", str(nice)]).start() as srv:
        srv.wait_serving()
        for i in range(4):  # so that each frontend has started its decode threads
            case = null_case(i)
            assert answer_problem(case, detect(srv.target, case.request)) is None
        frontends = wait_for(lambda: len(srv.processes("frontend")) == 2 and srv.processes("frontend"), 60,
                             "both frontends in the process table")
        for fe in frontends:
            nices = thread_nices(fe)
            assert len(nices) > 1 and set(nices.values()) == {nice}, (fe.pid, nices)
        for proc in srv.processes("worker") + [psutil.Process(srv.proc.pid)]:
            assert set(thread_nices(proc).values()) == {own}, proc.pid


def test_a_nice_value_out_of_range_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from dd.config import ConfigError, ServerConfig

    for bad in (-1, 20):
        try:
            ServerConfig(frontend_nice=bad).validate()
        except ConfigError as exc:
            assert "frontend_nice must be in [0, 19]" in str(exc)
        else:
            raise AssertionError(f"frontend_nice={bad} was accepted")
