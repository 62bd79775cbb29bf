"""How jobs attach to Ray and end: one place for cluster connection, output and exit codes.

A job joins an existing cluster when one is named — ``ray job submit`` sets ``RAY_ADDRESS`` for
its entrypoint, and a user may set it by hand — and starts a local one otherwise. Exit codes are
part of the interface (``ray job submit`` turns a non-zero code into a FAILED job):
``0`` success, ``1`` the work failed, ``2`` the user's input (config, arguments, URIs) is wrong.
Output is line-buffered so a job's progress streams to ``ray job logs`` and to pipes as it happens.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping

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
    import ray

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
        print(f"note: not forwarding {', '.join(skipped)} to the cluster; its nodes use their "
              "own AWS role (instance profile / service account)", file=sys.stderr, flush=True)
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

    A user error (``ConfigError``, ``StorageError``) becomes one line on stderr and code 2; any
    other exception prints its traceback and gives code 1; ``main``'s own return value is kept.
    """
    from mama_ray.config import ConfigError
    from mama_ray.storage import StorageError

    stream_output()
    try:
        code = main()
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = 130  # the shell's convention for SIGINT
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILED
    sys.stdout.flush()
    sys.exit(code or EXIT_OK)
