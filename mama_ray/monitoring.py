"""The run's Prometheus series for the Ray dashboard: training, data pipeline and ingest.

``ray.train.report`` metrics never reach Prometheus (only Ray's own ``ray_train_*`` series do), so
this module is the one place that defines our ``ray.util.metrics`` series — all named
``mama_ray_*`` (Ray serves them as ``ray_mama_ray_*``, counters with a ``_total`` suffix) — and
feeds them from the places that already have the numbers:

* **training** (:func:`publish_train`): the metrics dict the loop reports every
  ``train.log_every`` steps, mapped key by key (:func:`train_points`), so a new key (a loss term,
  a ``val_*`` metric, MFU) needs no new code. Values the ranks share (they are rank means) come
  from rank 0 only, tagged with the run; values that differ by rank (step time, peak memory) come
  from every rank, tagged with the rank too.
* **data pipeline** (:class:`DataMonitor`): per rank, samples delivered, seconds waited, reorder
  buffer depth and the time to an epoch's first batch.
* **ingest** (:class:`IngestMonitor`): per output, images, quarantined inputs by reason kind,
  shards and bytes written, from the driver's shard receipts.

Publishing is a few host-side calls where the numbers already are on the host: nothing here
reads a device tensor. Outside a Ray worker or driver (a local test, a benchmark) every call is a
no-op. The Grafana dashboard ``cluster/grafana/mama-ray.json`` plots exactly :data:`SERIES`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Series:
    """One exported series: its name (before Ray's ``ray_`` prefix), kind, tags and dashboard group."""

    name: str
    kind: str  # "gauge" | "counter"
    tags: tuple[str, ...]
    group: str  # "train" | "rank" | "val" | "data" | "ingest": the Grafana dashboard's row
    help: str

    @property
    def prometheus_name(self) -> str:
        """The name Ray's metrics endpoint serves (and Grafana queries)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


RUN, RANK = ("run",), ("run", "rank")
SERIES: tuple[Series, ...] = (
    Series("mama_ray_train_loss", "gauge", (*RUN, "term"), "train",
           "loss terms ('loss' is the weighted total): window mean over micro-batches and ranks"),
    Series("mama_ray_train_lr", "gauge", (*RUN, "group"), "train", "learning rate of the main and the late group"),
    Series("mama_ray_train_samples_per_s", "gauge", RUN, "train", "training samples per second, all ranks"),
    Series("mama_ray_train_pairs_per_s", "gauge", RUN, "train",
           "training pairs (samples) per second per device: what MFU is computed from"),
    Series("mama_ray_train_data_wait_fraction", "gauge", RUN, "train",
           "share of the window's wall time spent waiting for batches, mean over ranks"),
    Series("mama_ray_train_steps", "gauge", RUN, "train", "optimizer steps done"),
    Series("mama_ray_train_epoch", "gauge", RUN, "train", "epoch the loop is in"),
    Series("mama_ray_train_eta_seconds", "gauge", RUN, "train", "estimated seconds to train.max_steps"),
    Series("mama_ray_train_mfu", "gauge", RUN, "train", "model FLOP utilisation (when the loop reports 'mfu')"),
    Series("mama_ray_train_scale", "gauge", (*RUN, "which"), "train", "learnt logit scales, exp(logit)"),
    Series("mama_ray_train_value", "gauge", (*RUN, "key"), "train", "any other reported number, by key"),
    Series("mama_ray_train_step_seconds", "gauge", RANK, "rank", "seconds per optimizer step on this rank"),
    Series("mama_ray_train_peak_memory_mib", "gauge", RANK, "rank",
           "peak device memory (CUDA allocator) or peak RSS (CPU) of this rank"),
    Series("mama_ray_val_metric", "gauge", (*RUN, "key"), "val", "validation metrics (reported 'val_<key>')"),
    Series("mama_ray_data_samples", "counter", RANK, "data", "training samples the pipeline delivered to this rank"),
    Series("mama_ray_data_wait_seconds", "counter", RANK, "data",
           "seconds this rank blocked waiting for a batch (its rate is the rank's data-wait fraction)"),
    Series("mama_ray_data_reorder_buffer_samples", "gauge", RANK, "data",
           "samples held in this rank's reorder buffer after its latest batch"),
    Series("mama_ray_data_first_batch_seconds", "gauge", (*RANK, "epoch"), "data",
           "seconds from asking for an epoch to its first batch (about 0 when the epoch was prefetched)"),
    Series("mama_ray_ingest_images", "counter", ("dataset",), "ingest", "images written into shards"),
    Series("mama_ray_ingest_quarantined", "counter", ("dataset", "reason"), "ingest",
           "inputs quarantined, by reason kind (as the manifest's quarantine_reasons)"),
    Series("mama_ray_ingest_shards", "counter", ("dataset",), "ingest", "shard files written"),
    Series("mama_ray_ingest_bytes", "counter", ("dataset",), "ingest", "shard bytes written"),
)
BY_NAME = {s.name: s for s in SERIES}

# Reported keys with a series of their own (every other key is mapped by pattern, see train_points).
DIRECT = {"samples_per_s": "mama_ray_train_samples_per_s", "data_wait_frac": "mama_ray_train_data_wait_fraction",
          "step": "mama_ray_train_steps", "epoch": "mama_ray_train_epoch", "mfu": "mama_ray_train_mfu"}
PER_RANK = {"step_time_s": "mama_ray_train_step_seconds", "memory_mb": "mama_ray_train_peak_memory_mib"}
SKIP = {"start_step"}  # bookkeeping, not a measurement

Point = tuple[str, dict[str, str], float]  # (series name, tags other than run/rank, value)


def train_points(metrics: dict[str, Any], rank: int, world_size: int = 1, eta_s: float | None = None) -> list[Point]:
    """The series values one rank publishes for one report.

    Rank 0 maps every numeric key: ``val_<k>`` → the validation series, ``loss``/``*_loss`` → the
    loss series by term, ``lr``/``lr_<g>`` → the learning rate by group, ``*_scale`` → the scales,
    the :data:`DIRECT` keys → their own series, anything else → ``mama_ray_train_value{key=…}``.
    Every rank publishes its :data:`PER_RANK` keys.
    """
    out: list[Point] = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key in SKIP:
            continue
        if key in PER_RANK:
            out.append((PER_RANK[key], {}, float(value)))
        elif rank == 0:
            out.append(_shared_point(key, float(value)))
    if rank == 0:
        if "samples_per_s" in metrics:  # a pair is one training sample (mama_ray.models.flops)
            out.append(("mama_ray_train_pairs_per_s", {}, float(metrics["samples_per_s"]) / world_size))
        if eta_s is not None:
            out.append(("mama_ray_train_eta_seconds", {}, float(eta_s)))
    return out


def _shared_point(key: str, value: float) -> Point:
    if key in DIRECT:
        return DIRECT[key], {}, value
    if key.startswith("val_"):  # before the loss rule: val_loss is a validation metric
        return "mama_ray_val_metric", {"key": key[4:]}, value
    if key == "loss" or key.endswith("_loss"):
        return "mama_ray_train_loss", {"term": key}, value
    if key == "lr" or key.startswith("lr_"):
        return "mama_ray_train_lr", {"group": key[3:] or "main"}, value
    if key.endswith("_scale"):
        return "mama_ray_train_scale", {"which": key.removesuffix("_scale")}, value
    return "mama_ray_train_value", {"key": key}, value


# ------------------------------------------------------------------------------------------
# Ray metric objects (one per series and process, created on first use)
# ------------------------------------------------------------------------------------------

_METRICS: dict[str, Any] = {}


class _GaugeKeeper:
    """Sets every gauge again each half export interval, for as long as this process lives.

    Ray 2.60's metrics agent drops a gauge value that was not set again within two export
    intervals (``RAY_metrics_report_interval_ms``, 10 s by default), so a loss set once per report
    would blink out between reports. Measured on a ``ray start --head`` with 1-s exports: a gauge
    set once by a live driver left the endpoint ≈ 2 s after it appeared; one kept by this class
    stayed until the driver exited and was gone ≈ 1 s later. Counters need no keeper (they stay).
    """

    def __init__(self) -> None:
        self.last: dict[tuple[str, tuple], float] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def set(self, name: str, tags: dict[str, str], value: float) -> None:
        with self.lock:
            self.last[(name, tuple(sorted(tags.items())))] = value
            _metric(name).set(value, tags=tags)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mama-metrics-gauges", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        period = _export_interval_s() / 2
        while True:
            time.sleep(period)
            if not _enabled():  # after ray.shutdown() (tests, benchmarks) there is nothing to keep
                continue
            with self.lock:
                for (name, tags), value in self.last.items():
                    _metric(name).set(value, tags=dict(tags))


def _export_interval_s() -> float:
    """Ray's metrics export interval (``RAY_metrics_report_interval_ms``, at least 1 s)."""
    try:
        import ray  # why: metrics are a no-op without Ray; ingest, stream and loop import this module anyway

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    except Exception:  # noqa: BLE001 - a private API: fall back to Ray's default
        return 10.0


_GAUGES = _GaugeKeeper()


def _enabled() -> bool:
    try:
        import ray  # why: metrics are a no-op without Ray; ingest, stream and loop import this module anyway
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def _metric(name: str):
    if name not in _METRICS:
        # why: metrics are a no-op without Ray; ingest, stream and loop import this module anyway
        from ray.util import metrics

        s = BY_NAME[name]
        cls = metrics.Gauge if s.kind == "gauge" else metrics.Counter
        _METRICS[name] = cls(s.name, description=s.help, tag_keys=s.tags)
    return _METRICS[name]


def _record(points: list[Point], base: dict[str, str]) -> None:
    """Set gauges / add to counters; each series gets the tags of ``base`` it declares plus its own."""
    for name, tags, value in points:
        s = BY_NAME[name]
        tags = {k: v for k, v in {**base, **tags}.items() if k in s.tags}
        if s.kind == "gauge":
            _GAUGES.set(name, tags, value)  # a NaN loss is shown as NaN: it is news
        elif value > 0:  # a counter only goes up; Ray rejects 0 and negative increments
            _metric(name).inc(value, tags=tags)


def publish_train(run: str, rank: int, world_size: int, metrics: dict[str, Any], eta_s: float | None = None) -> None:
    """Publish one report of the training loop (every rank calls it where it reports)."""
    if _enabled():
        _record(train_points(metrics, rank, world_size, eta_s), {"run": run, "rank": str(rank)})


class DataMonitor:
    """One rank's pipeline series for one epoch: call :meth:`batch` after each delivered micro-batch."""

    def __init__(self, run: str, rank: int, epoch: int):
        self.enabled = _enabled()
        self.tags = {"run": run, "rank": str(rank)}
        self.epoch = epoch
        self.asked = time.perf_counter()
        self.first = True

    def batch(self, samples: int, wait_s: float, buffered: int) -> None:
        """A micro-batch of ``samples`` arrived after ``wait_s`` s; ``buffered`` samples wait in the reorder buffer."""
        if not self.enabled:
            return
        points: list[Point] = [("mama_ray_data_samples", {}, float(samples)),
                               ("mama_ray_data_wait_seconds", {}, wait_s),
                               ("mama_ray_data_reorder_buffer_samples", {}, float(buffered))]
        if self.first:
            self.first = False
            points.append(("mama_ray_data_first_batch_seconds", {"epoch": str(self.epoch)},
                           time.perf_counter() - self.asked))
        _record(points, self.tags)


class IngestMonitor:
    """Ingest counters of one output, fed from the driver's shard receipts."""

    def __init__(self, out: str):
        self.enabled = _enabled()
        self.tags = {"dataset": out}

    def quarantined(self, by_kind: dict[str, int]) -> None:
        """Inputs quarantined, counted by reason kind (``ingest.reason_kind``, as in the manifest)."""
        if self.enabled:
            _record([("mama_ray_ingest_quarantined", {"reason": k}, float(n)) for k, n in by_kind.items()], self.tags)

    def shard(self, receipt: dict) -> None:
        """A shard receipt (``images``, ``bytes``, ``file`` or None, ``reasons`` {kind: n}): count it."""
        if not self.enabled:
            return
        _record([("mama_ray_ingest_images", {}, float(receipt["images"])),
                 ("mama_ray_ingest_shards", {}, 1.0 if receipt.get("file") else 0.0),
                 ("mama_ray_ingest_bytes", {}, float(receipt.get("bytes") or 0))], self.tags)
        self.quarantined(receipt.get("reasons") or {})
