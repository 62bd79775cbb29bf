"""Header scans read a bounded prefix of each file, not the whole file — counted for real.

Local reads are counted by the kernel (this thread's ``rchar`` in ``/proc``); S3 reads by a
second HTTP front end on the moto backend that logs every request and the bytes it sent back.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from mama_ray.data.synthetic import _dicom_bytes
from mama_ray.dicom import read_header
from mama_ray.dicom.read import HEADER_PREFIX
from mama_ray.storage import StorageOptions, write_bytes

KEY = b"header test key 0123456789abcdef"
TAGS = dict(SOPInstanceUID="1.2.3.4", StudyInstanceUID="1.2.3", PatientID="MRN1", ViewPosition="MLO",
            ImageLaterality="R", PatientAge="095Y", Modality="MG", StudyDescription="MG Screening Bilateral")
PRIVATE_BYTES = 100_000  # a private value before the kept tags: the header outgrows the first read


def _big_file(private: bool = False) -> bytes:
    """A 1024×768 16-bit MG file (≈1.5 MiB), optionally with a 100 kB private value early on."""
    data = _dicom_bytes(np.zeros((1024, 768), np.uint16), 14, False, ExplicitVRLittleEndian, dict(TAGS), False)
    if not private:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.private_block(0x0009, "MAMA TEST", create=True).add_new(0x01, "OB", b"\x01" * PRIVATE_BYTES)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _rchar() -> int:
    """Bytes this thread has read through read()/pread() so far (Linux /proc)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _want(tags) -> None:
    assert (tags.laterality, tags.view, tags.modality, tags.age) == ("R", "MLO", "MG", 95)
    assert tags.procedure == "MG Screening Bilateral" and tags.study_id and tags.patient_id


@pytest.mark.parametrize("private, expected", [(False, HEADER_PREFIX), (True, 2 * HEADER_PREFIX)])
def test_local_header_scan_reads_the_prefix_only(tmp_path, private, expected):
    data = _big_file(private)
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    read_header(str(path), KEY)  # warm-up: lazy imports read files of their own
    before = _rchar()
    tags = read_header(str(path), KEY)
    read = _rchar() - before
    _want(tags)
    assert len(data) > 1_500_000 and len(data) > 10 * expected
    # 64 KiB (or 64 + 64 KiB when the header is longer), plus < 512 bytes of /proc bookkeeping
    assert expected <= read < expected + 512, read


class _Logged:
    """WSGI middleware: records (method, Range header, response body bytes) of every request."""

    def __init__(self, app):
        self.app, self.log = app, []

    def __call__(self, environ, start_response):
        body = b"".join(self.app(environ, start_response))
        self.log.append((environ["REQUEST_METHOD"], environ.get("HTTP_RANGE"), len(body)))
        return [body]


@pytest.fixture
def logged_s3(s3_bucket):
    """``(StorageOptions to the logged front end, bucket, log)``; same moto backend as the fixture."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    _, bucket = s3_bucket
    app = _Logged(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield StorageOptions(endpoint_url=f"http://127.0.0.1:{server.server_port}"), bucket, app.log
    server.shutdown()
    thread.join()


@pytest.mark.parametrize("private, expected", [(False, HEADER_PREFIX), (True, 2 * HEADER_PREFIX)])
def test_s3_header_scan_fetches_the_prefix_only(logged_s3, private, expected):
    opts, bucket, log = logged_s3
    data = _big_file(private)
    write_bytes(f"s3://{bucket}/d/a.dcm", data)  # through the fixture's own front end: not logged
    _want(read_header(f"s3://{bucket}/d/a.dcm", KEY, opts))
    gets = [(rng, n) for method, rng, n in log if method == "GET"]
    assert sum(n for _, n in gets) == expected and len(data) > 10 * expected
    assert [rng for rng, _ in gets] == [f"bytes={i * HEADER_PREFIX}-{(i + 1) * HEADER_PREFIX - 1}"
                                        for i in range(expected // HEADER_PREFIX)]
    assert [m for m, _, _ in log].count("HEAD") == 1  # the size, once


def test_a_file_smaller_than_the_prefix_is_read_once_whole(tmp_path):
    data = _dicom_bytes(np.zeros((64, 64), np.uint16), 12, False, ExplicitVRLittleEndian, dict(TAGS), False)
    path = tmp_path / "small.dcm"
    path.write_bytes(data)
    read_header(str(path), KEY)
    before = _rchar()
    _want(read_header(str(path), KEY))
    assert len(data) <= _rchar() - before < len(data) + 512 < HEADER_PREFIX
