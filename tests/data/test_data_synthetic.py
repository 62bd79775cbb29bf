"""The synthetic EMBED-like set: genuine, varied DICOM MG files, EMBED tables, a learnable signal."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from mama_ray.config import load
from mama_ray.data.embed import CLINICAL_COLUMNS, CODE_COLUMNS, METADATA_COLUMNS
from mama_ray.data.synthetic import MG_SOP_CLASS, default_key, ensure_default_shards, make_synthetic
from mama_ray.dicom import PixelSettings, read_image

N = 20


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synth")), N, seed=5)


def _tables(tables):
    return (pd.read_csv(f"{tables}/EMBED_OpenData_metadata.csv", dtype=str),
            pd.read_csv(f"{tables}/EMBED_OpenData_clinical.csv", dtype={"acc_anon": str}))


def test_files_are_genuine_and_varied_mammograms(synth):
    headers = [pydicom.dcmread(f) for f in sorted(Path(synth[0]).rglob("*.dcm"))]
    assert len(headers) == 4 * N
    assert {h.file_meta.MediaStorageSOPClassUID for h in headers} == {MG_SOP_CLASS}
    assert {h.Modality for h in headers} == {"MG"}
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(h.BitsStored) for h in headers} == {12, 14, 16}
    names = Counter(h.file_meta.TransferSyntaxUID.name for h in headers)
    assert {"JPEG 2000 Image Compression (Lossless Only)", "RLE Lossless",
            "JPEG-LS Lossless Image Compression", "Explicit VR Little Endian",
            "Implicit VR Little Endian"} == set(names)
    assert all("WindowCenter" in h and "WindowWidth" in h for h in headers)
    assert any(h["WindowCenter"].VM == 2 for h in headers)  # several windows on some
    assert all(str(h.PatientName) and len(h.PatientBirthDate) == 8 for h in headers)
    per_study = Counter((h.StudyInstanceUID, h.ImageLaterality, h.ViewPosition) for h in headers)
    assert set(per_study.values()) == {1} and len(per_study) == 4 * N  # L/R × CC/MLO once each


def test_tables_have_embeds_columns_and_a_spread_of_labels(synth):
    meta, clin = _tables(synth[1])
    assert set(METADATA_COLUMNS) <= set(meta.columns)
    assert set(CLINICAL_COLUMNS) | set(CODE_COLUMNS) <= set(clin.columns)
    legend = pd.read_csv(f"{synth[1]}/AWS_Open_Data_Clinical_Legend.csv")
    assert list(legend.columns) == ["Header in export", "Code", "Meaning"]
    density = clin.groupby("acc_anon").tissueden.first().dropna().astype(int).value_counts()
    assert set(density.index) == {1, 2, 3, 4} and density.min() >= 3
    letters = set(clin.asses)
    assert {"N", "B"} <= letters and len(letters) >= 5
    assert meta.anon_dicom_path.map(lambda p: (Path(synth[0]) / p).exists()).sum() == 4 * N


def test_same_seed_same_bytes_other_seed_other_data(synth, tmp_path):
    again = make_synthetic(str(tmp_path / "a"), N, seed=5)
    for f in sorted(Path(synth[0]).rglob("*.dcm"))[:12]:
        assert f.read_bytes() == (Path(again[0]) / f.relative_to(synth[0])).read_bytes()
    other = make_synthetic(str(tmp_path / "b"), N, seed=6)
    assert _tables(other[1])[1].asses.tolist() != _tables(synth[1])[1].asses.tolist()


def test_density_and_masses_are_visible_at_64_px(synth):
    meta, clin = _tables(synth[1])
    means: dict[int, list[float]] = {1: [], 2: [], 3: [], 4: []}
    top: dict[bool, list[float]] = {True: [], False: []}
    for _, r in meta[meta.FinalImageType == "2D"].iterrows():
        c = clin[clin.acc_anon == r.acc_anon]
        if c.tissueden.isna().any():
            continue
        img = read_image(f"{synth[0]}/{r.anon_dicom_path}", PixelSettings(long_side=64))
        means[int(c.tissueden.iloc[0])].append(float(img[img > 30].mean()))
        side = c[c.side == r.ImageLateralityFinal]
        mass = len(side) > 0 and side.asses.iloc[0] in ("S", "M", "K")
        top[mass].append(float(np.sort(img.ravel())[-10:].mean()))
    avg = [np.mean(means[d]) for d in (1, 2, 3, 4)]
    assert all(b - a > 8 for a, b in zip(avg, avg[1:], strict=False)), avg  # brighter with density
    assert np.mean(top[True]) > np.mean(top[False]) + 15  # a bright mass on suspicious sides


@pytest.mark.slow
def test_default_shards_are_built_once(ray_session, tmp_path, capsys):
    cfg = load("tiny_cpu", [f"storage.cache_dir={tmp_path}", "data.synthetic_studies=4"])
    shards = ensure_default_shards(cfg)
    assert shards == f"{tmp_path}/synthetic-n4-s42-L128/shards"
    key = Path(shards).parent / "pseudonym.key"  # written beside the set, private, with a note
    assert key.stat().st_mode & 0o777 == 0o600 and f"pseudonym key, derived from its seed, is at {key}" in (
        capsys.readouterr().out)
    secret = key.read_text().strip().encode()
    assert not any(secret in p.read_bytes() for p in Path(shards).rglob("*") if p.is_file())
    # Derived, not random: SHA-256 of the set's name, so another machine's cache pseudonymises alike
    assert secret.decode() == hashlib.sha256(b"mama-ray synthetic default set synthetic-n4-s42-L128").hexdigest()
    elsewhere = load("tiny_cpu", [f"storage.cache_dir={tmp_path / 'other'}", "data.synthetic_studies=4"])
    assert Path(default_key(elsewhere)).read_text() == key.read_text()
    reseeded = load("tiny_cpu", [f"storage.cache_dir={tmp_path}", "data.synthetic_studies=4", "run.seed=7"])
    assert Path(default_key(reseeded)).read_text() != key.read_text()
    manifest = Path(shards) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_default_shards(cfg) == shards
    assert manifest.stat().st_mtime_ns == stamp and time.perf_counter() - start < 5
