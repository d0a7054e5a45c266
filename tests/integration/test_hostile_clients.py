"""Hostile and clumsy clients (issue 17), each against a real server on loopback: images that cost far more
to decode than their size, memory that no limit counted, log injection and flooding, idle connections,
and one stream that took every slot. Each test failed on the server before these limits existed."""

from __future__ import annotations

import asyncio
import io
import resource
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import grpc
import numpy as np
import psutil
import pytest
from PIL import Image as PILImage

from dd.config import ServerConfig
from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.detector_v1 import image_inputs
from dd.logsafe import clip
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from dd.proto.deep_detection.v1 import detector_pb2_grpc as pb_grpc
from tests.faults import Server, answer_problem, detect, null_case, null_model, wait_for

FAIL_PIXEL = 7  # the null engine raises on an image whose first pixel's red value is this
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


# -- hostile inputs, made here ----------------------------------------------------------------------
def progressive_jpeg(h: int, w: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A progressive JPEG (Pillow's encoder: about 10 scans) and its RGB pixels."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(rgb).save(out, "JPEG", progressive=True, quality=90)
    return out.getvalue(), rgb


def scan_bomb(repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each repeat makes the decoder pass over the whole
    image again (libjpeg warns about the bogus progression and carries on). The last scan runs from the
    last SOS marker to EOI; entropy-coded data never holds 0xFF 0xDA."""
    data, _ = progressive_jpeg(64, 64)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_chunk_bomb(rgb: np.ndarray, chunks: int) -> bytes:
    """A PNG of `rgb` followed by `chunks` compressed text chunks of 8 MB of zeros each (8 KB on the
    wire): libpng inflates every one of them, about 28 ms each, though nobody reads them."""
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    iend = png.rindex(b"IEND") - 4
    ztxt = _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\x00" * 8_000_000, 9))
    return png[:iend] + ztxt * chunks + png[iend:]


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _only(srv: Server, role: str) -> psutil.Process:
    procs = srv.processes(role)
    assert len(procs) == 1, procs
    return procs[0]


# -- one server for most of the tests ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    null_model(root / "rgb", kind="rgb", fail_on_pixel=FAIL_PIXEL)
    null_model(root / "rgbd", kind="rgbd")
    srv = Server(root, slot_mb=1.0, args=["--upload-timeout", "2"]).start()
    try:
        srv.wait_serving(120)
        yield srv
    finally:
        srv.stop()


def rgb_request(data: bytes, **kw) -> pb.DetectRequest:
    return pb.DetectRequest(model="rgb", color=pb.Image(data=data), **kw)


# -- 1. decode-time bombs ---------------------------------------------------------------------------
def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(server: Server) -> None:
    """Regression: a progressive JPEG made of thousands of repeated scans passed every size check and kept a
    decode thread busy (0.8 ms a scan at 3840x2160); two of them locked every other client out for 16 s."""
    bomb = scan_bomb(3000)
    with pytest.raises(grpc.RpcError) as err:
        detect(server.target, rgb_request(bomb))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    assert "more than 32 scans (max_jpeg_scans)" in err.value.details()
    # An ordinary progressive JPEG (10 scans) is served as before.
    data, rgb = progressive_jpeg(48, 64, seed=3)
    resp = detect(server.target, rgb_request(data))
    assert (resp.width, resp.height) == (64, 48)


def test_png_text_chunks_never_reach_the_decoder(server: Server) -> None:
    """A PNG carrying 400 compressed text chunks (3 MB on the wire) cost libpng about 11 s of CPU to
    inflate, for metadata nobody reads. The frontend hands the decoder the pixel chunks only: the image is
    served, for the CPU time of an ordinary small PNG (counted in CPU seconds, not wall time)."""
    rgb = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    frontend = _only(server, "frontend")
    before = _cpu_s(frontend)
    resp = detect(server.target, rgb_request(text_chunk_bomb(rgb, 400)), timeout=120)
    used = _cpu_s(frontend) - before
    assert (resp.width, resp.height) == (32, 24)
    assert used < 2.0, f"the frontend spent {used:.1f} s of CPU on one 24x32 PNG: its text chunks were inflated"


def test_an_image_too_elongated_for_the_model_is_refused_before_it_reaches_the_engine(server: Server) -> None:
    """Regression: RAW 2x2000 reached the engine, which failed with INTERNAL and a traceback per request.
    The null models resize like any (MIN_SIZE 800, MAX_SIZE 1333): 2x2000 would come out 1.3 pixels wide."""
    arr = np.zeros((2, 2000, 3), np.uint8)
    req = pb.DetectRequest(model="rgb", color=pb.Image(data=arr.tobytes(), encoding=pb.Image.RAW, shape=[2, 2000, 3],
                                                      dtype=pb.UINT8))
    with pytest.raises(grpc.RpcError) as err:
        detect(server.target, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too elongated" in err.value.details() and "at most 41.7 times" in err.value.details()
    ok = np.zeros((50, 2000, 3), np.uint8)  # 33 pixels wide once resized: accepted
    req = pb.DetectRequest(model="rgb", color=pb.Image(data=ok.tobytes(), encoding=pb.Image.RAW, shape=[50, 2000, 3],
                                                      dtype=pb.UINT8))
    assert detect(server.target, req).width == 2000


def test_a_failed_color_decode_leaves_no_depth_decode_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: with a color image whose header lies, a request was refused in 5 ms while its depth
    image went on decoding on the shared depth threads: a client could keep them all busy at no cost to
    itself. decode_into_slot must not return before the depth decode it started has ended."""
    from dd.frontend import decode

    depth_started = threading.Event()
    color_failed = threading.Event()
    depth_ended = threading.Event()

    def fake_imdecode(data: bytes, flags: int):
        if flags == decode._DEPTH_FLAGS:
            depth_started.set()
            color_failed.wait(30)  # the color decode has failed by now
            time.sleep(0.2)  # and the request would have been answered, before this fix
            depth_ended.set()
            return np.zeros((24, 32), np.uint16)
        # The depth decode is running when the color decode fails, however the threads are scheduled
        # (on a busy machine it could otherwise still be queued, and be cancelled: nothing left behind).
        depth_started.wait(30)
        color_failed.set()
        return None  # "could not be decoded"

    monkeypatch.setattr(decode, "_imdecode", fake_imdecode)
    color = cv2.imencode(".png", np.zeros((24, 32, 3), np.uint8))[1].tobytes()
    depth = cv2.imencode(".png", np.zeros((24, 32), np.uint16))[1].tobytes()
    req = pb.DetectRequest(color=pb.Image(data=color), depth=pb.Image(data=depth))
    with pytest.raises(ServeError, match="could not be decoded"):
        decode.decode_into_slot(*image_inputs(req), True, memoryview(bytearray(1 << 16)), 1 << 16)
    assert depth_ended.is_set(), "the request was answered while its depth image was still being decoded"


def test_a_request_whose_caller_has_gone_starts_no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    from dd.frontend import decode

    calls: list[int] = []
    monkeypatch.setattr(decode, "_imdecode", lambda data, flags: calls.append(flags))
    color = cv2.imencode(".png", np.zeros((24, 32, 3), np.uint8))[1].tobytes()
    gone = threading.Event()
    gone.set()
    with pytest.raises(ServeError) as err:
        decode.decode_into_slot(*image_inputs(pb.DetectRequest(color=pb.Image(data=color))), False, memoryview(bytearray(1 << 16)),
                                1 << 16, abandoned=gone)
    assert err.value.status == Status.CANCELLED and calls == []


# -- 2. memory that no limit counted ----------------------------------------------------------------
def test_request_id_has_a_length_limit(server: Server) -> None:
    """Regression: request_id had no limit and was echoed back: a stream of 8 MB ids held 480 MB."""
    case = null_case(1, depth=False, model="rgb")
    case.request.request_id = "x" * 300
    with pytest.raises(grpc.RpcError) as err:
        detect(server.target, case.request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id is 300 bytes; at most 256" in err.value.details()
    # In a stream the failed request's response echoes the id cut to the limit, and the stream goes on.
    good = null_case(2, depth=False, model="rgb")
    with grpc.insecure_channel(server.target) as ch:
        responses = list(pb_grpc.DetectorStub(ch).DetectStream(iter([case.request, good.request]), timeout=30))
    by_id = {r.request_id: r for r in responses}
    assert by_id["x" * 256].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answer_problem(good, by_id[good.request.request_id]) is None


def test_a_detect_message_that_never_arrives_is_given_up(server: Server) -> None:
    """Regression: an upload stalled short of its end was held for as long as the client liked (8 x 60 MB).
    Here the call opens and its message never comes: the server gives up after --upload-timeout (2 s),
    long before the client's own deadline."""
    with grpc.insecure_channel(server.target) as ch:
        call = ch.stream_stream("/deep_detection.v1.Detector/Detect", request_serializer=None,
                                response_deserializer=None)
        never = threading.Event()

        def nothing():
            never.wait(120)
            return
            yield b""  # pragma: no cover

        with pytest.raises(grpc.RpcError) as err:
            list(call(nothing(), timeout=120))
        never.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within 2 s" in err.value.details()


def test_responses_a_stream_does_not_read_count_against_the_frontend(tmp_path: Path) -> None:
    """Regression: finished responses that a stream's client did not read were counted by no limit (one
    stream held 32 of them, and streams are unbounded in number). Now they count towards max_pending and
    max_held_response_mb: while a stream that reads nothing holds more than 0.05 MB of answers (37 KB
    each), a new request is refused with RESOURCE_EXHAUSTED, and served again once the stream is read."""
    instances = 1000  # boxes only: about 37 KB a response
    null_model(tmp_path / "null", kind="rgb", instances=instances)
    window = ServerConfig(ring_slots=8).resolved_stream_window()
    cases = [null_case(i, depth=False, instances=instances) for i in range(window)]
    other = null_case(99, depth=False, instances=instances)
    with Server(tmp_path / "null", ring_slots=8, slot_mb=0.0625, args=["--max-held-response-mb", "0.05"]) as srv:
        srv.start().wait_serving(120)

        async def scenario() -> tuple[grpc.StatusCode, str, list[pb.DetectResponse], pb.DetectResponse]:
            options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)]
            async with grpc.aio.insecure_channel(srv.target, options=options) as ch:
                stub = pb_grpc.DetectorStub(ch)
                call = stub.DetectStream(timeout=60)
                for case in cases:
                    await call.write(case.request)
                loop = asyncio.get_running_loop()
                # Every request of the stream served (its slot taken and given back), none read.
                await loop.run_in_executor(None, wait_for, lambda: sum(r.generations for r in srv.rings()) // 2
                                           >= window, 30, "the stream's requests to be served")
                try:
                    await stub.Detect(other.request, timeout=30)
                    refused = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as exc:
                    refused = (exc.code(), exc.details())
                await call.done_writing()
                responses = [r async for r in call]
                after = await stub.Detect(other.request, timeout=30)
                return refused[0], refused[1], responses, after

        code, details, responses, after = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "max_held_response_mb" in details
    assert len(responses) == window and not any(r.error_code for r in responses)
    assert answer_problem(other, after) is None


# -- 3. logs ----------------------------------------------------------------------------------------
def test_request_ids_cannot_forge_log_lines_and_repeated_failures_are_thinned(server: Server) -> None:
    """Regression: the worker logged a failing request's id verbatim (newlines in it forged a
    'CRITICAL [supervisor]' line), with a full traceback per request. Now the id is quoted, and 30
    identical failures log a few lines and one traceback."""
    forged = "r1\n2026-01-01 00:00:00,000 CRITICAL [supervisor] forged by a client"
    n = 30
    for i in range(n):
        case = null_case(1000 + i, depth=False, model="rgb")
        color = np.frombuffer(case.request.color.data, np.uint8).copy()
        color[0] = FAIL_PIXEL
        case.request.color.data = color.tobytes()
        case.request.request_id = forged if i == 0 else f"fail-{i}"
        with pytest.raises(grpc.RpcError) as err:
            detect(server.target, case.request)
        assert err.value.code() == grpc.StatusCode.INTERNAL
    log = server.log()
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), "a client forged a log line"
    assert clip(forged) in log  # quoted: its newline is the two characters backslash and n
    failed = [line for line in log.splitlines() if "engine failed on request" in line]
    assert 1 <= len(failed) <= 5, f"{len(failed)} log lines for {n} identical engine failures"
    assert log.count("Traceback (most recent call last)") == 1, log[-4000:]


def test_a_long_model_name_is_not_echoed_whole(server: Server) -> None:
    """Regression: a 100 KB model name came back in the NOT_FOUND message until the status overflowed
    gRPC's metadata limit."""
    with pytest.raises(grpc.RpcError) as err:
        detect(server.target, pb.DetectRequest(model="m" * 100_000, color=pb.Image(data=b"x")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details()) < 500 and "(100000 characters)" in err.value.details()


def test_cancelled_streams_log_no_error(server: Server) -> None:
    """Streams cancelled and abandoned at every stage end quietly: no traceback, nothing at ERROR."""
    async def scenario() -> None:
        for k in range(12):
            async with grpc.aio.insecure_channel(server.target) as ch:
                call = pb_grpc.DetectorStub(ch).DetectStream(timeout=30 if k % 3 else 0.2)
                for i in range(6):
                    await call.write(null_case(i, depth=False, model="rgb").request)
                if k % 2:
                    await call.read()
                await asyncio.sleep(0.01 * (k % 4))
                call.cancel()

    before = len(server.log())
    asyncio.run(scenario())
    assert detect(server.target, null_case(5, depth=False, model="rgb").request)  # still serving
    log = server.log()[before:]
    assert "ExecuteBatchError" not in log and " ERROR " not in log and "Traceback" not in log, log[-4000:]


def test_log_files_rotate_and_stderr_follows(tmp_path: Path) -> None:
    """--log-max-mb rotates each process's log file, and what the process writes to stderr (native
    libraries, tracebacks) goes to the current file rather than to the one rotated away."""
    import subprocess
    import sys

    script = f"""
import logging, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from dd.procutil import setup_logging
fd = os.open({str(tmp_path / 'p.log')!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.dup2(fd, 2)  # as the supervisor starts its children under --log-dir
setup_logging("INFO", "p", {str(tmp_path)!r}, max_mb=0.01, backups=2)
for i in range(400):
    logging.getLogger("t").info("line " + str(i) + " " + "x" * 60)  # each its own text: not thinned
os.write(2, b"native stderr after rotation\\n")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["p.log", "p.log.1", "p.log.2"], names
    assert all((tmp_path / n).stat().st_size < 12_000 for n in names)
    assert "native stderr after rotation" in (tmp_path / "p.log").read_text()


def test_repeat_filter_thins_and_tells() -> None:
    import logging

    from dd.logsafe import RepeatFilter

    now = [0.0]
    f = RepeatFilter(burst=3, window_s=10.0, clock=lambda: now[0])
    logger = logging.getLogger("t")

    def record(i: int) -> logging.LogRecord:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys
            return logger.makeRecord("t", logging.ERROR, __file__, 1, "failed on %s", (i,), sys.exc_info())

    passed = [r for r in (record(i) for i in range(10)) if f.filter(r)]
    assert len(passed) == 3 and passed[0].exc_info and not passed[1].exc_info and "ValueError" in passed[1].msg
    now[0] = 11.0
    nxt = record(10)
    assert f.filter(nxt) and "7 more like this" in nxt.getMessage()


def test_the_plaintext_warning_names_both_address_families() -> None:
    from dd.supervisor import open_port_warning

    warning = open_port_warning(ServerConfig(host="0.0.0.0"))
    assert warning and "IPv4 and IPv6" in warning and "dual-stack" in warning
    assert open_port_warning(ServerConfig(host="127.0.0.1")) is None
    assert "10.0.0.5:50051" in open_port_warning(ServerConfig(host="10.0.0.5"))


# -- 4. idle connections ----------------------------------------------------------------------------
def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (what it sent before, SETTINGS and GOAWAY, is read away)."""
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_idle_connections_are_closed_and_cannot_lock_clients_out(tmp_path: Path) -> None:
    """Regression: connections that only sent the HTTP/2 preface stayed open; under a limit of 1024 open files
    1100 of them locked every legitimate call out. The server runs here with a hard limit of 400 open files
    and is sent 500 such connections: those over the connection cap are closed at once, the rest after
    the idle timeout, and a legitimate call is served meanwhile. The frontend also raised its soft limit
    of open files to the hard one (it was started with 256)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1200), hard))
    null_model(tmp_path / "null", kind="rgb")
    srv = Server(tmp_path / "null", args=["--idle-timeout", "1"])
    srv.start = _start_with_file_limit(srv, soft=256, hard=400)  # type: ignore[method-assign]
    with srv:
        srv.start().wait_serving(120)
        frontend = _only(srv, "frontend")
        assert frontend.rlimit(psutil.RLIMIT_NOFILE) == (400, 400)
        socks = []
        try:
            for _ in range(500):
                s = socket.create_connection(("127.0.0.1", srv.port))
                s.sendall(PREFACE)
                socks.append(s)
            case = null_case(3, depth=False)
            with grpc.insecure_channel(srv.target) as ch:
                resp = pb_grpc.DetectorStub(ch).Detect(case.request, timeout=60, wait_for_ready=True)
            assert answer_problem(case, resp) is None
            wait_for(lambda: all(_closed(s) for s in socks), 60, "every idle connection to be closed", 0.2)
        finally:
            for s in socks:
                s.close()
        assert srv.proc.poll() is None and "exited with" not in srv.log()


def _start_with_file_limit(srv: Server, soft: int, hard: int):
    """srv.start, with the server's limit of open files lowered to (soft, hard) as ulimit -n would."""
    import subprocess

    from tests.serverproc import REPO

    def start() -> Server:
        srv._log = open(srv.log_path, "wb")
        srv.proc = subprocess.Popen(srv.argv, stdout=srv._log, stderr=subprocess.STDOUT, env=srv.env, cwd=REPO,
                                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
                                    start_new_session=True)
        return srv

    return start


# -- 5. one stream cannot take every slot -----------------------------------------------------------
def test_one_greedy_stream_cannot_starve_another_client(tmp_path: Path) -> None:
    """Regression: the per-stream window (32) was larger than the ring (16 slots), so one DetectStream held
    every slot and another client's call waited behind it. Here the greedy stream sends 16 requests to a
    model whose engine takes a minute a batch, so its requests hold their slots; the other client's call
    to another model must still get a slot and be answered, and the stream must hold no more slots than
    its window (half the ring)."""
    null_model(tmp_path / "models" / "slow", kind="rgb", cost_ms=60_000)
    null_model(tmp_path / "models" / "fast", kind="rgb")
    window = ServerConfig(ring_slots=8).resolved_stream_window()
    with Server(tmp_path / "models", ring_slots=8, slot_mb=0.0625, args=["--grace", "1"]) as srv:
        srv.start().wait_serving(120)

        async def scenario() -> tuple[int, pb.DetectResponse, str | None]:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = pb_grpc.DetectorStub(ch)
                greedy = stub.DetectStream(timeout=120)
                for i in range(16):
                    await greedy.write(null_case(i, depth=False, model="slow").request)
                loop = asyncio.get_running_loop()
                held = await loop.run_in_executor(None, _settled_slots, srv)
                case = null_case(100, depth=False, model="fast")
                resp = await stub.Detect(case.request, timeout=30)
                greedy.cancel()
                return held, resp, answer_problem(case, resp)

        held, resp, problem = asyncio.run(scenario())
    assert held <= window, f"one stream holds {held} of the ring's 8 slots (window {window})"
    assert problem is None, problem


def _settled_slots(srv: Server, quiet_s: float = 1.0, timeout: float = 30.0) -> int:
    """Slots in use once the count has been unchanged for quiet_s seconds (and is not 0)."""
    last, since, end = srv.slots_in_use(), time.monotonic(), time.monotonic() + timeout
    while last == 0 or time.monotonic() - since < quiet_s:
        assert time.monotonic() < end, f"slots in use still changing after {timeout} s (last {last})"
        time.sleep(0.05)
        now = srv.slots_in_use()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_slots_go_to_the_caller_holding_the_fewest() -> None:
    """The slot pool's fair hand-out, in-process: a stream holding both slots of a ring of 2 and waiting for
    a third does not get the next free slot before another caller who holds none, though it asked first."""
    from dd.frontend.slots import SlotPool
    from dd.ipc.shm_ring import ShmRing

    async def scenario() -> list[str]:
        ring = ShmRing.create(f"dd-{'0' * 10}-test-{int(time.time() * 1000) % 10**9}", 2, 4096)
        try:
            pool = SlotPool(ring)
            stream = object()
            a = await pool.acquire(time.time() + 10, stream)
            await pool.acquire(time.time() + 10, stream)
            order: list[str] = []

            async def want(who: str, owner: object | None) -> None:
                got = await pool.acquire(time.time() + 10, owner)
                order.append(who)
                pool.release(got[0])

            tasks = [asyncio.create_task(want("stream", stream))]
            await asyncio.sleep(0)
            tasks.append(asyncio.create_task(want("other", None)))
            await asyncio.sleep(0)
            pool.release(a[0])
            await asyncio.gather(*tasks)
            return order
        finally:
            ring.close()
            ring.unlink()

    assert asyncio.run(scenario())[0] == "other"
