"""The frontend process: its lifecycle around a grpc.aio server in front of the workers.

Stateless but for the requests in flight: it validates, decodes into its own
shared-memory ring, sends a control message to a worker and hands the worker's
serialized response back to the client as it is. Several frontends may share one port
(SO_REUSEPORT), each with its own ring, so decoding scales over cores.

This module owns the process: the ring, the slots, the dispatcher, the gRPC
server and its options, health, signals and shutdown. The request path
(admission, decode, dispatch) is dd.frontend.requests, protocol-free; each public
protocol is an adapter in dd/frontend/protocols/ registered here (ADAPTERS): it
exposes SERVICE_NAMES and handlers(request_path).

Every request is bounded (dd.frontend.requests), and so is what one client can make
the frontend hold or do for it (docs/operations.md, "Limits"): connections (a cap, an
idle timeout, a handshake timeout, keepalive), calls (at once per frontend and per
connection), the time a Detect message may take to arrive, the length of request_id,
finished responses that wait for a client that does not read them, the slots one
stream may hold, and the cost of decoding an image (dd.frontend.decode). Nothing a
client sent is echoed or logged unclipped (dd.logsafe).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dd.config import ModelConfig, ServerConfig, default_model_name
from dd.frontend.auth import TokenAuth, read_token, server_credentials
from dd.frontend.client_shm import ClientShmRegistry
from dd.frontend.decode import set_parts as set_decode_parts
from dd.frontend.decode import warm_up as warm_up_decoding
from dd.frontend.dispatcher import Dispatcher
from dd.frontend.protocols import detector_v1, kserve_v2
from dd.frontend.requests import RequestPath
from dd.frontend.slots import SlotPool
from dd.ipc import endpoints
from dd.ipc.shm_ring import ShmRing, remove_stale_segments, segment_name
from dd.listen_address import CannotListen, listen_problem
from dd.metrics import Recorder
from dd.procutil import EXIT_CONFIG, die_with_parent, parent_alive, return_large_allocations

log = logging.getLogger("dd.frontend")

# The public protocols this frontend serves: modules with SERVICE_NAMES and handlers(RequestPath).
# kserve_v2 is also served alone on --kserve-port (KSERVE_ADAPTERS).
ADAPTERS = (detector_v1, kserve_v2)
KSERVE_ADAPTERS = (kserve_v2,)
ORPHAN_GRACE_S = 1.0  # the supervisor is gone, and with it the workers: no point waiting longer
KEEPALIVE_TIMEOUT_MS = 20_000  # a client that does not answer a keepalive ping this long is gone
CLIENT_PING_INTERVAL_MS = 10_000  # clients may keepalive-ping this often (gRPC's default allows every 5 min)
FILES_RESERVED = 256  # open files a frontend keeps for itself (shared memory, sockets, logs) below its limit


class Frontend:
    def __init__(self, models: list[ModelConfig], server: ServerConfig, run_dir: Path,
                 parent_pid: int | None = None) -> None:
        self.models = {m.name: m for m in models}
        self.default_model = default_model_name(models)
        self.cfg = server
        self.run_dir = run_dir
        self.parent_pid = parent_pid
        self.tag = endpoints.run_tag(run_dir)
        self.ring: ShmRing | None = None
        self.slots: SlotPool | None = None
        self.dispatcher: Dispatcher | None = None
        self.health = health.aio.HealthServicer()
        self.requests: RequestPath | None = None
        self._stopping = False
        self.client_shm: ClientShmRegistry | None = None

    # -- setup -----------------------------------------------------------------------------
    def _max_inflight(self, model: str) -> int:
        # A model this frontend does not know (a worker of another configuration) gets the minimum.
        return self.cfg.worker_credits(self.models[model].max_batch_size if model in self.models else 1)

    async def serve(self) -> int:
        # Linux sends SIGTERM if the supervisor dies, even while this loop is busy; the watch below
        # is the fallback where prctl is not available.
        die_with_parent(self.parent_pid)
        return_large_allocations()  # request messages of tens of MB go back to the system once freed
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if self.parent_pid:
            # Ctrl-C in a terminal signals the whole process group; the supervisor then stops the
            # frontends first and the workers after them, so that requests in flight finish.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGINT, stop.set)
        interceptors = [TokenAuth(read_token(self.cfg.auth_token_file))] if self.cfg.auth_token_file else []
        for flag, port in self.cfg.listen_ports():  # before anything is created: a port that cannot be had ends it
            problem = listen_problem(self.cfg.host, port, flag, shared=True)
            if problem:
                raise CannotListen(problem)
        remove_stale_segments(self.tag, only_dead=True)
        endpoints.remove_reply_sockets(self.run_dir, only_dead=True)
        self.ring = ShmRing.create(segment_name(self.tag, "fe"), self.cfg.ring_slots, self.cfg.slot_bytes())
        set_decode_parts(self.cfg.decode_parts)
        try:
            warm_up_decoding()  # the decoders' first-call costs here, not in the first request's time
        except Exception:  # noqa: BLE001 - a warm-up only moves first-call costs; requests say more if decoding fails
            log.exception("frontend: warming up the decoders failed; the first requests pay their first calls")
        recorder = Recorder()  # counts nothing unless the supervisor turned metrics on (dd/metrics.py)
        self.slots = SlotPool(self.ring, recorder)
        self.dispatcher = Dispatcher(self.run_dir, self._max_inflight, on_change=self._update_health,
                                     recorder=recorder, models=tuple(self.models), ring=self.ring.name)
        server = grpc.aio.server(interceptors=interceptors, options=self._grpc_options(),
                                 maximum_concurrent_rpcs=self.cfg.max_concurrent_calls)
        self.requests = RequestPath(self.models, self.default_model, self.cfg, self.ring, self.slots,
                                    self.dispatcher)
        # One set of handlers per adapter, shared by both ports (an adapter's state, such as KServe's
        # statistics, is then one per process).
        # Client shared memory (--allow-client-shm): registrations shared with the other frontends
        # through the run directory; KServe's system shared-memory calls and tensor parameters use it.
        self.client_shm = ClientShmRegistry(self.run_dir) if self.cfg.allow_client_shm else None
        handlers = {adapter: tuple(adapter.handlers(self.requests, shm=self.client_shm) if adapter is kserve_v2
                                   else adapter.handlers(self.requests)) for adapter in ADAPTERS}
        creds = server_credentials(self.cfg)
        servers = [server]
        try:
            self._add_services(server, ADAPTERS, handlers, self.cfg.port, creds)
            if self.cfg.kserve_port:  # KServe alone, as Triton's own gRPC port: its service, health, reflection
                kserver = grpc.aio.server(interceptors=interceptors, options=self._grpc_options(),
                                          maximum_concurrent_rpcs=self.cfg.max_concurrent_calls)
                servers.append(kserver)
                self._add_services(kserver, KSERVE_ADAPTERS, handlers, self.cfg.kserve_port, creds, "--kserve-port")
        except CannotListen:  # taken since the check above
            self._release()
            raise
        await self.dispatcher.start()
        for s in servers:
            await s.start()
        self._update_health()
        security = ("mutual TLS" if self.cfg.tls_client_ca else "TLS" if creds else "plaintext") + \
            (", bearer token" if interceptors else ", no authentication")
        log.info("frontend pid %d serving %s on %s, %s (ring %s: %d slots of %.1f MiB)", os.getpid(),
                 ", ".join(self.models), self.cfg.listen_address(), security, self.ring.name, self.ring.slots,
                 self.ring.slot_bytes / 2**20)

        grace = self.cfg.grace_s
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            if not parent_alive(self.parent_pid):
                break
        if not parent_alive(self.parent_pid):  # also when PR_SET_PDEATHSIG's SIGTERM woke us
            log.warning("supervisor is gone; frontend exits")
            grace = min(grace, ORPHAN_GRACE_S)
        self._stopping = True
        self.requests.stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("frontend stopping: finishing %d request(s) in flight (grace %.0f s)",
                 self.requests.pending, grace)
        await asyncio.gather(*(s.stop(grace) for s in servers))
        await self.dispatcher.close()
        self._release()
        log.info("frontend stopped")
        return 0

    def _release(self) -> None:
        """The request path, the ring (unlinked: no frontend outlives its ring) and this process's client
        shared-memory mappings (the supervisor removes the registrations)."""
        self.requests.close()
        self.ring.close()
        self.ring.unlink()
        if self.client_shm is not None:
            self.client_shm.close()

    def _add_services(self, server: grpc.aio.Server, adapters: tuple, handlers: dict, port: int,
                      creds: grpc.ServerCredentials | None, flag: str = "--port") -> None:
        """The adapters' services, health and reflection on `server`, listening on `port` of the host."""
        for adapter in adapters:
            server.add_generic_rpc_handlers(handlers[adapter])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*(n for a in adapters for n in a.SERVICE_NAMES), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        listen(server, self.cfg, port, creds, flag)

    def _grpc_options(self) -> list[tuple[str, int]]:
        return grpc_options(self.cfg)

    # -- health ----------------------------------------------------------------------------
    def _update_health(self) -> None:
        """SERVING once every model has a ready worker, leaving out models that failed to load (they
        will not come up by waiting, and must not keep the others out of a load balancer's rotation;
        ListModels says why). Each model also has its own entry: Check(service=MODEL_NAME)."""
        if self.dispatcher is None or self._stopping:
            return
        ready = {m: self.dispatcher.ready_workers(m) > 0 for m in self.models}
        failed = {m for m in self.models if not ready[m] and self.dispatcher.model_error(m)}
        ok = any(ready.values()) and all(ready[m] for m in self.models if m not in failed)
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        per_model = {m: serving if ready[m] else not_serving for m in self.models}
        asyncio.get_running_loop().create_task(self._set_health(serving if ok else not_serving, per_model))

    @staticmethod
    def _service_names() -> list[str]:
        return [name for adapter in ADAPTERS for name in adapter.SERVICE_NAMES]

    async def _set_health(self, status: int, per_model: dict[str, int] | None = None) -> None:
        for name in ("", *self._service_names()):
            await self.health.set(name, status)
        for name in self.models:
            await self.health.set(name, status if per_model is None else per_model[name])


def run_frontend(models: list[ModelConfig], server: ServerConfig, run_dir: Path, parent_pid: int | None) -> int:
    """The frontend's exit status: 0 once stopped, EXIT_CONFIG (one line logged) if it cannot listen."""
    try:
        return asyncio.run(Frontend(models, server, run_dir, parent_pid).serve())
    except CannotListen as exc:
        log.error("frontend: %s", exc)
    # gRPC's servers are in the exception's reference cycle: freed now, while gRPC's threads can still
    # run, rather than by the collector at exit (grpc/grpc#22365: that can hang).
    gc.collect()
    return EXIT_CONFIG


def listen(server: grpc.aio.Server, cfg: ServerConfig, port: int, creds: grpc.ServerCredentials | None,
           flag: str) -> None:
    """`server` listens on `port` of cfg's host (a unix: host: its socket file), or CannotListen says why not."""
    address = cfg.listen_address(port)
    try:  # gRPC raises RuntimeError where it cannot bind (older releases return port 0)
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise CannotListen(listen_problem(cfg.host, port, flag, shared=True)
                           or f"cannot listen on {address} ({flag}); gRPC's log above says why")


def grpc_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's own limits: messages, connections (cap, idle, handshake, keepalive), streams per connection."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    connections = cfg.max_connections
    if soft != resource.RLIM_INFINITY and connections > soft - FILES_RESERVED:
        connections = max(16, soft - FILES_RESERVED)
        log.warning("max_connections %d lowered to %d: this process may open %d files (ulimit -n); "
                    "raise the hard limit to allow more", cfg.max_connections, connections, soft)
    return [
        ("grpc.max_receive_message_length", int(cfg.max_message_mb * 2**20)),
        ("grpc.max_send_message_length", int(cfg.max_message_mb * 2**20)),
        ("grpc.so_reuseport", 1),
        ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", connections),
        ("grpc.max_connection_idle_ms", int(cfg.idle_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(cfg.handshake_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_INTERVAL_MS),
    ]
