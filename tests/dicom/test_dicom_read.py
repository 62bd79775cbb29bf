"""DICOM reading: scaling, polarity, codecs, crop/resize, and one typed error per bad file."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from mama_ray.data.synthetic import _dicom_bytes, _stored
from mama_ray.dicom import (
    DicomError,
    PixelSettings,
    otsu_crop,
    read_header,
    read_image,
    resize_long_side,
)
from mama_ray.dicom.pixels import to_uint8

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled, no download
KEY = b"test pseudonym key, 32 bytes ok"
RAW = PixelSettings(long_side=64, scaling="voi", crop=False)
TAGS = dict(SOPInstanceUID="1.2.3.4", StudyInstanceUID="1.2.3", PatientID="MRN1",
            PatientName="Doe^Jane", PatientBirthDate="19600101", ViewPosition="CC",
            ImageLaterality="L", PatientAge="061Y", Modality="MG")


def _ramp(bits: int = 12) -> np.ndarray:
    """64×64 uint16: columns 0..63 spread over the full stored range."""
    return np.tile(np.linspace(0, 2**bits - 1, 64).round().astype(np.uint16), (64, 1))


def _file(pixels, bits=12, mono1=False, syntax=ExplicitVRLittleEndian, two_windows=False) -> bytes:
    return _dicom_bytes(pixels, bits, mono1, syntax, dict(TAGS), two_windows)


def test_window_maps_center_and_edges_by_the_dicom_formula():
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation, ds.WindowCenter, ds.WindowWidth = "MONOCHROME2", 100.0, 51.0
    raw = np.array([[0, 80, 100, 120, 126, 500]], np.uint16)
    # y = ((x − (c − 0.5)) / (w − 1) + 0.5) · 255, clipped to [0, 255]:
    # 80 → 0.11·255 = 28.05; 100 → 0.51·255 = 130.05; 120 → 0.91·255 = 232.05; 126 → 1.03 → 255
    np.testing.assert_array_equal(to_uint8(raw, ds, "voi"), [[0, 28, 130, 232, 255, 255]])


def test_minmax_is_the_originals_255_over_max_without_min_shift():
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    raw = np.array([[100, 300, 400]], np.uint16)
    np.testing.assert_array_equal(to_uint8(raw, ds, "minmax"), [[64, 191, 255]])  # 63.75, 191.25, 255


def test_first_window_is_used_when_there_are_several():
    one = read_image(_file(_ramp()), RAW)
    two = read_image(_file(_ramp(), two_windows=True), RAW)
    np.testing.assert_array_equal(one, two)  # the 2nd (narrow) window is ignored
    assert one[0, 0] == 0 and one[0, -1] == 255


@pytest.mark.parametrize("scaling", ["voi", "minmax"])
def test_monochrome1_comes_out_with_monochrome2_polarity(scaling):
    display = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))  # dark → bright
    settings = PixelSettings(long_side=64, scaling=scaling, crop=False)
    mono2 = read_image(_file(_stored(display, 14, False), bits=14), settings)
    mono1 = read_image(_file(_stored(display, 14, True), bits=14, mono1=True), settings)
    assert mono2[0, -1] > 200 and mono2[0, 0] < 5  # bright = high display value
    assert mono1[0, -1] > 200 and mono1[0, 0] < 20 and np.all(np.diff(mono1[0].astype(int)) >= 0)
    if scaling == "voi":  # the window undoes the stored inversion exactly
        np.testing.assert_allclose(mono1.astype(int), mono2.astype(int), atol=1)


def test_jpeg2000_decodes_to_the_pixels_of_its_uncompressed_twin():
    pixels = np.random.default_rng(0).integers(0, 4096, (80, 64)).astype(np.uint16)
    plain = read_image(_file(pixels), RAW)
    j2k_bytes = _file(pixels, syntax=JPEG2000Lossless)
    assert pydicom.dcmread(io.BytesIO(j2k_bytes)).file_meta.TransferSyntaxUID == JPEG2000Lossless
    j2k = read_image(j2k_bytes, RAW)
    np.testing.assert_array_equal(j2k, plain)
    # pydicom's own pair: the same MR slice uncompressed and as JPEG 2000 lossless
    a = read_image(str(TEST_FILES / "MR_small.dcm"), RAW)
    b = read_image(str(TEST_FILES / "MR_small_jp2klossless.dcm"), RAW)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_every_lossless_syntax_of_the_mr_slice_gives_the_same_image(name):
    a = read_image(str(TEST_FILES / "MR_small.dcm"), RAW)
    b = read_image(str(TEST_FILES / name), RAW)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, reason", [
    ("SC_rgb.dcm" if (TEST_FILES / "SC_rgb.dcm").exists() else "SC_rgb_rle.dcm", "colour image (PhotometricInterpretation=RGB"),
    ("examples_palette.dcm", "colour image (PhotometricInterpretation=PALETTE COLOR"),
    ("rtdose.dcm", "multi-frame image (15 frames)"),
    ("rtplan.dcm", "no pixel data"),
    ("MR_truncated.dcm", "truncated pixel data"),
    ("no_meta.dcm", "not a DICOM file"),
    ("meta_missing_tsyntax.dcm", "no transfer syntax"),
])
def test_bad_files_raise_one_typed_error_with_a_reason(name, reason):
    with pytest.raises(DicomError) as err:
        read_image(str(TEST_FILES / name), RAW)
    assert err.value.reason.startswith(reason)
    assert name in str(err.value)


def test_unsupported_transfer_syntax_and_cut_file_are_reported():
    ds = pydicom.dcmread(io.BytesIO(_file(_ramp(), syntax=JPEG2000Lossless)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # relabelled MPEG2: no decoder exists
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DicomError, match="unsupported transfer syntax"):
        read_image(buf.getvalue(), RAW)
    whole = _file(_ramp())
    with pytest.raises(DicomError, match="truncated"):
        read_image(whole[: len(whole) - 3000], RAW)


def test_tags_are_keyed_pseudonyms_and_carry_no_names():
    tags = read_header(_file(_ramp()), KEY)
    assert (tags.laterality, tags.view, tags.modality, tags.age) == ("L", "CC", "MG", 61)
    # HMAC-SHA256(KEY, "1.2.3")[:20] and HMAC-SHA256(KEY, "MRN1")[:20], worked out with hmac directly
    assert tags.study_id == hmac.new(KEY, b"1.2.3", hashlib.sha256).hexdigest()[:20]
    assert tags.patient_id == hmac.new(KEY, b"MRN1", hashlib.sha256).hexdigest()[:20]
    assert tags.study_id != read_header(_file(_ramp()), b"another key of 16+ bytes").study_id
    assert not any(v in str(tags) for v in ("Doe", "Jane", "19600101", "MRN1", "1.2.3"))


def test_otsu_crop_finds_the_bright_box_and_resize_keeps_aspect():
    img = np.full((100, 80), 5, np.uint8)
    img[20:60, 10:30] = 200
    np.testing.assert_array_equal(otsu_crop(img), np.full((40, 20), 200, np.uint8))
    assert otsu_crop(np.full((7, 9), 9, np.uint8)).shape == (7, 9)  # no foreground: unchanged
    assert resize_long_side(img, 50).shape == (50, 40)
    assert resize_long_side(np.zeros((10, 45), np.uint8), 90).shape == (20, 90)


def test_s3_source_reads_like_a_local_one(s3_bucket):
    from mama_ray.storage import write_bytes

    _, bucket = s3_bucket
    data = _file(_ramp())
    write_bytes(f"s3://{bucket}/x/a.dcm", data)
    np.testing.assert_array_equal(read_image(f"s3://{bucket}/x/a.dcm", RAW), read_image(data, RAW))
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")
