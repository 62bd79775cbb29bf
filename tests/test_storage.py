"""Storage URIs against the local disk and a real HTTP S3 server (moto), no patching.

Retries and transfers are observed on the wire: :class:`FaultProxy` is a real HTTP server in front
of moto that answers chosen requests with an S3 ``500 InternalError`` and records every request.
"""

import hashlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mama_ray import storage


def test_local_paths_and_file_uris(tmp_path):
    fs, path = storage.filesystem(f"file://{tmp_path}/a/b.bin")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/a/b.bin"
    storage.write_bytes(str(tmp_path / "a" / "b.bin"), b"\x00\x01mama")
    assert storage.read_bytes(f"file://{tmp_path}/a/b.bin") == b"\x00\x01mama"
    assert storage.list_files(str(tmp_path)) == [f"{tmp_path}/a/b.bin"]
    assert storage.exists(str(tmp_path / "a" / "b.bin")) and not storage.exists(str(tmp_path / "nope"))


def test_bytes_and_parquet_round_trip_through_s3(s3_bucket):
    _, bucket = s3_bucket
    uri = f"s3://{bucket}/dir/blob.bin"
    payload = bytes(range(256)) * 1000
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload
    # the object is really on the server: boto3 sees it
    head = storage.s3_client().head_object(Bucket=bucket, Key="dir/blob.bin")
    assert head["ContentLength"] == len(payload)

    table = pa.table({"study_id": ["s1", "s2", "s3"], "age": [61, None, 47]})
    fs, path = storage.filesystem(f"s3://{bucket}/shards/part-0.parquet")
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    back = pq.read_table(path, filesystem=fs)
    assert back.equals(table)
    assert storage.list_files(f"s3://{bucket}", suffix=".parquet") == [f"s3://{bucket}/shards/part-0.parquet"]


def test_upload_download_dir_s3(s3_bucket, tmp_path):
    _, bucket = s3_bucket
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("yy")
    storage.upload_dir(src, f"s3://{bucket}/ckpt")
    out = storage.download_dir(f"s3://{bucket}/ckpt", tmp_path / "dst")
    assert (out / "x.txt").read_text() == "x" and (out / "sub" / "y.txt").read_text() == "yy"


def test_missing_bucket_is_one_clear_line(s3_server):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.check_bucket("s3://no-such-bucket-x/prefix")
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes("s3://no-such-bucket-x/key")
    assert "no-such-bucket-x" in str(e.value) and "\n" not in str(e.value)


def test_missing_object_and_bad_scheme(s3_bucket):
    _, bucket = s3_bucket
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(f"s3://{bucket}/absent")
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.filesystem("gs://b/x")


def test_endpoint_override_from_options(s3_bucket):
    endpoint, bucket = s3_bucket
    opts = storage.StorageOptions(endpoint_url=endpoint)
    storage.write_bytes(f"s3://{bucket}/o.txt", b"hi", opts)
    assert storage.read_bytes(f"s3://{bucket}/o.txt", opts) == b"hi"


class FaultProxy:
    """HTTP proxy to moto: fails the first ``fail`` GETs of ``fail_path`` with 500, logs requests."""

    ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
             b"<Message>injected by the test</Message></Error>")

    def __init__(self, upstream: str, fail_path: str = "", fail: int = 0):
        self.upstream = urlparse(upstream)
        self.fail_path, self.fail = fail_path, fail
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.split("?")[0] == path)

    def object_requests(self, method: str, bucket: str) -> int:
        """Requests of ``method`` on objects (a LIST is on the bucket itself, ``/bucket?…``)."""
        return sum(1 for m, p in self.requests if m == method and p.split("?")[0].startswith(f"/{bucket}/"))

    def _should_fail(self, method: str, path: str) -> bool:
        with self.lock:
            self.requests.append((method, path))
            if method == "GET" and path.split("?")[0] == self.fail_path and self.fail > 0:
                self.fail -= 1
                return True
        return False

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass  # trailers
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                length = next((v for k, v in headers if k.lower() == "content-length"), None)
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self):
                body = self._body()
                if proxy._should_fail(self.command, self.path):
                    self._reply(500, [("Content-Type", "application/xml")], proxy.ERROR)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self._reply(resp.status, resp.getheaders(), data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler


@pytest.fixture
def proxy(s3_bucket):
    made = []

    def make(fail_path: str = "", fail: int = 0) -> FaultProxy:
        made.append(FaultProxy(s3_bucket[0], fail_path, fail))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_failing_twice_then_succeeding_is_three_attempts_in_both_sdks(s3_bucket, proxy):
    _, bucket = s3_bucket
    payload = b"weights" * 1000
    storage.write_bytes(f"s3://{bucket}/w.bin", payload)
    # pyarrow (every storage.* call): the SDK's standard retry strategy
    p = proxy(f"/{bucket}/w.bin", fail=2)
    opts = storage.StorageOptions(endpoint_url=p.endpoint, retries=5)
    assert storage.read_bytes(f"s3://{bucket}/w.bin", opts) == payload
    assert p.count("GET", f"/{bucket}/w.bin") == 3
    # boto3: botocore's standard mode with the same number of attempts
    p = proxy(f"/{bucket}/w.bin", fail=2)
    opts = storage.StorageOptions(endpoint_url=p.endpoint, retries=5)
    body = storage.s3_client(opts).get_object(Bucket=bucket, Key="w.bin")["Body"].read()
    assert body == payload and p.count("GET", f"/{bucket}/w.bin") == 3


def test_retries_stop_at_storage_retries_with_one_clear_line(s3_bucket, proxy):
    _, bucket = s3_bucket
    # (not a 1-byte object: the C++ SDK reads it into a 1-byte buffer and fails on the error body)
    storage.write_bytes(f"s3://{bucket}/w.bin", b"x" * 7000)
    p = proxy(f"/{bucket}/w.bin", fail=100)
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(f"s3://{bucket}/w.bin", storage.StorageOptions(endpoint_url=p.endpoint, retries=3))
    assert p.count("GET", f"/{bucket}/w.bin") == 3  # one layer: 3 attempts, not 3 × SDK attempts
    assert f"s3://{bucket}/w.bin" in str(e.value) and "\n" not in str(e.value)


def _tree(root, n: int = 20) -> dict[str, str]:
    """``n`` files (two levels, sizes 1 B … ~190 KB) under ``root``; returns {relative path: md5}."""
    sums = {}
    for i in range(n):
        rel = f"part{i % 3}/file{i:02d}.bin"
        data = hashlib.sha256(str(i).encode()).digest() * (1 + 300 * i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        sums[rel] = hashlib.md5(data).hexdigest()
    return sums


def _sums(root) -> dict[str, str]:
    return {f.relative_to(root).as_posix(): hashlib.md5(f.read_bytes()).hexdigest()
            for f in root.rglob("*") if f.is_file() and not f.name.startswith(".mama-sync")}


def test_parallel_folder_copy_round_trips_and_skips_what_is_there(s3_bucket, proxy, tmp_path):
    _, bucket = s3_bucket
    want = _tree(tmp_path / "src")
    p = proxy()
    opts = storage.StorageOptions(endpoint_url=p.endpoint)
    uri = f"s3://{bucket}/weights"
    assert storage.upload_dir(tmp_path / "src", uri, opts) == 20
    assert p.object_requests("PUT", bucket) == 20
    etags = {k: e for k, (e, _) in storage.s3_objects(uri).items()}
    # the server holds exactly the bytes: pyarrow uploads one part, ETag = MD5(MD5) + "-1"
    assert etags == {k: hashlib.md5(bytes.fromhex(m)).hexdigest() + "-1" for k, m in want.items()}
    out = storage.download_dir(uri, tmp_path / "cache", opts)
    assert _sums(out) == want and p.object_requests("GET", bucket) == 20
    # the same copy again transfers nothing: only the listing travels
    p.requests.clear()
    assert storage.upload_dir(tmp_path / "src", uri, opts) == 0
    storage.download_dir(uri, tmp_path / "cache", opts)
    assert p.object_requests("PUT", bucket) == 0 and p.object_requests("GET", bucket) == 0
    # one changed file is the one that moves, both ways
    (tmp_path / "src" / "part1" / "file01.bin").write_bytes(b"new")
    assert storage.upload_dir(tmp_path / "src", uri, opts) == 1
    p.requests.clear()
    storage.download_dir(uri, tmp_path / "cache", opts)
    assert p.object_requests("GET", bucket) == 1
    assert (tmp_path / "cache" / "part1" / "file01.bin").read_bytes() == b"new"
    assert json.loads((tmp_path / "cache" / storage.SYNC_RECORD).read_text())["part1/file01.bin"] == \
        hashlib.md5(hashlib.md5(b"new").digest()).hexdigest() + "-1"


def test_region_from_config_else_the_aws_chain(s3_server, monkeypatch, tmp_path):
    fs, _ = storage.filesystem("s3://some-bucket/x", storage.StorageOptions(region="eu-west-3"))
    assert fs.region == "eu-west-3"
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    (tmp_path / "config").write_text("[default]\nregion = sa-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    assert storage.filesystem("s3://some-bucket/x")[0].region == "sa-east-1"  # the profile's
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert storage.filesystem("s3://some-bucket/x")[0].region == "ap-south-1"  # env beats profile
