"""Hospital privacy of the ingest: keyed pseudonyms, no identifying paths, Safe Harbor ages, the key.

Planning (tables mode) needs no Ray, so the id tests run on the plan; the folder test runs the
real job on files laid out the way hospital exports often are (patient name + MRN in the path).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from mama_ray.config import ConfigError, load
from mama_ray.data.captions import CaptionFields, caption_text
from mama_ray.data.ingest import plan_ingest, pseudonym_key, run_ingest
from mama_ray.data.shards import shard_files
from mama_ray.data.synthetic import _dicom_bytes, _stored, make_synthetic, synth_image
from mama_ray.storage import StorageOptions

REPO = Path(__file__).resolve().parents[2]
KEY_A, KEY_B = b"hospital key A: 0123456789abcdef", b"hospital key B: fedcba9876543210"
N_STUDIES, SEED = 8, 5
PATIENT_DIR = "Doe^John_MRN123456"  # what hospital exports often look like
STUDY_DIRS = ("2019-03-04 MAMMO SCREEN", "2021-05-06 MAMMO DIAG")
IDENTIFYING = (PATIENT_DIR, "Doe^John", "MRN123456", *STUDY_DIRS, "IMG_0001_L_CC.dcm", "notes.txt")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("syn")), N_STUDIES, SEED)


def _plan(synthetic, key: bytes, *overrides: str):
    cfg = load("tiny_cpu", ["ingest.studies_per_shard=3", *overrides])
    return plan_ingest(synthetic[0], cfg, synthetic[1], key, StorageOptions())


def _ids(plan) -> dict[str, list[str]]:
    studies = [s for sh in plan.shards for s in sh]
    return {"study": [s.study_id for s in studies], "patient": [s.patient_id for s in studies],
            "image": [i["image_id"] for s in studies for i in s.images]}


def test_hmac_ids_are_stable_for_one_key_and_differ_between_keys(synthetic):
    meta = pd.read_csv(f"{synthetic[1]}/EMBED_OpenData_metadata.csv", dtype=str)
    a, again, b = _plan(synthetic, KEY_A), _plan(synthetic, KEY_A), _plan(synthetic, KEY_B)
    assert _ids(a) == _ids(again) and a.fingerprint() == again.fingerprint()
    assert [s.split for sh in a.shards for s in sh] == [s.split for sh in again.shards for s in sh]
    for kind in ("study", "patient", "image"):
        assert not set(_ids(a)[kind]) & set(_ids(b)[kind]), kind
    hm = {hmac.new(KEY_A, v.encode(), hashlib.sha256).hexdigest()[:20]: v for v in meta.acc_anon}
    assert set(_ids(a)["study"]) <= set(hm) and len(set(_ids(a)["study"])) == N_STUDIES - 1  # one lacks density
    assert a.settings["key_id"] != b.settings["key_id"] and a.fingerprint() != b.fingerprint()


def test_brute_force_over_100k_mrns_recovers_nobody_from_keyed_ids(synthetic):
    meta = pd.read_csv(f"{synthetic[1]}/EMBED_OpenData_metadata.csv", dtype=str)
    patients = sorted(set(meta.empi_anon))  # 8-digit MRNs, as hospitals use
    candidates = [f"{n:08d}" for n in range(10_000_000, 10_100_000)]  # the attacker's 100k guesses
    assert set(patients) <= set(candidates)
    table = {hashlib.sha256(c.encode()).hexdigest()[:20]: c for c in candidates}
    unsalted = [hashlib.sha256(p.encode()).hexdigest()[:20] for p in patients]  # the ids mama-ray once stored
    assert sorted(table[i] for i in unsalted) == patients  # so the attack works on those …
    keyed = set(_ids(_plan(synthetic, KEY_A))["patient"])
    assert len(keyed) >= 4 and not keyed & set(table)  # … and finds nobody among the keyed ones


def test_a_key_is_required_and_never_echoed(monkeypatch, tmp_path):
    literal = "3f9c2d7e41a0b8c6d5e4f3a2b1c0d9e8"  # a key pasted into the config by mistake
    cases = {"": "is empty", literal: "neither env:NAME", "env:TEST_PRIVACY_UNSET": "not set",
             "env:MAMA_KEY": "forwarded to every Ray worker", str(tmp_path / "short.key"): "shorter than 16"}
    (tmp_path / "short.key").write_text("tooshort\n")
    (tmp_path / "short.key").chmod(0o600)
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match="config field 'ingest.pseudonym_key'") as err:
            pseudonym_key(load("tiny_cpu", [f"ingest.pseudonym_key={spec}"]), StorageOptions())
        assert message in str(err.value) and literal not in str(err.value)
    monkeypatch.setenv("TEST_PRIVACY_KEY", " 0123456789abcdef0123 \n")
    assert pseudonym_key(load("tiny_cpu", ["ingest.pseudonym_key=env:TEST_PRIVACY_KEY"]),
                         StorageOptions()) == b"0123456789abcdef0123"


def test_the_job_without_a_key_exits_2_naming_the_field(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs/prepare_data.py"), "--dicoms", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config field 'ingest.pseudonym_key': is empty" in proc.stderr


def _hospital_folder(root: Path) -> None:
    """Two studies of 'Doe^John' (age 95, so Safe Harbor applies) laid out by name and MRN, and a note."""
    for s, study in enumerate(STUDY_DIRS):
        for i, (side, view) in enumerate([("L", "CC"), ("R", "CC")]):
            tags = dict(PatientID="MRN123456", PatientName="Doe^John", PatientAge="095Y", Modality="MG",
                        StudyInstanceUID=f"1.2.826.9.{s}", SOPInstanceUID=f"1.2.826.9.{s}.{i}",
                        StudyDescription="MG Screening Bilateral", ImageLaterality=side, ViewPosition=view)
            pixels = _stored(synth_image(np.random.default_rng(i), side, view, 2, "N"), 12, False)
            path = root / PATIENT_DIR / study / f"IMG_000{i + 1}_{side}_{view}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_dicom_bytes(pixels, 12, False, ExplicitVRLittleEndian, tags, False))
    (root / PATIENT_DIR / "notes.txt").write_text("not a DICOM")


@pytest.mark.slow
def test_no_path_component_named_like_a_patient_reaches_a_shard(ray_session, tmp_path, monkeypatch):
    dicoms = tmp_path / "export"
    _hospital_folder(dicoms)
    monkeypatch.setenv("TEST_PRIVACY_KEY", KEY_A.decode())
    out = tmp_path / "shards"
    cfg = load("tiny_cpu", ["ingest.long_side=32", "ingest.pseudonym_key=env:TEST_PRIVACY_KEY"])
    summary = run_ingest(str(dicoms), str(out), cfg)
    assert (summary.studies, summary.images, summary.quarantined) == (2, 4, 1)
    rows = [r for f in shard_files(str(out)) for r in pq.read_table(f).to_pylist()]
    text = repr(rows)  # every stored value, decompressed
    stored = [p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "quarantine.parquet"]
    for secret in (*IDENTIFYING, KEY_A.decode()):
        assert secret not in text and not any(secret.encode() in b for b in stored), secret
    assert [r["age"] for r in rows] == [90, 90]  # PatientAge 095Y, HIPAA Safe Harbor
    assert {i["source"].count("/") for r in rows for i in r["images"]} == {2}  # patient/study/file, pseudonymised
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [e["source"] for e in q] == [str(dicoms / PATIENT_DIR / "notes.txt")]  # the operator's full path


def test_captions_give_ages_over_89_as_90():
    f = CaptionFields("MG Screening Bilateral", "screening", 95, None, None, "L", "CC", 2, "N")
    assert "and 90 years old" in caption_text(f)
    assert "and 89 years old" in caption_text(CaptionFields(**{**f.__dict__, "age": 89}))


def test_tables_ages_over_89_are_stored_as_90(synthetic, tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    for f in Path(synthetic[1]).iterdir():
        (tables / f.name).write_bytes(f.read_bytes())
    clin = pd.read_csv(tables / "EMBED_OpenData_clinical.csv", dtype={"acc_anon": str})
    clin["age_at_study"] = [95, 89, 90, 101] * (len(clin) // 4) + [95] * (len(clin) % 4)
    clin.to_csv(tables / "EMBED_OpenData_clinical.csv", index=False)
    plan = plan_ingest(synthetic[0], load("tiny_cpu"), str(tables), KEY_A, StorageOptions())
    ages = {s.age for sh in plan.shards for s in sh}
    assert ages <= {89, 90} and 90 in ages
