"""Storage URIs: the one place that turns a location into a filesystem or an S3 client.

Every location in a config is a URI: a local path, ``file://…`` or ``s3://bucket/prefix``.
S3 goes through pyarrow's ``S3FileSystem`` and boto3 with the standard AWS credential chain;
``storage.endpoint_url`` (or the ``AWS_ENDPOINT_URL`` environment variable) points both at an
S3-compatible server (MinIO, moto, Ceph).

User mistakes — a missing bucket, bad credentials, an unreachable endpoint — raise
:class:`StorageError` with one readable line, never a botocore stack trace.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

T = TypeVar("T")


class StorageError(OSError):
    """A location could not be used; the message says which and why."""


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str = ""  # S3-compatible endpoint; empty = AWS_ENDPOINT_URL or AWS
    region: str = ""  # empty = AWS_REGION / AWS_DEFAULT_REGION / us-east-1
    retries: int = 5  # attempts for transient errors

    @classmethod
    def from_config(cls, storage_cfg) -> StorageOptions:
        return cls(storage_cfg.endpoint_url, storage_cfg.region, storage_cfg.retries)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _endpoint(opts: StorageOptions) -> str:
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")


def _region(opts: StorageOptions) -> str:
    return opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (works for s3:// and local paths alike)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def filesystem(uri: str, opts: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn a URI into ``(pyarrow filesystem, path inside it)``.

    Local paths and ``file://`` give a ``LocalFileSystem`` and an absolute path (``~`` expanded);
    ``s3://bucket/key`` gives an ``S3FileSystem`` and ``bucket/key``.
    """
    opts = opts or StorageOptions()
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket name (s3://bucket/prefix)")
        endpoint = _endpoint(opts)
        kwargs = {"region": _region(opts), "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=opts.retries)}
        if endpoint:
            e = urlparse(endpoint)
            kwargs.update(endpoint_override=e.netloc or e.path, scheme=e.scheme or "https")
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme; use a local path, file:// or s3://")
    path = uri.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def s3_client(opts: StorageOptions | None = None):
    """A boto3 S3 client honouring the endpoint override and the AWS credential chain."""
    import boto3
    from botocore.config import Config as BotoConfig

    opts = opts or StorageOptions()
    return boto3.client(
        "s3",
        endpoint_url=_endpoint(opts) or None,
        region_name=_region(opts),
        config=BotoConfig(retries={"max_attempts": opts.retries, "mode": "standard"}),
    )


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _explain(uri: str, err: Exception) -> StorageError:
    """Translate pyarrow/botocore errors into one line a user can act on."""
    text = str(err)
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or ("bucket" in low and "not found" in low):
        bucket = split_s3(uri)[0] if is_s3(uri) else uri
        return StorageError(f"{uri}: bucket '{bucket}' does not exist (check the name and region)")
    if any(s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "access denied",
                              "accessdenied", "forbidden", "credentials", "expiredtoken")):
        return StorageError(f"{uri}: access denied — check AWS credentials/profile and the bucket policy ({text.splitlines()[0][:200]})")
    if any(s in low for s in ("connection refused", "could not connect", "failed to connect",
                              "curlcode", "timed out", "name or service not known")):
        return StorageError(f"{uri}: cannot reach the storage endpoint ({_endpoint(StorageOptions()) or 'AWS'}): {text.splitlines()[0][:200]}")
    if isinstance(err, FileNotFoundError) or "path does not exist" in low or "nosuchkey" in low:
        return StorageError(f"{uri}: no such file or object")
    return StorageError(f"{uri}: {text.splitlines()[0][:300] if text else type(err).__name__}")


def _transient(err: Exception) -> bool:
    low = str(err).lower()
    return any(s in low for s in ("slowdown", "throttl", "timeout", "timed out", "connection reset",
                                  "internalerror", "service unavailable", "503", "500 ", "broken pipe"))


def with_retries(fn: Callable[[], T], uri: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn``; retry transient storage errors with jittered exponential back-off."""
    for i in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if i + 1 < attempts and _transient(e):
                time.sleep(base_delay * (2**i) * (1 + random.random()))
                continue
            raise _explain(uri, e) from None
    raise AssertionError("unreachable")


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, opts)

    def _read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(_read, uri, (opts or StorageOptions()).retries)


def write_bytes(uri: str, data: bytes, opts: StorageOptions | None = None) -> None:
    """Write a whole object; local parents are created. Local writes are atomic (tmp + rename)."""
    fs, path = filesystem(uri, opts)
    if isinstance(fs, pafs.LocalFileSystem):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return

    def _write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    with_retries(_write, uri, (opts or StorageOptions()).retries)


def exists(uri: str, opts: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, opts)
    info = with_retries(lambda: fs.get_file_info(path), uri)
    return info.type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = "", opts: StorageOptions | None = None) -> list[str]:
    """All files under a URI prefix (recursive), as URIs of the same scheme, sorted."""
    fs, path = filesystem(uri, opts)
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = with_retries(lambda: fs.get_file_info(sel), uri)
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [f"s3://{f}" if is_s3(uri) else f for f in files]


def makedirs(uri: str, opts: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, opts)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)


def delete(uri: str, opts: StorageOptions | None = None) -> None:
    """Delete a file or a whole directory/prefix; missing is fine."""
    fs, path = filesystem(uri, opts)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        with_retries(lambda: fs.delete_dir(path), uri)
    elif info.type == pafs.FileType.File:
        with_retries(lambda: fs.delete_file(path), uri)


def check_bucket(uri: str, opts: StorageOptions | None = None) -> None:
    """Fail fast with a clear message when an s3:// location's bucket is missing or forbidden."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    client = s3_client(opts)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - botocore raises many types
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist (check the name and region)") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{uri}: access to bucket '{bucket}' denied — check AWS credentials/profile") from None
        raise _explain(uri, e) from None


def upload_dir(local_dir: str | Path, uri: str, opts: StorageOptions | None = None) -> None:
    """Copy a local folder to a URI (recursively), retrying transient errors per file."""
    local_dir = Path(local_dir)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            write_bytes(join(uri, f.relative_to(local_dir).as_posix()), f.read_bytes(), opts)


def download_dir(uri: str, local_dir: str | Path, opts: StorageOptions | None = None) -> Path:
    """Copy everything under a URI prefix into a local folder; returns the folder."""
    local_dir = Path(local_dir)
    fs, base = filesystem(uri, opts)
    for f in list_files(uri, opts=opts):
        rel = f.removeprefix("s3://")[len(base):].lstrip("/")
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(f, opts))
    return local_dir


def local_copy(uri: str, cache_dir: str | Path, opts: StorageOptions | None = None) -> Path:
    """A local folder with the contents of ``uri``: the folder itself if local, else a download."""
    if not is_s3(uri):
        return Path(filesystem(uri)[1])
    bucket, key = split_s3(uri)
    return download_dir(uri, Path(cache_dir).expanduser() / "s3" / bucket / key, opts)
