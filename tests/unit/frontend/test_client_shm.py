"""The client shared-memory registry: checks at register, bounded access, visibility across registry
instances (frontend processes) sharing one run directory, unregister and cleanup."""

from __future__ import annotations

import os
import stat
from multiprocessing import shared_memory
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from dd.frontend import client_shm
from dd.ipc import client_segments
from dd.frontend.client_shm import ClientShmRegistry, remove_registrations
from dd.frontend.errors import ServeError, Status


@pytest.fixture()
def segment() -> Iterator[shared_memory.SharedMemory]:
    shm = shared_memory.SharedMemory(create=True, size=4096)
    shm.buf[:4096] = bytes(range(256)) * 16
    yield shm
    shm.close()
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def _key(shm: shared_memory.SharedMemory) -> str:
    return "/" + shm.name  # as tritonclient and shm_open spell keys


def _fails(status: Status, fn, *args) -> str:
    with pytest.raises(ServeError) as err:
        fn(*args)
    assert err.value.status == status, err.value.message
    return err.value.message


def test_register_view_and_status(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 100, 1000)
    view = reg.view("in", 10, 20)
    assert bytes(view) == bytes(segment.buf[110:130])
    (region,) = reg.status("in")
    assert (region.name, region.key, region.offset, region.byte_size) == ("in", _key(segment), 100, 1000)
    assert [r.name for r in reg.status("")] == ["in"]
    # The view is the client's memory, not a copy.
    segment.buf[110] = 255 - segment.buf[110]
    assert view[0] == segment.buf[110]
    assert stat.S_IMODE(os.stat(run_dir / client_shm.SUBDIR).st_mode) == 0o700
    view.release()
    reg.close()


def test_key_without_leading_slash_is_the_same_segment(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", segment.name, 0, 16)
    assert bytes(reg.view("in", 0, 16)) == bytes(segment.buf[:16])


@pytest.mark.parametrize("offset,size", [(0, 1001), (1, 1000), (999, 2), (-1, 1), (0, -1), (2000, 0)])
def test_access_never_reaches_outside_the_registered_range(segment, run_dir, offset, size) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 100, 1000)
    message = _fails(Status.INVALID_ARGUMENT, reg.view, "in", offset, size)
    assert "'in' holds 1000 bytes" in message


def test_whole_region_is_accessible(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 96, 4000)
    assert bytes(reg.view("in", 0, 4000)) == bytes(segment.buf[96:4096])


def test_register_refuses_a_region_larger_than_the_segment(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    message = _fails(Status.INVALID_ARGUMENT, reg.register, "in", _key(segment), 100, 4000)
    assert "holds 4096 bytes" in message and "needs 4100" in message
    assert reg.status("") == []


def test_register_refuses_a_missing_key(run_dir) -> None:
    message = _fails(Status.INVALID_ARGUMENT, ClientShmRegistry(run_dir).register, "in", "/dd-test-no-such-key", 0, 8)
    assert "does not exist" in message and "create it first" in message


@pytest.mark.parametrize("key", ["", "/", "../etc/passwd", "/a/b", "/..", "x\0y", "/" + "k" * 300])
def test_register_refuses_keys_that_are_not_one_name(run_dir, key) -> None:
    message = _fails(Status.INVALID_ARGUMENT, ClientShmRegistry(run_dir).register, "in", key, 0, 8)
    assert "not a POSIX shared-memory name" in message


def test_register_refuses_a_symlink(segment, run_dir) -> None:
    link = client_segments.SHM_DIR / f"dd-test-link-{os.getpid()}"
    link.symlink_to(client_segments.SHM_DIR / segment.name)
    try:
        _fails(Status.PERMISSION_DENIED, ClientShmRegistry(run_dir).register, "in", "/" + link.name, 0, 8)
    finally:
        link.unlink()


def test_register_refuses_a_segment_of_another_user(segment, run_dir) -> None:
    # The registry of a server run by another uid sees this test's segment as another user's.
    other = ClientShmRegistry(run_dir, uid=os.geteuid() + 1)
    message = _fails(Status.PERMISSION_DENIED, other.register, "in", _key(segment), 0, 8)
    assert f"belongs to uid {os.geteuid()}" in message
    assert other.status("") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_register_refuses_a_segment_chowned_to_another_user(segment, run_dir) -> None:
    os.chown(client_segments.SHM_DIR / segment.name, 12345, 12345)
    message = _fails(Status.PERMISSION_DENIED, ClientShmRegistry(run_dir).register, "in", _key(segment), 0, 8)
    assert "belongs to uid 12345" in message


def test_a_segment_given_to_another_user_after_register_is_not_read(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 0, 64)
    other = ClientShmRegistry(run_dir, uid=os.geteuid() + 1)  # a process mapping it later checks again
    _fails(Status.PERMISSION_DENIED, other.view, "in", 0, 8)


def test_a_name_registered_twice_is_refused(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 0, 64)
    _fails(Status.ALREADY_EXISTS, reg.register, "in", _key(segment), 64, 64)
    _fails(Status.ALREADY_EXISTS, ClientShmRegistry(run_dir).register, "in", _key(segment), 64, 64)


def test_bad_names_and_ranges_are_refused(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    _fails(Status.INVALID_ARGUMENT, reg.register, "", _key(segment), 0, 8)
    _fails(Status.INVALID_ARGUMENT, reg.register, "n" * 300, _key(segment), 0, 8)
    _fails(Status.INVALID_ARGUMENT, reg.register, "in", _key(segment), -1, 8)
    _fails(Status.INVALID_ARGUMENT, reg.register, "in", _key(segment), 0, 0)


def test_registrations_are_bounded(segment, run_dir, monkeypatch) -> None:
    monkeypatch.setattr(client_shm, "MAX_REGIONS", 3)
    reg = ClientShmRegistry(run_dir)
    for i in range(3):
        reg.register(f"r{i}", _key(segment), 0, 8)
    _fails(Status.RESOURCE_EXHAUSTED, reg.register, "r3", _key(segment), 0, 8)
    reg.unregister("r0")
    reg.register("r3", _key(segment), 0, 8)


def test_registrations_are_seen_by_every_frontend(segment, run_dir) -> None:
    a, b = ClientShmRegistry(run_dir), ClientShmRegistry(run_dir)  # two frontend processes, one run dir
    a.register("in", _key(segment), 8, 64)
    assert [r.name for r in b.status("")] == ["in"]
    assert bytes(b.view("in", 0, 8)) == bytes(segment.buf[8:16])
    b.unregister("in")  # Unregister lands on the other frontend
    _fails(Status.INVALID_ARGUMENT, a.view, "in", 0, 8)
    _fails(Status.NOT_FOUND, a.status, "in")


def test_a_name_registered_again_elsewhere_is_mapped_afresh(segment, run_dir) -> None:
    other = shared_memory.SharedMemory(create=True, size=64)
    try:
        other.buf[:8] = b"ABCDEFGH"
        a, b = ClientShmRegistry(run_dir), ClientShmRegistry(run_dir)
        a.register("in", _key(segment), 0, 64)
        assert bytes(b.view("in", 0, 8)) == bytes(segment.buf[:8])  # b caches its mapping
        a.unregister("in")
        a.register("in", "/" + other.name, 0, 64)
        assert bytes(b.view("in", 0, 8)) == b"ABCDEFGH"
        a.close()
        b.close()
    finally:
        other.close()
        other.unlink()


def test_unregister_all_and_unknown(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.unregister("never-registered")  # as Triton: not an error
    reg.register("a", _key(segment), 0, 8)
    reg.register("b", _key(segment), 8, 8)
    reg.view("a", 0, 8).release()
    reg.unregister("")
    assert reg.status("") == []
    assert list((run_dir / client_shm.SUBDIR).iterdir()) == []


def test_a_segment_shrunk_after_register_is_not_read_past_its_end(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 0, 4096)
    assert bytes(reg.view("in", 4000, 96)) == bytes(segment.buf[4000:4096])
    os.truncate(client_segments.SHM_DIR / segment.name, 1024)
    message = _fails(Status.INVALID_ARGUMENT, reg.view, "in", 4000, 96)
    assert "smaller than its registered range" in message


def test_unregister_while_a_view_is_held_keeps_the_view_valid(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("in", _key(segment), 0, 64)
    view = reg.view("in", 0, 64)
    reg.unregister("in")  # a request still reads: its view stays valid until released
    assert np.frombuffer(view, np.uint8)[:4].tolist() == list(segment.buf[:4])
    view.release()


def test_remove_registrations_empties_the_run_dir(segment, run_dir) -> None:
    reg = ClientShmRegistry(run_dir)
    reg.register("a", _key(segment), 0, 8)
    assert remove_registrations(run_dir) == 1
    assert not (run_dir / client_shm.SUBDIR).exists()
    assert remove_registrations(run_dir) == 0


def test_a_name_registered_by_two_frontends_at_once_is_registered_once(segment, run_dir, monkeypatch) -> None:
    a, b = ClientShmRegistry(run_dir), ClientShmRegistry(run_dir)
    monkeypatch.setattr(a, "_lookup", lambda name: None)  # a checked before b wrote
    b.register("in", _key(segment), 0, 8)
    _fails(Status.ALREADY_EXISTS, a.register, "in", _key(segment), 8, 8)
    assert [(r.offset, r.byte_size) for r in b.status("")] == [(0, 8)]
    assert sorted(p.name for p in (run_dir / client_shm.SUBDIR).iterdir() if p.name.startswith(".")) == []


def test_an_unchanged_registration_is_read_from_its_file_once(segment, run_dir, monkeypatch) -> None:
    """Each request looks up up to six regions: the file is read again only when it is another file."""
    other = shared_memory.SharedMemory(create=True, size=64)
    try:
        other.buf[:8] = b"ABCDEFGH"
        a, b = ClientShmRegistry(run_dir), ClientShmRegistry(run_dir)
        a.register("in", _key(segment), 0, 64)
        reads = []
        real_read = ClientShmRegistry._read
        monkeypatch.setattr(ClientShmRegistry, "_read", lambda self, path: reads.append(path) or real_read(self, path))
        for _ in range(5):
            assert bytes(b.view("in", 0, 8)) == bytes(segment.buf[:8])
        assert len(reads) == 1
        a.unregister("in")  # gone: seen at once
        _fails(Status.INVALID_ARGUMENT, b.view, "in", 0, 8)
        a.register("in", "/" + other.name, 0, 64)  # the same name again: another file, read again
        assert bytes(b.view("in", 0, 8)) == b"ABCDEFGH"
        assert bytes(b.view("in", 0, 8)) == b"ABCDEFGH"
        assert len(reads) == 2
        a.close()
        b.close()
    finally:
        other.close()
        other.unlink()
