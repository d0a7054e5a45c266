"""What deep-detection exports to Prometheus, and the recorder every process calls.

One scrape endpoint (``--metrics-port``, default 8002, as Triton's) shows the sum
over every process of a run: frontends count requests, workers count batches,
the supervisor counts restarts. They are separate processes, so this uses
prometheus-client's multiprocess mode: each process writes its values to
memory-mapped files in one directory (``PROMETHEUS_MULTIPROC_DIR``), and the
endpoint, served by the supervisor, adds the files up at each scrape.

Names. Where Triton has a metric with the same meaning its name and labels
(``model``, ``version``) are used, so that dashboards and alerts written for
Triton work unchanged; the rest are ours, prefixed ``deep_detection_``, in
Prometheus' conventions (seconds, ``_total``). Triton's counters have no
``_total`` suffix, which prometheus-client always adds to a counter; the
endpoint renames those samples back and declares them ``untyped`` (Prometheus
and PromQL treat them the same; only the ``# TYPE`` line differs from
Triton's ``counter``).

Lifecycle (wired by the supervisor; ``deep-detection serve`` only):

1. ``prepare_multiproc_dir(run_dir / "metrics")`` before any child starts: makes
   the directory (0700), removes a previous run's files, and sets
   ``PROMETHEUS_MULTIPROC_DIR`` in ``os.environ`` so that every child inherits it.
2. each process makes one ``Recorder()`` (after that, never before: the variable
   must be set when prometheus-client is first imported; ``Recorder`` checks);
   without the variable (a worker or frontend started on its own) it records
   nothing.
3. ``start_metrics_server(port, multiproc_dir)`` in the supervisor.
4. ``process_exited(pid, multiproc_dir)`` when the supervisor reaps a child: the
   gauges it held (ring slots) stop counting; its counters keep counting, so
   totals never go back when a worker restarts.
5. ``remove_multiproc_dir(multiproc_dir)`` at shutdown.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# --- Triton's names (same meaning; labels model, version) --------------------
REQUEST_SUCCESS = "nv_inference_request_success"          # requests answered OK
REQUEST_FAILURE = "nv_inference_request_failure"          # requests failed; label reason
INFERENCE_COUNT = "nv_inference_count"                    # images inferred (a batch of n counts n)
EXEC_COUNT = "nv_inference_exec_count"                    # engine calls (batches)
REQUEST_DURATION_US = "nv_inference_request_duration_us"  # cumulative end-to-end time of OK requests
QUEUE_DURATION_US = "nv_inference_queue_duration_us"      # cumulative time waiting for a worker / a batch
COMPUTE_INPUT_DURATION_US = "nv_inference_compute_input_duration_us"    # worker input preparation
COMPUTE_INFER_DURATION_US = "nv_inference_compute_infer_duration_us"    # the engine
COMPUTE_OUTPUT_DURATION_US = "nv_inference_compute_output_duration_us"  # masks, RLE, response encoding
TRITON_COUNTERS = (REQUEST_SUCCESS, REQUEST_FAILURE, INFERENCE_COUNT, EXEC_COUNT, REQUEST_DURATION_US,
                   QUEUE_DURATION_US, COMPUTE_INPUT_DURATION_US, COMPUTE_INFER_DURATION_US,
                   COMPUTE_OUTPUT_DURATION_US)
# Per GPU (label gpu_uuid), read from NVML at each scrape where there is a GPU.
GPU_UTILIZATION = "nv_gpu_utilization"                    # 0.0 - 1.0
GPU_MEMORY_USED_BYTES = "nv_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL_BYTES = "nv_gpu_memory_total_bytes"

# Triton's failure reasons (label reason of nv_inference_request_failure), and
# the gRPC statuses (by name) that fall under each; any other status is OTHER.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
_REASON_OF_STATUS = {"RESOURCE_EXHAUSTED": "REJECTED", "UNAVAILABLE": "REJECTED", "CANCELLED": "CANCELED",
                     "DEADLINE_EXCEEDED": "CANCELED", "INTERNAL": "BACKEND"}

# --- ours ----------------------------------------------------------------------
REQUEST_SECONDS = "deep_detection_request_duration_seconds"          # histogram, OK requests, model
QUEUE_SECONDS = "deep_detection_queue_duration_seconds"              # histogram, model
COMPUTE_INFER_SECONDS = "deep_detection_compute_infer_duration_seconds"  # histogram, model
DECODE_SECONDS = "deep_detection_decode_duration_seconds"            # histogram: frontend image decoding, model
BATCH_SIZE = "deep_detection_batch_size"                             # histogram: images per engine call, model
RING_SLOTS_IN_USE = "deep_detection_ring_slots_in_use"               # gauge, summed over live frontends
RING_SLOTS = "deep_detection_ring_slots"                             # gauge: capacity, summed over live frontends
WORKER_RESTARTS = "deep_detection_worker_restarts_total"             # counter, model

HISTOGRAMS = (REQUEST_SECONDS, QUEUE_SECONDS, COMPUTE_INFER_SECONDS, DECODE_SECONDS, BATCH_SIZE)
# Every name the endpoint can show (histograms add _bucket, _sum and _count).
EXPORTED = (*TRITON_COUNTERS, GPU_UTILIZATION, GPU_MEMORY_USED_BYTES, GPU_MEMORY_TOTAL_BYTES, *HISTOGRAMS,
            RING_SLOTS_IN_USE, RING_SLOTS, WORKER_RESTARTS)

LATENCY_BUCKETS_S = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                     0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DECODE_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


def failure_reason(status_name: str) -> str:
    """Triton's failure reason for a gRPC status name ("RESOURCE_EXHAUSTED" -> "REJECTED")."""
    return _REASON_OF_STATUS.get(status_name, "OTHER")


class Recorder:
    """The calls a process makes to count what it did; cheap (one mmap write each).

    Frontends call ``record_request``, ``record_decode`` and ``set_ring_slots``;
    workers ``record_batch``; the supervisor ``worker_restarted``. Durations are
    in microseconds, as the worker measures them. Every method does nothing
    when metrics are off (no ``PROMETHEUS_MULTIPROC_DIR``).
    """

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.enabled = bool(os.environ.get(MULTIPROC_ENV))
        self._series: dict[str, tuple[Any, ...]] = {}
        if not self.enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram, values
        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                f"prometheus_client was imported before {MULTIPROC_ENV} was set, so this process's metrics "
                "would never reach the endpoint; set it (dd.metrics.prepare_multiproc_dir) before anything "
                "imports prometheus_client")
        lv = ("model", "version")
        kw: dict[str, Any] = {"registry": None}  # the files are the registry: see start_metrics_server
        self._success = Counter(REQUEST_SUCCESS, "Number of successful inference requests, all batch sizes", lv, **kw)
        self._failure = Counter(REQUEST_FAILURE, "Number of failed inference requests, all batch sizes",
                                (*lv, "reason"), **kw)
        self._inferences = Counter(INFERENCE_COUNT, "Number of inferences performed (a batch of n counts n)", lv, **kw)
        self._execs = Counter(EXEC_COUNT, "Number of model executions performed (batches)", lv, **kw)
        self._request_us = Counter(REQUEST_DURATION_US, "Cumulative inference request duration in microseconds "
                                   "(successful requests)", lv, **kw)
        self._queue_us = Counter(QUEUE_DURATION_US, "Cumulative inference queuing duration in microseconds", lv, **kw)
        self._input_us = Counter(COMPUTE_INPUT_DURATION_US, "Cumulative compute input duration in microseconds",
                                 lv, **kw)
        self._infer_us = Counter(COMPUTE_INFER_DURATION_US, "Cumulative compute inference duration in microseconds",
                                 lv, **kw)
        self._output_us = Counter(COMPUTE_OUTPUT_DURATION_US, "Cumulative inference compute output duration in "
                                  "microseconds", lv, **kw)
        self._request_s = Histogram(REQUEST_SECONDS, "End-to-end duration of successful requests", lv,
                                    buckets=LATENCY_BUCKETS_S, **kw)
        self._queue_s = Histogram(QUEUE_SECONDS, "Time a request waited for a worker and a batch", lv,
                                  buckets=LATENCY_BUCKETS_S, **kw)
        self._infer_s = Histogram(COMPUTE_INFER_SECONDS, "Engine time of the batch a request ran in", lv,
                                  buckets=LATENCY_BUCKETS_S, **kw)
        self._decode_s = Histogram(DECODE_SECONDS, "Time the frontend took to decode one request's images", lv,
                                   buckets=DECODE_BUCKETS_S, **kw)
        self._batch = Histogram(BATCH_SIZE, "Images per engine call", lv, buckets=BATCH_BUCKETS, **kw)
        self._slots_used = Gauge(RING_SLOTS_IN_USE, "Shared-memory ring slots holding a request, all frontends",
                                 multiprocess_mode="livesum", **kw)
        self._slots = Gauge(RING_SLOTS, "Shared-memory ring slots, all frontends", multiprocess_mode="livesum", **kw)
        self._restarts = Counter(WORKER_RESTARTS, "Workers restarted by the supervisor "
                                 "after they died", ("model",), **kw)

    def _per_model(self, model: str) -> tuple[Any, ...]:
        """The labelled series of one model, looked up once: ``labels()`` costs more than the write."""
        series = self._series.get(model)
        if series is None:
            labels = (model, self.version)
            series = tuple(m.labels(*labels) for m in (
                self._success, self._request_us, self._queue_us, self._input_us, self._infer_us, self._output_us,
                self._request_s, self._queue_s, self._infer_s, self._decode_s, self._execs, self._inferences,
                self._batch))
            self._series[model] = series
        return series

    def record_request(self, model: str, ok: bool, duration_us: float, queue_us: float = 0.0,
                       input_us: float = 0.0, infer_us: float = 0.0, output_us: float = 0.0,
                       status: str = "OK") -> None:
        """One request answered (``ok``) or failed (``status``: its gRPC status name).
        Durations count for successful requests only, as Triton's do, so that
        duration / success is the mean latency."""
        if not self.enabled:
            return
        if not ok:
            self._failure.labels(model, self.version, failure_reason(status)).inc()
            return
        success, request_us, queue_c, input_c, infer_c, output_c, request_s, queue_s, infer_s = \
            self._per_model(model)[:9]
        success.inc()
        request_us.inc(duration_us)
        queue_c.inc(queue_us)
        input_c.inc(input_us)
        infer_c.inc(infer_us)
        output_c.inc(output_us)
        request_s.observe(duration_us / 1e6)
        queue_s.observe(queue_us / 1e6)
        infer_s.observe(infer_us / 1e6)

    def record_batch(self, model: str, batch_size: int) -> None:
        """One engine call on ``batch_size`` images (the worker, once per batch)."""
        if not self.enabled:
            return
        execs, inferences, batch = self._per_model(model)[10:]
        execs.inc()
        inferences.inc(batch_size)
        batch.observe(batch_size)

    def record_decode(self, model: str, duration_us: float) -> None:
        if self.enabled:
            self._per_model(model)[9].observe(duration_us / 1e6)

    def set_ring_slots(self, in_use: int, capacity: int | None = None) -> None:
        """This frontend's ring: slots holding a request now, and (once, at start) all its slots."""
        if self.enabled:
            self._slots_used.set(in_use)
            if capacity is not None:
                self._slots.set(capacity)

    def worker_restarted(self, model: str) -> None:
        if self.enabled:
            self._restarts.labels(model).inc()


# --- the directory ---------------------------------------------------------------

def prepare_multiproc_dir(path: Path) -> Path:
    """Makes ``path`` (0700, this user's), empties it of a previous run's files, and
    sets ``PROMETHEUS_MULTIPROC_DIR`` to it in ``os.environ`` for this process and
    the children it starts. Call once per run, before any process records."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"metrics directory {path} belongs to uid {st.st_uid}, not to this user; "
                              "choose another --run-dir")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    for old in path.glob("*.db"):
        old.unlink()  # a crashed run's counts must not add to this run's
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def process_exited(pid: int, multiproc_dir: Path) -> None:
    """A child is gone: drop the gauges it held (its counters keep their counts)."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid, str(multiproc_dir))


def remove_multiproc_dir(multiproc_dir: Path) -> None:
    """At shutdown, after every process has stopped."""
    for f in multiproc_dir.glob("*.db"):
        f.unlink(missing_ok=True)
    try:
        multiproc_dir.rmdir()
    except OSError:
        pass  # something else was put there; leave it


# --- the endpoint ---------------------------------------------------------------

# The 8-byte header of a prometheus-client value file: a file smaller than this is being created.
_VALUE_FILE_HEADER = 8


def read_multiproc_files(multiproc_dir: Path, attempts: int = 3) -> list[Any]:
    """Every process's value files in ``multiproc_dir``, merged into metric families.

    Not ``MultiProcessCollector.collect()`` as it is: a process creates its file
    empty and sizes it a moment later, and a scrape that reads it in between
    fails with ``struct.error`` (prometheus/client_python#1199), a 500 for the
    whole endpoint. It happened when the supervisor counted its first worker
    restart while a scraper was polling. An empty file holds no values yet, so
    it is left out of this scrape. A file removed between the listing and the
    read (a dead frontend's gauges, or shutdown) makes it list again."""
    from prometheus_client.multiprocess import MultiProcessCollector

    def readable() -> list[str]:
        files = []
        for path in sorted(multiproc_dir.glob("*.db")):
            try:
                if path.stat().st_size >= _VALUE_FILE_HEADER:
                    files.append(str(path))
            except FileNotFoundError:
                continue
        return files

    for _ in range(attempts - 1):
        try:
            return list(MultiProcessCollector.merge(readable(), accumulate=True))
        except FileNotFoundError:
            continue
    return list(MultiProcessCollector.merge(readable(), accumulate=True))


class _TritonNames:
    """The files' metrics, with Triton's counters under Triton's names (no ``_total``)."""

    def __init__(self, multiproc_dir: Path) -> None:
        self._dir = multiproc_dir

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import Metric
        for family in read_multiproc_files(self._dir):
            if family.name in TRITON_COUNTERS and family.type == "counter":
                renamed = Metric(family.name, family.documentation, "unknown")
                for s in family.samples:
                    if s.name == family.name + "_total":
                        renamed.add_sample(family.name, s.labels, s.value)
                yield renamed
            else:
                yield family


class GpuCollector:
    """nv_gpu_utilization, nv_gpu_memory_used_bytes and nv_gpu_memory_total_bytes per
    GPU (label gpu_uuid), read from NVML at each scrape. Without NVML (no driver,
    no GPU, no pynvml) it exports nothing and says so once in the log.

    NVML is loaded at the first scrape, not here: the supervisor creates this before it starts anything
    else, and loading NVML (0.1 s on an H200 host, S19-1) would hold up every start."""

    def __init__(self, gpus: Sequence[int] | None = None, nvml: Any = None) -> None:
        self._gpus = None if gpus is None else list(gpus)
        self._nvml = nvml
        self._loaded = nvml is not None
        self._lock = threading.Lock()
        self._warned: set[int] = set()

    @property
    def available(self) -> bool:
        with self._lock:
            return self._load() is not None

    def _load(self) -> Any:
        """NVML, loaded once (under self._lock)."""
        if not self._loaded:
            self._nvml, self._loaded = _load_nvml(), True
        return self._nvml

    def _devices(self) -> Iterable[int]:
        return self._gpus if self._gpus is not None else range(self._nvml.nvmlDeviceGetCount())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        util = GaugeMetricFamily(GPU_UTILIZATION, "GPU utilization rate (0.0 - 1.0)", labels=["gpu_uuid"])
        used = GaugeMetricFamily(GPU_MEMORY_USED_BYTES, "Used GPU memory, in bytes", labels=["gpu_uuid"])
        total = GaugeMetricFamily(GPU_MEMORY_TOTAL_BYTES, "Total GPU memory, in bytes", labels=["gpu_uuid"])
        with self._lock:  # the HTTP server answers scrapes on several threads
            nvml = self._load()
            if nvml is None:
                return
            for index in self._devices():
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    uuid = nvml.nvmlDeviceGetUUID(handle)
                    uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                except nvml.NVMLError as e:
                    if index not in self._warned:
                        self._warned.add(index)
                        log.warning("GPU %d: NVML cannot read it (%s); its metrics are left out", index, e)
                    continue
                util.add_metric([uuid], rates.gpu / 100.0)
                used.add_metric([uuid], float(memory.used))
                total.add_metric([uuid], float(memory.total))
        yield from (util, used, total)


def _load_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        log.info("no GPU metrics: nvidia-ml-py (pynvml) is not installed")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.info("no GPU metrics: NVML is not available here (%s)", e)
        return None
    return pynvml


# A scrape connection that sends nothing (or never finishes its TLS handshake) for this long is closed.
CONNECTION_TIMEOUT_S = 10.0


def start_metrics_server(port: int, multiproc_dir: Path, host: str = "0.0.0.0",
                         gpus: Sequence[int] | None = None, gpu_collector: GpuCollector | None = None,
                         certfile: str | None = None, keyfile: str | None = None) -> Any:
    """Serves ``/metrics`` on ``host:port`` (port 0: any free one, read it from the
    returned server's ``server_port``) from a daemon thread: the sum of every
    process's files in ``multiproc_dir`` plus the GPUs (all NVML sees, or the
    ``gpus`` indices). Stop it with ``server.shutdown()`` and ``server.server_close()``.
    With ``certfile`` and ``keyfile``, HTTPS (the server's TLS pair).

    Not prometheus-client's ``start_http_server``: that one does the TLS handshake in
    its accepting thread, so one client that connects and sends nothing stops every
    scrape, and it keeps idle connections (a thread each) forever. Here each
    connection gets its own thread, handshake included, and CONNECTION_TIMEOUT_S."""
    import socket
    import socketserver
    import ssl
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_TritonNames(multiproc_dir))
    registry.register(gpu_collector if gpu_collector is not None else GpuCollector(gpus))
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics: a scrape from %s failed", client_address, exc_info=True)

    class Handler(WSGIRequestHandler):
        timeout = CONNECTION_TIMEOUT_S

        def setup(self) -> None:
            self.request.settimeout(self.timeout)
            if isinstance(self.request, ssl.SSLSocket):
                self.request.do_handshake()  # in this connection's thread, bounded by the timeout
            super().setup()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # one line per scrape on stderr otherwise

    server = Server((host, port), Handler)
    server.set_app(make_wsgi_app(registry))
    if certfile and keyfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
