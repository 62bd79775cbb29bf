"""Storage URIs against the local disk and a real HTTP S3 server (moto), no patching."""

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


def test_transient_errors_are_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("SlowDown: please reduce your request rate")
        return "ok"

    assert storage.with_retries(flaky, "s3://b/k", attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3


def test_endpoint_override_from_options(s3_bucket):
    endpoint, bucket = s3_bucket
    opts = storage.StorageOptions(endpoint_url=endpoint)
    storage.write_bytes(f"s3://{bucket}/o.txt", b"hi", opts)
    assert storage.read_bytes(f"s3://{bucket}/o.txt", opts) == b"hi"
