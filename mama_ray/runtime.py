"""How jobs attach to Ray and end: one place for cluster connection and exit codes.

Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) a job joins that cluster; otherwise it
starts a local one. Exit codes are part of the interface:
``0`` success, ``1`` the work failed, ``2`` the user's input (config, arguments, URIs) is wrong.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Connect to the cluster named by RAY_ADDRESS / the job's cluster, else start a local one."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "DS_", "MAMA_"))}
    runtime_env = kwargs.pop("runtime_env", None) or ({"env_vars": env_vars} if env_vars else None)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, **kwargs)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a job's ``main`` and turn user errors into one line on stderr and exit code 2."""
    from mama_ray.config import ConfigError
    from mama_ray.storage import StorageError

    try:
        code = main()
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code or EXIT_OK)
