"""Shared test fixtures: one local Ray cluster per session and a real HTTP S3 server (moto).

Ray is started once (oversubscribed logical CPUs so a 2-core machine can host several workers)
and every Ray worker inherits the S3 endpoint and fake credentials through the runtime env, so
code under test talks to moto over real HTTP exactly as it would talk to AWS.
Tests that need their own cluster layout (several nodes, a `ray start --head`) run it in a
subprocess so they never fight this session's cluster.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

RAY_CPUS = 6  # logical CPUs of the session cluster (oversubscribed on purpose)
# The session cluster has no dashboard, so no state API for Train's run tracking; set before any
# test builds a trainer (build_trainer turns tracking on where the variable is unset).
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1:<free port>; yields its endpoint URL.

    The endpoint and dummy credentials are exported so boto3, pyarrow and Ray workers all use it.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields ``(endpoint, bucket)``."""
    from mama_ray.storage import s3_client

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    yield s3_server, bucket


@pytest.fixture(scope="session")
def ray_session(s3_server, tmp_path_factory):
    """One local Ray cluster for the whole test session (workers see the S3 fixture's env)."""
    import ray

    env_vars = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    env_vars["DS_ACCELERATOR"] = "cpu"
    os.environ["DS_ACCELERATOR"] = "cpu"
    ray.init(
        num_cpus=RAY_CPUS,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars},
        _temp_dir=str(Path("/tmp") / f"ray-test-{uuid.uuid4().hex[:6]}"),
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()
