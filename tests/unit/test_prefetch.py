"""dd.procutil.prefetch_files: the supervisor asks the kernel to read the models' weights ahead while
the zygote imports (issue #18, start-up); it reads nothing itself and never fails a start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dd.procutil import prefetch_files


def test_each_file_is_asked_for_once_whole_and_missing_ones_are_left_to_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"\0" * 8192)
    other = tmp_path / "other.pth"
    other.write_bytes(b"x")
    calls = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    asked = prefetch_files([weights, tmp_path / "missing.pth", other, weights])
    assert asked == [weights, other]
    assert calls == [(str(weights), 0, 0, os.POSIX_FADV_WILLNEED), (str(other), 0, 0, os.POSIX_FADV_WILLNEED)]


def test_no_file_descriptor_is_left_open(tmp_path: Path) -> None:
    files = []
    for i in range(5):
        files.append(tmp_path / f"w{i}.pth")
        files[-1].write_bytes(b"w")
    before = set(os.listdir("/proc/self/fd"))
    assert prefetch_files(files) == files
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_file_system_that_refuses_the_advice_does_not_stop_a_start(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w.pth").write_bytes(b"w")

    def refuse(*_: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    assert prefetch_files([tmp_path / "w.pth"]) == []
