"""`deep-detection client`: send images to a running server; show, save and summarise what comes back.

It is the first thing a user runs against a new model, so it must work on the
folders they already have (one file, `color/` + `depth/`, or a folder of color
images), find the depth that belongs to each color image without being told,
and refuse with a sentence that says what to do (start the server, add the
missing depth) before sending anything. Requests go out concurrently, but a
bounded number at a time, so a folder of thousands of images neither floods
the server nor holds all results in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `deep-detection worker` builds this parser and must not load gRPC
    from dd.client.api import AsyncDetectorClient
    from dd.proto.deep_detection.v1 import detector_pb2 as pb

DEFAULT_SERVER = "localhost:50051"
COLOR_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEPTH_EXTS = (".png", ".tif", ".tiff")
_MAX_ERROR_LINES = 20
_MAX_INSTANCE_LINES = 20

EPILOG = """\
PATH is one color image, a folder with color/ and depth/ subfolders (paired by
file stem), or a folder of color images. For an RGB-D model the depth of
.../color/NAME.jpg is looked up at .../depth/NAME.png, or given with --depth.

exit status: 0 all images served; 1 some requests failed (see the summary);
2 nothing was sent (server unreachable, no images, missing depth, bad flags).

examples:
  deep-detection client test_imgs/rgbd --viz out/
  deep-detection client photo.jpg --depth photo_depth.png --model bin-picking
  deep-detection client images/ --json results.json --annotations annotations.json
"""


class ClientError(Exception):
    """A problem found before any request was sent; the message says what to do."""


@dataclass
class Item:
    """One image to send: its color file, the depth beside it if any, and its name in results."""

    name: str  # relative to PATH, "/"-separated: "color/x.jpg", "x.jpg"
    color: Path
    depth: Path | None = None
    viz_name: str = ""


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    error_lines: list[str] = field(default_factory=list)
    instances: int = 0
    pictures: int = 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "client", help="send an image or a folder of images to a running server; draw and save the results",
        description="Send images to a running deep-detection server; draw, save and summarise the results.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="a color image, or a folder (color/ + depth/, or color images)")
    p.add_argument("--viz", metavar="DIR", help="write one PNG per image here: masks, outlines, boxes, labels, depth")
    p.add_argument("--json", metavar="FILE", help="write the results as a COCO detection-results JSON list")
    p.add_argument("--annotations", metavar="FILE",
                   help="COCO instances file whose image ids --json should use (matched by file_name); without "
                        "it images are numbered 1..N and FILE.images.json maps ids to files")
    p.add_argument("--depth", metavar="FILE", help="depth image (16-bit PNG, mm) for a single color PATH")
    p.add_argument("--model", metavar="NAME", help="model to use (default: the server's default model)")
    p.add_argument("--server", metavar="HOST:PORT", default=DEFAULT_SERVER,
                   help=f"server address (default {DEFAULT_SERVER})")
    p.add_argument("--concurrency", metavar="N", type=int, default=4,
                   help="requests in flight at once (default 4)")
    p.add_argument("--score-threshold", metavar="T", dest="score_threshold", type=float, default=0.0,
                   help="keep instances scoring at least T, in [0, 1]; 0 (the default) means the model's own threshold")
    p.add_argument("--timeout", metavar="S", type=float, default=30.0,
                   help="deadline per request, seconds (default 30)")
    p.add_argument("--encoding", choices=("auto", "raw", "jpeg+zstd", "jpeg+png", "as-is"), default="auto",
                   help="how images go to the server: raw (decoded here, no decoding there), jpeg+zstd (depth "
                        "recompressed with zstd: smaller than PNG, 6x cheaper to decode), jpeg+png or as-is "
                        "(files as they are); auto (the default): raw for a local server (loopback or unix "
                        "socket), jpeg+zstd otherwise")
    sec = p.add_argument_group("security (for a server started with --tls-* or --auth-token-file)")
    sec.add_argument("--tls-ca", metavar="PEM", help="speak TLS, trusting server certificates this CA bundle signed")
    sec.add_argument("--tls-cert", metavar="PEM", help="this client's certificate, for mutual TLS (with --tls-key)")
    sec.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    sec.add_argument("--token-file", metavar="FILE", help="send the bearer token this file holds")
    p.set_defaults(func=run)
    return p


# -- finding the images ---------------------------------------------------------------------------

def _images_in(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)


def _depth_beside(color: Path) -> Path | None:
    """.../color/NAME.jpg -> .../depth/NAME.png (or .tif), the layout the users' cameras write."""
    folder = color.parent.parent / "depth"
    for ext in DEPTH_EXTS:
        cand = folder / (color.stem + ext)
        if cand.is_file():
            return cand
    return None


def _viz_names(items: list[Item]) -> None:
    """NAME.png per image; NAME.jpg.png where two inputs share a stem, so neither overwrites the other."""
    stems = Counter(it.color.stem for it in items)
    for it in items:
        it.viz_name = f"{it.color.stem}.png" if stems[it.color.stem] == 1 else f"{it.color.name}.png"


def collect_items(path: Path, depth: Path | None = None) -> list[Item]:
    """The images PATH stands for, each with the depth found beside it (None where there is none)."""
    if not path.exists():
        raise ClientError(f"{path} does not exist; give a color image or a folder of images")
    if path.is_file():
        if path.suffix.lower() not in COLOR_EXTS:
            raise ClientError(f"{path} is not an image ({', '.join(COLOR_EXTS)})")
        if depth is not None and not depth.is_file():
            raise ClientError(f"--depth {depth} does not exist")
        name = f"color/{path.name}" if path.parent.name == "color" else path.name
        items = [Item(name, path, depth or _depth_beside(path))]
    else:
        if depth is not None:
            raise ClientError("--depth goes with a single color image; for a folder put the depth images in "
                              f"{path / 'depth'} (same file names as in {path / 'color'}, as 16-bit PNG)")
        color_dir = path / "color"
        if color_dir.is_dir():
            items = [Item(f"color/{c.name}", c, _depth_beside(c)) for c in _images_in(color_dir, COLOR_EXTS)]
            looked = f"{color_dir}"
        else:
            items = [Item(c.name, c, _depth_beside(c)) for c in _images_in(path, COLOR_EXTS)]
            looked = f"{path} (and found no color/ subfolder in it)"
        if not items:
            raise ClientError(f"no images found in {looked}; looked for {', '.join(COLOR_EXTS)} files. Give a "
                              "folder of color images, or one with color/ and depth/ subfolders")
    _viz_names(items)
    return items


def check_depth(items: list[Item], model: str, single: bool, rgb_models: list[str]) -> None:
    """An RGB-D model cannot serve a color image alone; name the ones without depth before sending any."""
    missing = [it for it in items if it.depth is None]
    if not missing:
        return
    alt = (f", or choose an RGB model with --model ({', '.join(rgb_models)})" if rgb_models else "")
    if single:
        it = missing[0]
        where = it.color.parent.parent / "depth" / f"{it.color.stem}.png"
        raise ClientError(f"model {model!r} is RGB-D and needs a depth image for {it.color}: give it with "
                          f"--depth FILE, or put it at {where}{alt}")
    shown = ", ".join(it.color.name for it in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    color_dir = missing[0].color.parent
    if color_dir.name == "color":
        todo = f"Add NAME.png (16-bit, mm) to {color_dir.parent / 'depth'} for each color image NAME.jpg"
    else:
        todo = (f"Put the color images in {color_dir / 'color'} and their depth images (same names, 16-bit PNG "
                f"in mm) in {color_dir / 'depth'}")
    raise ClientError(f"model {model!r} is RGB-D and needs depth, but {len(missing)} of {len(items)} color images "
                      f"have none: {shown}{more}. {todo}{alt}")


# -- talking to the server -----------------------------------------------------------------------

_URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")  # not gRPC targets (those are dns:///, unix:, ...)


def _target(server: str) -> str:
    server = server.strip()
    if server.lower().startswith(_URL_SCHEMES):
        scheme, _, rest = server.partition("://")
        tls = " and --tls-ca for TLS" if scheme.lower() in ("https", "grpcs") else ""
        raise ClientError(f"--server takes HOST:PORT, not a URL: try --server {rest.rstrip('/')}{tls}")
    if server.startswith("[") or server.count(":") == 1 or "://" in server:
        return server
    return f"{server}:50051"  # a bare host name (or an IPv6 address, which then needs [brackets])


def connection_security(args: argparse.Namespace) -> tuple[object | None, str | None]:
    """(gRPC channel credentials or None, bearer token or None) from the security flags."""
    import grpc

    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ClientError(f"{flag} {path}: {exc.strerror or exc}") from exc

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ClientError("--tls-cert and --tls-key go together (the client certificate and its key)")
    if args.tls_cert and not args.tls_ca:
        raise ClientError("--tls-cert needs --tls-ca (the CA bundle that signed the server's certificate)")
    creds = None
    if args.tls_ca:
        cert = read("--tls-cert", args.tls_cert) if args.tls_cert else None
        key = read("--tls-key", args.tls_key) if args.tls_key else None
        creds = grpc.ssl_channel_credentials(read("--tls-ca", args.tls_ca), key, cert)
    token = None
    if args.token_file:
        token = read("--token-file", args.token_file).decode().strip()
        if not token:
            raise ClientError(f"--token-file {args.token_file}: the file is empty")
    return creds, token


async def _list_models(client: AsyncDetectorClient, target: str, timeout: float) -> list[pb.ModelInfo]:
    import grpc

    from dd.client.errors import DetectionError

    try:
        return await client.list_models(timeout=timeout)
    except DetectionError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ClientError(f"cannot reach a deep-detection server at {target} ({code.name}: "
                              f"{exc.details()}). Start one with `deep-detection serve` "
                              f"(it listens on port 50051), or point --server HOST:PORT at the one you run") from exc
        raise ClientError(f"the server at {target} refused ListModels: {code.name}: {exc.details()}") from exc


def pick_model(models: list[pb.ModelInfo], name: str | None, target: str) -> pb.ModelInfo:
    if not models:
        raise ClientError(f"the server at {target} serves no models")
    served = ", ".join(f"{m.name} ({m.input_kind})" for m in models)
    if name:
        for m in models:
            if m.name == name:
                return m
        raise ClientError(f"model {name!r} is not served at {target}; it serves {served}")
    for m in models:
        if m.is_default:
            return m
    return models[0]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples it reports a latency that happened, not an interpolation."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))]


def summary_line(tally: Tally, total: int, elapsed: float) -> str:
    errs = sum(tally.errors.values())
    err_text = f"errors: {errs}"
    if errs:
        err_text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(tally.errors.items())) + ")"
    if tally.latencies_ms:
        lat = (f"latency p50 {_percentile(tally.latencies_ms, 50):.1f} ms, "
               f"p99 {_percentile(tally.latencies_ms, 99):.1f} ms")
    else:
        lat = "latency n/a"
    rate = len(tally.latencies_ms) / elapsed if elapsed > 0 else 0.0
    return (f"summary: {_plural(total, 'image')}, {_plural(tally.instances, 'instance')}, {err_text}; {lat}; "
            f"{rate:.1f} images/s")


async def _detect_all(args: argparse.Namespace, target: str) -> int:
    from tqdm import tqdm

    from dd.client import coco
    from dd.client.api import AsyncDetectorClient, Result
    from dd.client.errors import DetectionError

    path = Path(args.path)
    depth_arg = Path(args.depth) if args.depth else None
    items = collect_items(path, depth_arg)  # local problems first: they need no server
    single = path.is_file()

    credentials, token = connection_security(args)
    async with AsyncDetectorClient(target, timeout=args.timeout, credentials=credentials, token=token,
                                   encoding=args.encoding) as client:
        models = await _list_models(client, target, min(args.timeout, 15.0))
        model = pick_model(models, args.model, target)
        rgbd = model.input_kind == "rgbd"
        if rgbd:
            check_depth(items, model.name, single, [m.name for m in models if m.input_kind == "rgb"])
        if not model.ready and model.error:
            raise ClientError(f"model {model.name!r} at {target} cannot serve: {model.error}")
        if not model.ready:
            print(f"deep-detection client: warning: model {model.name!r} has no ready worker yet; "
                  "requests may wait or fail", file=sys.stderr)

        image_ids: dict[str, int] | None = None
        if args.json:
            names = [it.name for it in items]
            if args.annotations:
                image_ids = coco.image_ids_from_annotations(Path(args.annotations), names)
                for line in coco.category_mismatches(Path(args.annotations), list(model.categories)):
                    print(f"deep-detection client: warning: {line}", file=sys.stderr)
            else:
                image_ids = coco.sorted_image_ids(names)
        viz_dir = Path(args.viz) if args.viz else None
        for flag, folder in (("--viz", viz_dir), ("--json", Path(args.json).parent if args.json else None)):
            if folder is not None:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ClientError(f"cannot create the {flag} folder {folder}: {exc.strerror or exc}") from exc

        tally = Tally()
        entries: dict[str, list[dict]] = {}
        sizes: dict[str, tuple[int, int]] = {}
        single_result = None
        request_slots = asyncio.Semaphore(args.concurrency)
        bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=single, mininterval=0.5,
                   dynamic_ncols=True, desc=f"{model.name}@{target}")

        def fail(item: Item, kind: str, message: str) -> None:
            tally.errors[kind] += 1
            if len(tally.error_lines) < _MAX_ERROR_LINES:
                line = f"{item.color}: {kind}: {message}"
                tally.error_lines.append(line)
                tqdm.write(f"deep-detection client: {line}", file=sys.stderr)

        pending = iter(items)

        async def lane() -> None:
            """Takes the next image until none are left: request, then draw (in a thread).

            2 x concurrency lanes share `concurrency` request slots, so the next
            requests go out while earlier results are drawn, and neither tasks
            nor results waiting to be drawn grow with the number of images.
            """
            for item in pending:
                try:
                    result = await request(item)
                    if result is not None:
                        await draw(item, result)
                finally:
                    bar.update(1)

        async def request(item: Item) -> Result | None:
            nonlocal single_result
            async with request_slots:
                send_depth = item.depth if rgbd else None
                try:  # read and encoded off the event loop (decoding for raw, compressing for zstd)
                    req = await asyncio.to_thread(
                        lambda: client.make_request(item.color.read_bytes(),
                                                    send_depth.read_bytes() if send_depth else None,
                                                    model=model.name, score_threshold=args.score_threshold,
                                                    request_id=item.name))
                except OSError as exc:
                    fail(item, "UNREADABLE", exc.strerror or str(exc))
                    return None
                t0 = time.perf_counter()
                try:
                    result = await client.detect_request(req, timeout=args.timeout)
                except DetectionError as exc:
                    fail(item, exc.code().name, exc.details())
                    return None
                tally.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                tally.instances += len(result.instances)
                sizes[item.name] = (result.height, result.width)
                if single:
                    single_result = result
                return result

        async def draw(item: Item, result: Result) -> None:
            if image_ids is not None:
                entries[item.name] = coco.result_to_coco(result, image_ids[item.name])
            if viz_dir is not None:
                from dd.client.viz import write_viz

                try:
                    await asyncio.to_thread(write_viz, viz_dir / item.viz_name, item.color, result.instances,
                                            item.depth)
                    tally.pictures += 1
                except OSError as exc:
                    fail(item, "VIZ_FAILED", str(exc))

        start = time.perf_counter()
        try:
            await asyncio.gather(*(lane() for _ in range(min(len(items), 2 * args.concurrency))))
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        hidden = sum(tally.errors.values()) - len(tally.error_lines)
        if hidden > 0:
            print(f"deep-detection client: ... and {hidden} more failed requests (counted in the summary)",
                  file=sys.stderr)

    if single_result is not None:
        shown = single_result.instances[:_MAX_INSTANCE_LINES]
        for inst in shown:
            x1, y1, x2, y2 = inst.box
            print(f"{inst.class_name or inst.class_id} {inst.score:.2f} box ({x1:.0f}, {y1:.0f}, {x2:.0f}, "
                  f"{y2:.0f})")
        if len(single_result.instances) > len(shown):
            print(f"... and {len(single_result.instances) - len(shown)} more (see --viz or --json)")
    if image_ids is not None:
        flat = [e for name in sorted(entries, key=lambda n: image_ids[n]) for e in entries[name]]
        try:
            side = coco.write_results(Path(args.json), flat, image_ids=None if args.annotations else image_ids,
                                      sizes=sizes, categories=list(model.categories))
        except OSError as exc:
            raise ClientError(f"cannot write --json {args.json}: {exc.strerror or exc}") from exc
        print(f"wrote {_plural(len(flat), 'result')} to {args.json}" + (f" (image ids in {side})" if side else ""))
    if viz_dir is not None:
        print(f"wrote {_plural(tally.pictures, 'picture')} to {viz_dir}/")
    print(summary_line(tally, len(items), elapsed))
    return 1 if tally.errors else 0


def run(args: argparse.Namespace) -> int:
    """Entry point of `deep-detection client`; returns the exit status."""
    if args.concurrency < 1:
        return _usage("--concurrency must be at least 1")
    if not 0.0 <= args.score_threshold <= 1.0 or math.isnan(args.score_threshold):
        return _usage("--score-threshold must be in [0, 1] (0 or left out: the model's own threshold)")
    if not args.timeout > 0:
        return _usage("--timeout must be a positive number of seconds")
    from dd.client.coco import CocoError

    try:
        target = _target(args.server)
        status = asyncio.run(_detect_all(args, target))
    except (ClientError, CocoError) as exc:
        status = _usage(str(exc))
    except KeyboardInterrupt:
        print("deep-detection client: interrupted", file=sys.stderr)
        status = 130
    release_grpc_aio()
    return status


def release_grpc_aio() -> None:
    """Frees gRPC's asyncio channels while the interpreter can still run threads.

    An error raised inside `asyncio.run` leaves the task, its traceback and the client's channels in a
    reference cycle. Left to the collector at interpreter exit, the last channel's release joins
    gRPC's poller thread, which can no longer run then, and the process hangs after printing the error
    (grpc/grpc#22365; seen about once in twenty runs on grpcio 1.66, CI's lowest pin; grpc/grpc#40447
    skips that shutdown at exit). Collecting here frees them first.
    """
    gc.collect()


def _usage(message: str) -> int:
    print(f"deep-detection client: {message}", file=sys.stderr)
    return 2
