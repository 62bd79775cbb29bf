"""Folder mode over pydicom's own bundled test files (relabelled as MG): every single-frame
grayscale file is ingested, every other input is quarantined with its reason, nothing crashes."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from mama_ray.config import load
from mama_ray.data.ingest import run_ingest
from mama_ray.data.shards import read_manifest, shard_files
from mama_ray.dicom import pseudonym_path

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled with pydicom, no download
KEY_FILE_TEXT = "folder test key 0123456789abcdef\n"  # a key file's contents (trailing newline ignored)
KEEP_MODALITY = "CT_small.dcm"  # stays CT: quarantined as non-MG unless admitted
# Single-frame grayscale files that decode with the installed plugins (worked out from the files).
GRAYSCALE = {
    "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm", "JPGExtended.dcm", "MR_small.dcm", "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm", "examples_overlay.dcm", "image_dfl.dcm",
    "liver_1frame.dcm", "liver_expb_1frame.dcm", "rtdose_1frame.dcm", "rtdose_expb_1frame.dcm",
    "rtdose_rle_1frame.dcm",
}
# 12-bit JPEG Extended: only the GPL pylibjpeg-libjpeg decodes it (the `[gpl-decoders]` extra, not
# in CI's install); GDCM and Pillow refuse 12-bit samples (docs/ingest.md).
LIBJPEG = importlib.util.find_spec("libjpeg") is not None
if not LIBJPEG:
    GRAYSCALE.remove("JPGExtended.dcm")
EXPECTED_REASONS = {
    KEEP_MODALITY: "modality CT is not MG",
    "rtdose.dcm": "multi-frame image (15 frames)",
    "examples_ybr_color.dcm": "colour image (PhotometricInterpretation=YBR_FULL_422",
    "SC_rgb_rle.dcm": "colour image (PhotometricInterpretation=RGB",
    "MR_truncated.dcm": "truncated pixel data",
    "rtplan.dcm": "no pixel data",
    "no_meta.dcm": "not a DICOM file",
    "README.txt": "not a DICOM file",
    "JPEG-lossy.dcm": "pixel data cannot be decoded (JPEG Extended",
    "badVR.dcm": "invalid NumberOfFrames '1A'",
    **({} if LIBJPEG else {"JPGExtended.dcm": "pixel data cannot be decoded (JPEG Extended"}),
}


def _relabel(src: Path, dst: Path) -> None:
    """Copy a file, marking every readable one as MG (with a study UID if it lacks one)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(src)
            if src.name != KEEP_MODALITY:
                ds.Modality = "MG"
                ds.StudyInstanceUID = ds.get("StudyInstanceUID") or f"1.2.3.{len(src.name)}"
            ds.save_as(dst)
    except Exception:  # noqa: BLE001 - unreadable files are copied as they are
        shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "pseudonym.key"
    path.write_text(KEY_FILE_TEXT)
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pydicom_files")
    for f in sorted(TEST_FILES.glob("*.dcm")) + [TEST_FILES / "README.txt"]:
        _relabel(f, root / f.name)
    return root


@pytest.mark.slow
def test_pydicom_files_are_ingested_or_quarantined_with_reasons(ray_session, folder, key_file, tmp_path):
    out = tmp_path / "shards"
    cfg = load("tiny_cpu", ["ingest.long_side=32", f"ingest.pseudonym_key={key_file}"])
    summary = run_ingest(str(folder), str(out), cfg)
    inputs = sorted(p.name for p in folder.iterdir())
    assert summary.inputs == len(inputs) and summary.images + summary.quarantined == len(inputs)
    rows = [r for f in shard_files(str(out)) for r in pq.read_table(f).to_pylist()]
    name_of = {pseudonym_path(name, KEY_FILE_TEXT.strip().encode()): name for name in inputs}
    ingested = {name_of[i["source"]] for r in rows for i in r["images"]}
    assert ingested == GRAYSCALE
    quarantine = {Path(q["source"]).name: q["reason"] for q in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert set(quarantine) == set(inputs) - GRAYSCALE
    for name, reason in EXPECTED_REASONS.items():
        assert quarantine[name].startswith(reason), (name, quarantine[name])
    assert all(i["birads"] is None and i["density"] is None for r in rows for i in r["images"])
    assert read_manifest(str(out))["settings"]["mode"] == "folder"


def test_output_inside_the_input_folder_is_refused(folder, key_file):
    with pytest.raises(ValueError, match="lies inside --dicoms"):
        run_ingest(str(folder), str(folder / "shards"), load("tiny_cpu", [f"ingest.pseudonym_key={key_file}"]))
