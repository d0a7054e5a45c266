"""The `deep-detection` command: serve, worker, frontend, client, inspect, export.

`serve` runs everything; `worker` and `frontend` run one process each, for
process managers (supervisord, systemd, Kubernetes) that want to own them;
`inspect` prints what the server understood of a model folder, without serving.
Configuration errors are printed as one line and exit with status 2 before
any process starts; when no model's weights can be loaded, `serve` exits with
status 3 and one line per model (dd.supervisor.LoadFailed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from dd.config import JPEG_DECODE_CHOICES, ConfigError, ServerConfig, discover_models, load_server_config

BUILTIN_MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"
# The users' deployments set this (`docker run -e NODE_CONFIG_FILE=model_repository/x/node_config.json`):
# `serve` without a PATH serves it; relative paths are relative to the working directory.
NODE_CONFIG_ENV = "NODE_CONFIG_FILE"


def serve_path(path: str | None) -> tuple[str, str]:
    """What `serve` serves, and where that came from: PATH, else $NODE_CONFIG_FILE, else the demo models."""
    if path:
        return path, "PATH"
    env = os.environ.get(NODE_CONFIG_ENV, "").strip()
    if env:
        return env, f"${NODE_CONFIG_ENV}"
    return str(BUILTIN_MODELS), "the built-in demo models"


def _server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server settings (flags override --config)")
    g.add_argument("--config", help="server settings file (JSON or YAML; keys as in dd.config.ServerConfig)")
    g.add_argument("--host", help="address to bind (default 0.0.0.0: every interface)")
    g.add_argument("--port", type=int, help="gRPC port (default 50051)")
    g.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="Prometheus metrics at http://HOST:PORT/metrics, Triton's names (default 8002; 0: off)")
    g.add_argument("--kserve-port", dest="kserve_port", type=int,
                   help="also serve the KServe v2 / Triton protocol alone on this port (default 0: only on --port, "
                        "beside the Detector API)")
    g.add_argument("--frontends", type=int, help="frontend processes sharing the port (default: half the cores, less one per worker beyond the first, 1 to 32)")
    g.add_argument("--ring-slots", dest="ring_slots", type=int, help="shared-memory slots per frontend (default 16)")
    g.add_argument("--slot-mb", dest="slot_mb", type=float,
                   help="bytes per slot in MiB (default: fits the largest allowed RGB-D image)")
    g.add_argument("--max-image-pixels", dest="max_image_pixels", type=int,
                   help="largest image accepted, width x height (default 3840x2160)")
    g.add_argument("--run-dir", dest="run_dir", help="private directory for sockets (default per user and port)")
    g.add_argument("--log-dir", dest="log_dir", help="write one log file per process here (default stderr)")
    g.add_argument("--max-message-mb", dest="max_message_mb", type=float, help="gRPC message limit (default 64)")
    g.add_argument("--timeout", dest="default_timeout_s", type=float,
                   help="deadline for requests that set none, seconds (default 30)")
    g.add_argument("--grace", dest="grace_s", type=float, help="seconds to finish requests on SIGTERM (default 10)")
    g.add_argument("--max-inflight-per-worker", dest="max_inflight_per_worker", type=int,
                   help="credits per worker and frontend (default 2 x MAX_BATCH_SIZE)")
    g.add_argument("--torch-threads", dest="torch_threads", type=int, help="CPU threads per worker (default: its cores)")
    g.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING (default INFO)")
    g.add_argument("--max-pending", dest="max_pending", type=int,
                   help="requests a frontend admits at once; more are refused with RESOURCE_EXHAUSTED (default 256)")
    g.add_argument("--log-max-mb", dest="log_max_mb", type=float,
                   help="with --log-dir: rotate each process's log at this size (default 0: never; use logrotate)")
    g.add_argument("--log-backups", dest="log_backups", type=int, help="rotated log files kept (default 3)")
    g.add_argument("--fork-workers", dest="fork_workers", action=argparse.BooleanOptionalAction, default=None,
                   help="fork workers from a process with torch and the engines imported, so a restarted "
                        "worker starts seconds sooner (default on)")
    g.add_argument("--jpeg-decode", dest="jpeg_decode", choices=JPEG_DECODE_CHOICES,
                   help="where JPEG color images are decoded: frontend (CPU: detectron2's pixels; default), worker "
                        "(sent compressed; its GPU where the engine can), auto (worker when the model's workers "
                        "decode JPEG on a GPU)")
    g.add_argument("--decode-parts", dest="decode_parts", type=int,
                   help="parts one JPEG or PNG may be decoded in at once where its file allows (the client "
                        "library's do): 0 from the cores (default), 1 never")
    g.add_argument("--preload-kernels", dest="preload_kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the fast engine's Triton kernels in several processes while the workers' imports "
                        "run, so that a start with an empty Triton cache is sooner (default on)")
    g.add_argument("--frontend-nice", dest="frontend_nice", type=int,
                   help="nice value of the frontend processes, 0-19: higher lets the workers that feed the GPUs "
                        "run first when the cores are all busy (default 0)")
    lim = p.add_argument_group("limits against hostile and clumsy clients (docs/operations.md, Limits)")
    lim.add_argument("--max-jpeg-scans", dest="max_jpeg_scans", type=int,
                     help="scans one JPEG may have, counted before decoding (default 32)")
    lim.add_argument("--max-request-id-bytes", dest="max_request_id_bytes", type=int,
                     help="longest request_id accepted (default 256)")
    lim.add_argument("--stream-window", dest="stream_window", type=int,
                     help="requests of one DetectStream in flight, at most half of --ring-slots (default 8)")
    lim.add_argument("--max-held-response-mb", dest="max_held_response_mb", type=float,
                     help="finished responses a frontend holds for clients that do not read them; beyond, new "
                          "requests get RESOURCE_EXHAUSTED (default 256)")
    lim.add_argument("--max-concurrent-calls", dest="max_concurrent_calls", type=int,
                     help="calls a frontend runs at once; more wait (default 512)")
    lim.add_argument("--max-streams-per-connection", dest="max_streams_per_connection", type=int,
                     help="HTTP/2 concurrent streams per connection (default 256)")
    lim.add_argument("--max-connections", dest="max_connections", type=int,
                     help="connections per frontend; more are closed at once (default 1024)")
    lim.add_argument("--idle-timeout", dest="idle_timeout_s", type=float,
                     help="close a connection without calls after this many seconds (default 60)")
    lim.add_argument("--handshake-timeout", dest="handshake_timeout_s", type=float,
                     help="seconds a new connection has to finish its handshake (default 10)")
    lim.add_argument("--keepalive", dest="keepalive_s", type=float,
                     help="ping clients with open calls this often, seconds (default 60)")
    lim.add_argument("--upload-timeout", dest="upload_timeout_s", type=float,
                     help="seconds a Detect request's message may take to arrive (default 60)")
    s = p.add_argument_group("security (default: plaintext, no authentication; see docs/operations.md)")
    s.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain: serve TLS only (needs --tls-key)")
    s.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", dest="tls_client_ca",
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    s.add_argument("--auth-token-file", dest="auth_token_file",
                   help="file holding a bearer token every call must send as 'authorization: Bearer TOKEN' "
                        "(the health service stays open)")
    s.add_argument("--allow-client-shm", dest="allow_client_shm", action="store_true", default=None,
                   help="let local clients of this user register system shared-memory regions (KServe/Triton "
                        "SystemSharedMemoryRegister) and pass tensors through them (default off; docs/kserve.md)")
    p.add_argument("--server-json", dest="server_json", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", dest="parent_pid", type=int, help=argparse.SUPPRESS)


_SERVER_KEYS = tuple(f.name for f in dataclasses.fields(ServerConfig))  # flags use the same names


def _server_config(args: argparse.Namespace) -> ServerConfig:
    if getattr(args, "server_json", None):
        return load_server_config(None, json.loads(args.server_json))
    return load_server_config(args.config, {k: getattr(args, k, None) for k in _SERVER_KEYS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deep-detection", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve one model folder, a node_config.json, or a folder of model folders")
    serve.add_argument("path", nargs="?", default=None,
                       help=f"model folder, node_config.json or model repository (default: ${NODE_CONFIG_ENV} "
                            f"when set, else the built-in demo models in {BUILTIN_MODELS})")
    _server_flags(serve)

    worker = sub.add_parser("worker", help="run one worker process (one engine instance)")
    worker.add_argument("path", help="the same PATH as given to serve")
    worker.add_argument("--model", required=True, help="which model of PATH this worker serves")
    worker.add_argument("--index", type=int, default=0, help="instance number, unique per model (default 0)")
    worker.add_argument("--gpu", type=int, default=None, help="GPU index; -1 for the CPU (default: GPU 0 if any)")
    worker.add_argument("--cpus", help="cores to pin to, e.g. 0-7,16-23")
    _server_flags(worker)

    frontend = sub.add_parser("frontend", help="run one gRPC frontend process")
    frontend.add_argument("path", help="the same PATH as given to serve")
    _server_flags(frontend)

    inspect = sub.add_parser("inspect", help="print what the server understands of a model folder (weights format, "
                             "network, input channels and normalisation, resize, classes, thresholds, engine) "
                             "without serving; exit 0, or 2 with the reason")
    inspect.add_argument("path", help="model folder, node_config.json or model repository")

    export = sub.add_parser("export", help="export a model folder's network as an ONNX graph in a new model folder "
                            "(served by ENGINE onnxruntime, or built into a TensorRT engine): docs/tensorrt.md")
    export.add_argument("path", help="the model folder (torchvision or detectron2 weights)")
    export.add_argument("-o", "--output", required=True, help="the new model folder to write")
    export.add_argument("--format", default="onnx", choices=["onnx", "tensorrt-onnx"],
                        help="onnx: for ONNX Runtime (default); tensorrt-onnx: NVIDIA's detectron2 sample layout with "
                             "EfficientNMS_TRT and PyramidROIAlign_TRT, for trtexec")
    export.add_argument("--size", help="the fixed input canvas HEIGHTxWIDTH, multiples of 32 (default: MIN_SIZE x "
                        "MAX_SIZE rounded up to 32)")
    export.add_argument("--batch", type=int, default=1, help="images per run of the graph (default 1)")
    export.add_argument("--dynamic", action="store_true", help="a dynamic batch dimension (--format onnx)")
    export.add_argument("--score-threshold", dest="score_threshold", type=float,
                        help="tensorrt-onnx: the threshold baked into EfficientNMS_TRT (default the model's)")

    from dd.client import cli as client_cli

    client_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "client":
        return args.func(args)
    if args.command == "inspect":
        return _inspect(args.path)
    if args.command == "export":
        return _export(args)
    from dd.procutil import raise_open_files_limit, setup_logging

    source = "PATH"
    if args.command == "serve":
        args.path, source = serve_path(args.path)
    try:
        server = _server_config(args)
        try:
            models = discover_models(args.path)
        except ConfigError as exc:
            if source == f"${NODE_CONFIG_ENV}":
                raise ConfigError(f"{NODE_CONFIG_ENV}={args.path} (serve was given no PATH): {exc}") from None
            raise
        if args.command in ("serve", "frontend") and not getattr(args, "server_json", None):
            from dd.frontend.auth import check_security

            check_security(server)
        if server.log_dir:  # created here, so that a bad one is one line, not a traceback from the logging setup
            try:
                os.makedirs(server.log_dir, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the log folder {server.log_dir} ({exc.strerror or exc}); choose "
                                  "another --log-dir") from None
    except ConfigError as exc:
        print(f"deep-detection: configuration error: {exc}", file=sys.stderr)
        return 2

    raise_open_files_limit()  # every connection is a file; the children inherit the raised limit
    logs = dict(max_mb=server.log_max_mb, backups=server.log_backups)
    if args.command == "serve":
        from dd.ipc.endpoints import EndpointError
        from dd.ipc.shm_ring import RingError
        from dd.supervisor import LoadFailed, Supervisor

        setup_logging(server.log_level, "supervisor", server.log_dir, **logs)
        if source != "PATH":
            logging.getLogger("dd.supervisor").info("no PATH given: serving %s (%s)", args.path, source)
        try:
            return Supervisor(Path(args.path).resolve(), models, server).run()
        except (ConfigError, RingError, EndpointError) as exc:
            print(f"deep-detection: {exc}", file=sys.stderr)
            return 2
        except LoadFailed as exc:
            print(f"deep-detection: {exc}", file=sys.stderr)
            return 3

    run_dir = server.resolved_run_dir()
    if args.command == "worker":
        match = [m for m in models if m.name == args.model]
        if not match:
            print(f"deep-detection: model {args.model!r} is not in {args.path}; it has "
                  f"{', '.join(m.name for m in models)}", file=sys.stderr)
            return 2
        setup_logging(server.log_level, f"worker-{args.model}.{args.index}", server.log_dir, **logs)
        from dd.ipc.endpoints import EndpointError, prepare_run_dir
        from dd.worker.server import Worker, pin_process

        cpus = _parse_cpus(args.cpus)
        gpu = args.gpu
        if gpu is None:
            from dd.supervisor import visible_gpus

            gpu = 0 if visible_gpus() else -1
        device = pin_process(gpu, cpus, server.torch_threads)
        if device.startswith("cuda"):  # the context while the engine builds its model on the CPU
            from dd.worker.cuda_context import create_ahead

            create_ahead(0)
        try:
            run_dir = prepare_run_dir(run_dir)
        except EndpointError as exc:
            print(f"deep-detection: {exc}", file=sys.stderr)
            return 2
        return Worker(match[0], server, args.index, run_dir, device, args.parent_pid).run()

    if args.command == "frontend":
        from dd.procutil import lower_priority

        lower_priority(server.frontend_nice)  # before the frontend starts its threads: they inherit it
        setup_logging(server.log_level, "frontend", server.log_dir, **logs)
        from dd.ipc.endpoints import EndpointError, prepare_run_dir
        from dd.frontend.server import run_frontend

        try:
            run_dir = prepare_run_dir(run_dir)
        except EndpointError as exc:
            print(f"deep-detection: {exc}", file=sys.stderr)
            return 2
        return run_frontend(models, server, run_dir, args.parent_pid)
    parser.error(f"unknown command {args.command}")
    return 2


def _inspect(path: str) -> int:
    """Every model of PATH described, its weights read and fitted to its network; 2 at the first problem."""
    from dd.models.inspection import check_weights, describe

    try:
        models = discover_models(path)
        for i, model in enumerate(models):
            print(("\n" if i else "") + "\n".join(describe(model, check_weights(model))))
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"deep-detection: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    """Exports one model folder; prints what was written and checked, or the one-line reason (exit 2)."""
    try:
        from dd.export.onnx_export import export_model, parse_size

        size = parse_size(args.size) if args.size else None
        report = export_model(args.path, args.output, fmt=args.format, size=size, batch=args.batch,
                              dynamic=args.dynamic, score_threshold=args.score_threshold)
    except (ConfigError, ValueError, RuntimeError) as exc:  # ExportError is a ValueError
        print(f"deep-detection: export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def _parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    from dd.procutil import parse_cpulist

    return parse_cpulist(text)


