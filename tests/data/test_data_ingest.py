"""The ingest job end to end on a real Ray cluster: counts, shard contents, no PHI, restart, S3.

One synthetic EMBED-like set (8 studies, one without density) is ingested once per module; the
other tests reuse it or compare against it. Ids and stored paths are HMAC pseudonyms under the
test key, so the tests map table values through :func:`pseudonym` to find their rows.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

from mama_ray.config import load
from mama_ray.data.ingest import run_ingest
from mama_ray.data.schema import SHARD_SCHEMA
from mama_ray.data.shards import decode_image, read_manifest, sha256, shard_files
from mama_ray.data.synthetic import make_synthetic
from mama_ray.dicom import pseudonym, pseudonym_path

REPO = Path(__file__).resolve().parents[2]
N_STUDIES, SEED = 8, 3
KEY_ENV, KEY = "TEST_INGEST_PSEUDONYM_KEY", "ingest test key: 0123456789abcdef"
os.environ[KEY_ENV] = KEY  # inherited by the job subprocess of the kill test
SETTINGS = ["ingest.long_side=64", "ingest.studies_per_shard=2", "ingest.row_group_studies=1",
            f"ingest.pseudonym_key=env:{KEY_ENV}"]


def _cfg(*extra):
    return load("tiny_cpu", [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("syn")), N_STUDIES, SEED)


@pytest.fixture(scope="module")
def clean_run(ray_session, synthetic, tmp_path_factory):
    dicoms, tables = synthetic
    out = str(tmp_path_factory.mktemp("clean") / "shards")
    return run_ingest(dicoms, out, _cfg(), tables=tables), out


def _tables(tables):
    meta = pd.read_csv(f"{tables}/EMBED_OpenData_metadata.csv", dtype=str)
    clin = pd.read_csv(f"{tables}/EMBED_OpenData_clinical.csv", dtype={"acc_anon": str})
    return meta, clin


def _rows(out):
    return [r for f in shard_files(out) for r in pq.read_table(f).to_pylist()]


def _ids(values):
    """``{pseudonym: value}`` under the test key."""
    return {pseudonym(str(v), KEY.encode()): str(v) for v in values}


def test_counts_add_up_and_manifest_matches_files(clean_run, synthetic):
    summary, out = clean_run
    meta, clin = _tables(synthetic[1])
    no_density = set(clin.loc[clin.tissueden.isna(), "acc_anon"])
    not_2d = int((meta.FinalImageType != "2D").sum())
    dropped = int(((meta.FinalImageType == "2D") & meta.acc_anon.isin(no_density)).sum())
    assert (summary.inputs, summary.quarantined) == (len(meta), not_2d + dropped)
    assert summary.images + summary.quarantined == summary.inputs
    assert summary.studies == N_STUDIES - len(no_density) and summary.shards == -(-summary.studies // 2)
    manifest = read_manifest(out)
    assert manifest["counts"]["images"] == summary.images == 4 * summary.studies
    for entry, f in zip(manifest["shards"], shard_files(out), strict=True):
        data = Path(f).read_bytes()
        assert (sha256(data), len(data)) == (entry["sha256"], entry["bytes"])
        assert pq.ParquetFile(f).metadata.num_row_groups == entry["rows"] <= 2
    q = pq.read_table(f"{out}/quarantine.parquet").to_pylist()
    reasons = sorted({r["reason"] for r in q})
    assert reasons == ["FinalImageType 'cview' is not 2D", "caption incomplete: missing density"][: len(reasons)]
    assert len(q) == summary.quarantined


def test_shard_rows_follow_the_schema_tables_and_method(clean_run, synthetic):
    _, out = clean_run
    meta, clin = _tables(synthetic[1])
    assert pq.read_schema(shard_files(out)[0]).remove_metadata() == SHARD_SCHEMA
    rows = _rows(out)
    acc_of, split_of = _ids(clin.acc_anon), {}
    for row in rows:
        assert split_of.setdefault(row["patient_id"], row["split"]) == row["split"]  # by patient
        c = clin[clin.acc_anon == acc_of[row["study_id"]]]
        finding = c[c.side != "B"].iloc[0] if (c.side != "B").any() else c.iloc[0]
        assert sorted((i["laterality"], i["view"]) for i in row["images"]) == [
            ("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
        for im in row["images"]:
            want = finding["asses"] if im["laterality"] == finding["side"] else "N"
            assert (im["birads"], im["density"]) == (want, int(c.tissueden.iloc[0]))
            assert im["codec"] == "png" and max(im["height"], im["width"]) == 64
            assert decode_image(im["image"], "png").shape == (im["height"], im["width"])
        assert row["reason"] == ("screening" if "Screening" in row["procedure"] else "diagnostic")
    assert set(split_of) <= set(_ids(meta.empi_anon))
    assert len(split_of) == meta[meta.acc_anon.isin([acc_of[r["study_id"]] for r in rows])].empi_anon.nunique()


def test_monochrome1_images_have_the_polarity_of_monochrome2_ones(clean_run, synthetic):
    _, out = clean_run
    meta, _ = _tables(synthetic[1])  # the key holder maps a stored source back to its file
    file_of = {pseudonym_path(p, KEY.encode()): f"{synthetic[0]}/{p}" for p in meta.anon_dicom_path}
    seen = Counter()
    for im in (i for r in _rows(out) for i in r["images"]):
        photometric = pydicom.dcmread(file_of[im["source"]], stop_before_pixels=True).PhotometricInterpretation
        img = decode_image(im["image"], "png")
        h, w = img.shape
        darkest_corner = min(int(img[y, x]) for y in (0, h - 1) for x in (0, w - 1))
        assert darkest_corner < 40 < 70 < img[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean(), photometric
        seen[photometric] += 1
    assert seen["MONOCHROME1"] >= 4 and seen["MONOCHROME2"] >= 4


def test_identifying_tags_never_reach_any_output_byte(clean_run, synthetic):
    _, out = clean_run
    secrets = set()
    for f in Path(synthetic[0]).rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        secrets |= {str(ds.PatientName), ds.PatientBirthDate, ds.AccessionNumber, ds.PatientID,
                    ds.StudyInstanceUID}
    blobs = [p.read_bytes() for p in Path(out).rglob("*") if p.is_file()]
    assert len(secrets) > 4 * N_STUDIES // 2 and blobs
    leaked = [s for s in secrets if any(s.encode() in b for b in blobs)]
    assert leaked == []
    assert not any(KEY.encode() in b for b in blobs)  # nor the key


def test_shards_hold_pseudonymised_relative_paths_the_quarantine_full_ones(clean_run, synthetic):
    _, out = clean_run
    meta, _ = _tables(synthetic[1])
    parts = {part for p in meta.anon_dicom_path for part in p.split("/")}  # patient/accession/file
    stored = [p.read_bytes() for p in Path(out).glob("*") if p.is_file() and p.name != "quarantine.parquet"]
    assert len(parts) > 2 * N_STUDIES and not [p for p in parts if any(p.encode() in b for b in stored)]
    sources = {i["source"] for r in _rows(out) for i in r["images"]}
    assert sources <= {pseudonym_path(p, KEY.encode()) for p in meta.anon_dicom_path}
    assert all(s.count("/") == 2 for s in sources)  # relative: patient/accession/file, no root
    q = pq.read_table(f"{out}/quarantine.parquet").to_pylist()
    assert q and all(e["source"].startswith(f"{synthetic[0]}/") for e in q)  # for the operator


def test_rerun_skips_finished_shards_and_keeps_bytes(clean_run, synthetic):
    summary, out = clean_run
    before = {p.name: p.read_bytes() for p in Path(out).glob("*.parquet")}
    again = run_ingest(*synthetic[:1], out, _cfg(), tables=synthetic[1])
    assert again.skipped_shards == summary.shards and again.images == summary.images
    assert {p.name: p.read_bytes() for p in Path(out).glob("*.parquet")} == before
    with pytest.raises(ValueError, match="--overwrite"):
        run_ingest(synthetic[0], out, _cfg("ingest.long_side=32"), tables=synthetic[1])
    os.environ["TEST_INGEST_OTHER_KEY"] = "another key, also 16+ bytes"
    with pytest.raises(ValueError, match="pseudonym key"):  # other key → other ids: never mixed
        run_ingest(synthetic[0], out, _cfg("ingest.pseudonym_key=env:TEST_INGEST_OTHER_KEY"), tables=synthetic[1])


def _settled_receipts(out: Path, quiet_s: float = 3.0) -> int:
    """Receipts in ``out`` once no new one has appeared for ``quiet_s`` seconds."""
    n, since = -1, time.time()
    while time.time() - since < quiet_s:
        now = len(list(out.glob("_parts/shard-*.json")))
        n, since = (now, time.time()) if now != n else (n, since)
        time.sleep(0.1)
    return n


@pytest.mark.slow
def test_killed_and_restarted_ingest_equals_one_clean_run(clean_run, synthetic, ray_session, tmp_path):
    _, clean = clean_run
    out = tmp_path / "shards"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    cmd = [sys.executable, str(REPO / "jobs/prepare_data.py"), "--dicoms", synthetic[0], "--tables",
           synthetic[1], "--out", str(out), *sum((["--set", s] for s in SETTINGS), []),
           "--set", "ingest.concurrency=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(out.glob("_parts/shard-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    done = _settled_receipts(out)  # Ray stops the dead driver's tasks; one may finish meanwhile
    summary = run_ingest(synthetic[0], str(out), _cfg(), tables=synthetic[1])
    assert 1 <= done == summary.skipped_shards < summary.shards
    for name in ["manifest.json", "quarantine.parquet", *[Path(f).name for f in shard_files(clean)]]:
        assert (out / name).read_bytes() == (Path(clean) / name).read_bytes(), name


@pytest.mark.slow
def test_ingest_from_and_to_s3(ray_session, s3_bucket):
    _, bucket = s3_bucket
    dicoms, tables = make_synthetic(f"s3://{bucket}/in", 3, SEED)
    out = f"s3://{bucket}/shards"
    summary = run_ingest(dicoms, out, _cfg("ingest.keep_source_paths=true"), tables=tables)
    assert (summary.studies, summary.images, summary.shards) == (3, 12, 2)
    manifest = read_manifest(out)
    from mama_ray.storage import read_bytes

    first = read_bytes(shard_files(out)[0])
    assert sha256(first) == manifest["shards"][0]["sha256"]
    row = pq.read_table(io.BytesIO(first)).to_pylist()[0]
    assert row["images"][0]["source"].startswith(f"s3://{bucket}/in/dicoms/")
    assert decode_image(row["images"][0]["image"], "png").ndim == 2


def test_overwrite_redoes_an_output_with_new_settings(clean_run, synthetic, tmp_path):
    _, clean = clean_run
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    summary = run_ingest(synthetic[0], str(out), _cfg("ingest.long_side=32"), tables=synthetic[1], overwrite=True)
    assert summary.skipped_shards == 0 and read_manifest(str(out))["settings"]["long_side"] == 32
    assert {max(i["height"], i["width"]) for r in _rows(str(out)) for i in r["images"]} == {32}
