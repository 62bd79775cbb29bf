"""Storage URIs: the one place that turns a location into a filesystem or an S3 client.

Every location in a config is a URI: a local path, ``file://…`` or ``s3://bucket/prefix``.
S3 goes through pyarrow's ``S3FileSystem`` and boto3 with the standard AWS credential chain;
``storage.endpoint_url`` (or the ``AWS_ENDPOINT_URL`` environment variable) points both at an
S3-compatible server (MinIO, moto, Ceph).

User mistakes — a missing bucket, bad credentials, an unreachable endpoint — raise
:class:`StorageError` with one readable line, never a botocore stack trace.

Retries live in one layer, the AWS SDKs' own: pyarrow's ``AwsStandardS3RetryStrategy`` and
botocore's ``standard`` retry mode, both limited to ``storage.retries`` attempts per request
(throttling, 5xx and connection errors, with jittered exponential back-off). Nothing here loops
on top of them. Folder copies stream in chunks, several files at once, and skip every file whose
checksum (the S3 ETag; MD5 for a local file) says it is already there — so a worker that finds
the weights in its node's cache fetches nothing.

The region is ``storage.region`` if set, else the AWS chain (``AWS_REGION``/``AWS_DEFAULT_REGION``,
the profile's config), else — on AWS itself — the bucket's own region (``resolve_s3_region``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

COPY_THREADS = 8  # files copied at once by upload_dir/download_dir
CHUNK_BYTES = 8 * 1024**2  # bytes held per file in flight while copying
SYNC_RECORD = ".mama-sync.json"  # in a downloaded folder: the ETag of every file fetched
SYNC_LOCK = ".mama-sync.lock"  # in a downloaded folder: held while one process syncs it


class StorageError(OSError):
    """A location could not be used; the message says which and why."""


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str = ""  # S3-compatible endpoint; empty = AWS_ENDPOINT_URL or AWS
    region: str = ""  # empty = the AWS chain, else the bucket's region
    retries: int = 5  # attempts per request (the SDKs' standard retry mode)

    @classmethod
    def from_config(cls, storage_cfg) -> StorageOptions:
        return cls(storage_cfg.endpoint_url, storage_cfg.region, storage_cfg.retries)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _endpoint(opts: StorageOptions) -> str:
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")


def _chain_region() -> str:
    """The region the AWS chain names (environment, profile config), or ""."""
    import boto3  # why: boto3 takes ~1 s to import and only s3:// URIs need it

    return boto3.session.Session().region_name or ""


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError as e:
        raise _explain(f"s3://{bucket}", e) from None


def _region(opts: StorageOptions, bucket: str = "") -> str | None:
    """``storage.region``, else the AWS chain's, else (AWS only) the bucket's; None = SDK default."""
    if opts.region:
        return opts.region
    chain = _chain_region()
    if chain or _endpoint(opts) or not bucket:
        return chain or None  # an S3-compatible server's region is whatever the chain says
    return _bucket_region(bucket)


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
        kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=opts.retries)}
        region = _region(opts, parsed.netloc)
        if region:
            kwargs["region"] = region
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
    # why: boto3 takes ~1 s to import and only s3:// URIs need it
    import boto3
    from botocore.config import Config as BotoConfig

    opts = opts or StorageOptions()
    return boto3.client(
        "s3",
        endpoint_url=_endpoint(opts) or None,
        region_name=_region(opts),
        # total_max_attempts counts the first try, as pyarrow's max_attempts does
        config=BotoConfig(retries={"total_max_attempts": opts.retries, "mode": "standard"}),
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


@contextlib.contextmanager
def translated(uri: str) -> Iterator[None]:
    """Run a storage call; its error becomes one :class:`StorageError` line (retries happened below)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow and botocore raise many types
        raise _explain(uri, e) from None


def with_retries(fn, uri: str, attempts: int | None = None, base_delay: float | None = None):
    """Deprecated: ``fn()`` with its error translated (:func:`translated`). It no longer retries —
    the SDKs do, ``storage.retries`` attempts per request; ``attempts``/``base_delay`` are ignored."""
    with translated(uri):
        return fn()


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, opts)
    with translated(uri), fs.open_input_stream(path) as f:
        return f.read()


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
    with translated(uri), fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str, opts: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, opts)
    with translated(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = "", opts: StorageOptions | None = None) -> list[str]:
    """All files under a URI prefix (recursive), as URIs of the same scheme, sorted."""
    fs, path = filesystem(uri, opts)
    with translated(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [f"s3://{f}" if is_s3(uri) else f for f in files]


def makedirs(uri: str, opts: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, opts)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)


def delete(uri: str, opts: StorageOptions | None = None) -> None:
    """Delete a file or a whole directory/prefix; missing is fine."""
    fs, path = filesystem(uri, opts)
    with translated(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


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


# ---- folder copies ---------------------------------------------------------------------------

def md5_file(path: Path) -> bytes:
    """MD5 digest of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.digest()


def same_content(path: Path, etag: str) -> bool:
    """Whether a local file has the content an S3 ETag describes.

    A single PutObject's ETag is the MD5; a one-part multipart upload's (what pyarrow writes) is
    MD5(MD5) + ``-1``. A many-part ETag depends on the part sizes, so it never matches (the
    file is copied again).
    """
    if "-" not in etag:
        return md5_file(path).hex() == etag
    if etag.endswith("-1"):
        return hashlib.md5(md5_file(path), usedforsecurity=False).hexdigest() + "-1" == etag
    return False


def s3_objects(uri: str, opts: StorageOptions | None = None) -> dict[str, tuple[str, int]]:
    """``{relative key: (ETag, size)}`` of every object under an s3:// prefix (one LIST per 1000)."""
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out = {}
    with translated(uri):
        for page in s3_client(opts).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = (obj["ETag"].strip('"'), int(obj["Size"]))
    return out


def _copy_all(pairs: list[tuple[str, str]], src_fs: pafs.FileSystem, dst_fs: pafs.FileSystem, uri: str) -> None:
    """Copy ``(source path, destination path)`` pairs, COPY_THREADS files at a time, streamed in
    CHUNK_BYTES pieces (a multi-GB file never sits in memory whole)."""
    def one(pair: tuple[str, str]) -> None:
        if isinstance(dst_fs, pafs.LocalFileSystem):
            Path(pair[1]).parent.mkdir(parents=True, exist_ok=True)
        with translated(uri):
            pafs.copy_files(pair[0], pair[1], source_filesystem=src_fs, destination_filesystem=dst_fs,
                            chunk_size=CHUNK_BYTES, use_threads=False)

    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        list(pool.map(one, pairs))


def upload_dir(local_dir: str | Path, uri: str, opts: StorageOptions | None = None) -> int:
    """Copy a local folder to a URI (recursively); returns the number of files transferred.

    To S3, a file whose object is there with the same size and content (:func:`same_content`)
    is skipped.
    """
    local_dir = Path(local_dir)
    files = sorted(f for f in local_dir.rglob("*") if f.is_file() and f.name not in (SYNC_RECORD, SYNC_LOCK))
    rels = [f.relative_to(local_dir).as_posix() for f in files]
    fs, base = filesystem(uri, opts)
    if not is_s3(uri):
        Path(base).mkdir(parents=True, exist_ok=True)
        _copy_all([(str(f), f"{base}/{r}") for f, r in zip(files, rels, strict=True)], pafs.LocalFileSystem(), fs, uri)
        return len(files)
    have = s3_objects(uri, opts)
    todo = [(str(f), f"{base}/{r}") for f, r in zip(files, rels, strict=True)
            if r not in have or have[r][1] != f.stat().st_size or not same_content(f, have[r][0])]
    _copy_all(todo, pafs.LocalFileSystem(), fs, uri)
    log.debug("upload %s → %s: %d of %d files transferred", local_dir, uri, len(todo), len(files))
    return len(todo)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time syncs a folder (workers on a node share the cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / SYNC_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stale(remote: dict[str, tuple[str, int]], local_dir: Path) -> list[str]:
    """Keys whose local copy is missing, of another size, or recorded with another ETag."""
    record_path = local_dir / SYNC_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return [k for k, (etag, size) in sorted(remote.items())
            if record.get(k) != etag or not (local_dir / k).is_file() or (local_dir / k).stat().st_size != size]


def _write_record(local_dir: Path, record: dict[str, str]) -> None:
    tmp = local_dir / f"{SYNC_RECORD}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=0, sort_keys=True))
    os.replace(tmp, local_dir / SYNC_RECORD)


def download_dir(uri: str, local_dir: str | Path, opts: StorageOptions | None = None) -> Path:
    """Copy everything under a URI prefix into a local folder; returns the folder.

    From S3, only objects whose ETag or size differ from the last download into this folder
    (``.mama-sync.json``) are fetched, so a cache folder is filled once however many workers ask.
    """
    local_dir = Path(local_dir)
    fs, base = filesystem(uri, opts)
    if not is_s3(uri):
        files = list_files(uri, opts=opts)
        pairs = [(f, str(local_dir / f[len(base):].lstrip("/"))) for f in files]
        _copy_all(pairs, fs, pafs.LocalFileSystem(), uri)
        return local_dir
    with _locked(local_dir):
        remote = s3_objects(uri, opts)
        stale = _stale(remote, local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        # forget the stale keys first: a copy cut short is fetched again next time
        _write_record(local_dir, {k: e for k, (e, _) in remote.items() if k not in set(stale)})
        _copy_all([(f"{base}/{k}", str(local_dir / k)) for k in stale], fs, pafs.LocalFileSystem(), uri)
        _write_record(local_dir, {k: e for k, (e, _) in remote.items()})
        log.debug("download %s → %s: %d of %d files transferred", uri, local_dir, len(stale), len(remote))
    return local_dir


def local_copy(uri: str, cache_dir: str | Path, opts: StorageOptions | None = None) -> Path:
    """A local folder with the contents of ``uri``: the folder itself if local, else a cached download."""
    if not is_s3(uri):
        return Path(filesystem(uri)[1])
    bucket, key = split_s3(uri)
    return download_dir(uri, Path(cache_dir).expanduser() / "s3" / bucket / key, opts)
