"""How jobs attach to Ray and end: one place for cluster connection, output and exit codes.

A job joins an existing cluster when one is named — ``ray job submit`` sets ``RAY_ADDRESS`` for
its entrypoint, and a user may set it by hand — and starts a local one otherwise. Exit codes are
part of the interface (``ray job submit`` turns a non-zero code into a FAILED job):
``0`` success, ``1`` the work failed, ``2`` the user's input (config, arguments, URIs) is wrong.
Output is line-buffered so a job's progress streams to ``ray job logs`` and to pipes as it happens.

Output has two channels: a job's *results* (tables, the URIs it wrote) are printed to stdout;
everything else goes through :mod:`logging` to stderr, at the level of ``--log-level`` (every job
has it; :func:`job_parser`). Third-party loggers (DeepSpeed, transformers, peft, botocore, urllib3,
Ray Data's console lines) are held at WARNING unless ``--log-level debug``. The level travels to
Ray workers in ``MAMA_LOG_LEVEL`` (local workers inherit it; attached clusters get ``MAMA_*``
forwarded), where :func:`setup_logging` without an argument picks it up. :class:`Progress` is the
one progress line with an ETA (probes, fine-tuning, ingest).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from mama_ray.config import ConfigError
from mama_ray.errors import FatalTrainingError
from mama_ray.storage import StorageError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Logical CPUs a local cluster for training gets at least: ingest, both workers' data streams
# and the evaluation actors must be schedulable at once even on a 2-core laptop.
MIN_TRAINING_CPUS = 6

# Driver variables a cluster's workers need but would not otherwise see: on a `ray start` cluster
# workers inherit the raylet's environment, not the driver's (docs/pitfalls.md).
FORWARDED_PREFIXES = ("AWS_", "DS_", "MAMA_")
# Credentials are never copied into a runtime env: Ray shows runtime envs in the dashboard and
# job API. Cluster nodes get S3 access from their instance profile / IRSA service account.
SECRET_NAMES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                          "AWS_SECURITY_TOKEN"})
# Set by Ray's job manager for the entrypoint of a submitted job (ray._private.runtime_env.constants).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


LOG_ENV = "MAMA_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")
RAY_DATA_CONFIG_PREFIX = "mama-ray-data-logging-"  # ours; a user's own RAY_DATA_LOGGING_CONFIG is kept
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries whose INFO lines drown a job's own: held at WARNING (DEBUG shows them).
QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "transformers", "peft", "huggingface_hub", "urllib3",
                 "botocore", "boto3", "s3transfer", "filelock", "fsspec", "matplotlib", "PIL",
                 "torch.distributed", "ray.data", "ray.train", "ray.tune", "werkzeug", "optuna")


_third_party_level = logging.WARNING  # what setup_logging last chose for QUIET_LOGGERS

DS_ACCELERATOR_ENV = "DS_ACCELERATOR"


def ensure_deepspeed_accelerator(use_gpu: bool) -> None:
    """A run without GPUs makes DeepSpeed use its CPU accelerator (a value already set wins).

    Call it before ``deepspeed`` is first imported in the process: DeepSpeed picks its accelerator
    once, on import (``get_accelerator()`` caches it for the process), by probing for CUDA and other
    devices unless ``DS_ACCELERATOR`` names one — so a CPU run on a machine that has a GPU would
    otherwise take the GPU, and setting the variable after the import changes nothing. The driver's
    environment reaches local Ray workers; attached clusters' workers call this themselves.
    """
    if not use_gpu:
        os.environ.setdefault(DS_ACCELERATOR_ENV, "cpu")


def log_level(name: str | None = None) -> int:
    """``name`` (or ``$MAMA_LOG_LEVEL``, else info) as a logging level number."""
    name = (name or os.environ.get(LOG_ENV) or "info").lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level {name!r}: choose from {', '.join(LOG_LEVELS)}")
    return getattr(logging, name.upper())


def setup_logging(level: str | None = None) -> int:
    """Configure logging for this process (a job's driver or a Ray worker); returns the level.

    Our loggers (``mama_ray.*``) log at ``level``; the :data:`QUIET_LOGGERS` at WARNING or above.
    The level is exported in ``MAMA_LOG_LEVEL`` for the workers this process starts.
    """
    numeric = log_level(level)
    os.environ[LOG_ENV] = logging.getLevelName(numeric).lower()
    logging.basicConfig(level=numeric, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    third_party = max(numeric, logging.WARNING) if numeric > logging.DEBUG else logging.INFO
    global _third_party_level
    _third_party_level = third_party
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(third_party)
    for name in list(logging.root.manager.loggerDict):
        # Ray Train names some loggers by file path (``getLogger(__file__)``), outside "ray.train";
        # at INFO they print every report's whole metrics dict on every rank.
        if name.endswith(".py") and f"{os.sep}ray{os.sep}" in name:
            logging.getLogger(name).setLevel(third_party)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", logging.getLevelName(third_party).lower())
    if "ray" in sys.modules:
        quiet_ray_data(third_party)
    return numeric


def quiet_ray_data(level: int) -> None:
    """Ray Data's console handler at ``level`` (its ``ray-data.log`` file keeps everything), via
    ``RAY_DATA_LOGGING_CONFIG`` — Ray Data configures its loggers from that file, in every process."""
    # why: Ray loads only when a job uses it (every job imports this module before parsing)
    import yaml
    from ray.data._internal import logging as ray_data_logging

    if RAY_DATA_CONFIG_PREFIX in os.environ.get("RAY_DATA_LOGGING_CONFIG", RAY_DATA_CONFIG_PREFIX):
        config = copy.deepcopy(ray_data_logging.DEFAULT_CONFIG)
        config["handlers"]["console"]["level"] = logging.getLevelName(level)
        path = Path(tempfile.gettempdir()) / f"{RAY_DATA_CONFIG_PREFIX}{logging.getLevelName(level).lower()}.yaml"
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, path)  # processes starting at once never read half a file
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
    if "ray.data" in sys.modules:
        ray_data_logging.configure_logging()


def job_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the job's docstring: its first line as the
    description, the rest (usage examples) verbatim as the epilog; with ``--log-level``."""
    first, _, rest = doc.strip().partition("\n")
    ap = argparse.ArgumentParser(description=first, epilog=textwrap.dedent(rest).strip() or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                    help=f"our log lines at this level and up (default ${LOG_ENV} or info); "
                         "libraries' lines at warning unless debug")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a :func:`job_parser`'s arguments and set up logging at their ``--log-level``."""
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    return args


class Progress:
    """One log line with rate and ETA, at most every ``every_s`` seconds and at the end.

    ``Progress("linear probe", total=9600).update()`` per step logs e.g.
    ``linear probe: 2400/9600 (25%) 1m 0s elapsed, ETA 3m 0s``. Callers may set ``detail``
    (what is running now, e.g. ``"density 10%"``).
    """

    def __init__(self, what: str, total: int, logger: logging.Logger = log, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.logger, self.every_s, self.clock = what, max(int(total), 0), logger, every_s, clock
        self.done, self.detail = 0, ""
        self.start = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        share = self.done / self.total if self.total else 1.0
        eta = elapsed * (1 - share) / share if share > 0 else float("nan")
        detail = f" [{self.detail}]" if self.detail else ""
        return (f"{self.what}{detail}: {self.done}/{self.total} ({share:.0%}) {_duration(elapsed)} elapsed, "
                f"ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def forwarded_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables a driver attaching to a running cluster passes to its workers.

    Args:
        environ: the driver's environment.

    Returns:
        ``AWS_*``/``DS_*``/``MAMA_*`` variables minus credentials, and minus those a submitted
        job's own runtime env already sets (Ray refuses to merge a key defined twice).
    """
    taken: set[str] = set()
    if JOB_CONFIG_ENV in environ:
        job_env = json.loads(environ[JOB_CONFIG_ENV]).get("runtime_env") or {}
        taken = set(job_env.get("env_vars") or {})
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_PREFIXES) and k not in SECRET_NAMES and k not in taken}


def init_ray(num_cpus: int | None = None, **kwargs) -> str:
    """Connect to the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else start one.

    Args:
        num_cpus: logical CPUs of a local cluster; ignored when attaching (the cluster has its own).
        **kwargs: passed to ``ray.init``; a ``runtime_env`` given here replaces the forwarded one.

    Returns:
        ``"attached"`` or ``"local"`` (``"attached"`` also when Ray was already initialised).
    """
    import ray  # why: Ray loads only when a job uses it (every job imports this module before parsing)

    quiet_ray_data(_third_party_level)
    if ray.is_initialized():
        return "attached"
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # A local cluster's workers are children of this process and inherit its environment.
        ray.init(num_cpus=num_cpus, **kwargs)
        return "local"
    if "runtime_env" not in kwargs:
        env = forwarded_env()
        kwargs["runtime_env"] = {"env_vars": env} if env else None
    skipped = sorted(SECRET_NAMES & set(os.environ))
    if skipped:
        log.warning("not forwarding %s to the cluster; its nodes use their own AWS role "
                    "(instance profile / service account)", ", ".join(skipped))
    ray.init(address=address, **kwargs)
    return "attached"


def stream_output() -> None:
    """Line-buffer stdout/stderr so progress shows in ``ray job logs`` and pipes as it happens."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a job's ``main`` and exit with a meaningful code (0 ok, 1 failed, 2 bad input).

    A user error (``ConfigError``, ``StorageError``) becomes one line on stderr and code 2; a
    fatal training error (a diverged loss, a first-step bug) one line and code 1; any other
    exception prints its traceback and gives code 1; ``main``'s own return value is kept.
    """
    stream_output()
    setup_logging()  # until the job's own --log-level is parsed
    try:
        code = main()
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except FatalTrainingError as e:  # the workers' logs above hold the traceback
        print(f"error: training failed: {e}", file=sys.stderr, flush=True)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = 130  # the shell's convention for SIGINT
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILED
    sys.stdout.flush()
    sys.exit(code or EXIT_OK)
