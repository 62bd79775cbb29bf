"""Read one DICOM (local path, ``file://`` or ``s3://``) into pixels and non-identifying tags.

The pydicom ``Dataset`` never leaves this package: callers get a :class:`DicomTags` (pseudonymous
ids, laterality, view, procedure, age) and a uint8 image. Every way a file can fail to be a
single-frame grayscale image is turned into one :class:`DicomError` whose ``reason`` says why.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from mama_ray.dicom.pixels import PixelSettings, preprocess
from mama_ray.storage import StorageOptions, read_bytes

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
REQUIRED_PIXEL_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")


class DicomError(ValueError):
    """A DICOM that cannot be ingested; ``reason`` is one human-readable line."""

    def __init__(self, reason: str, source: str = ""):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


@dataclass(frozen=True)
class DicomTags:
    """The tags the method needs — nothing identifying (ids are pseudonyms)."""

    study_id: str | None  # pseudonym of StudyInstanceUID
    patient_id: str | None  # pseudonym of PatientID
    image_id: str | None  # pseudonym of SOPInstanceUID
    modality: str | None  # MG, CT, …
    laterality: str | None  # L / R / B (ImageLaterality, else Laterality)
    view: str | None  # raw ViewPosition
    procedure: str | None  # StudyDescription
    age: int | None  # from PatientAge "061Y"
    transfer_syntax: str  # name of the transfer syntax


def pseudonym(value: str | None) -> str | None:
    """One-way id for a UID or patient id (sha256, 20 hex chars); None stays None."""
    if not value:
        return None
    return hashlib.sha256(str(value).encode()).hexdigest()[:20]


def _text(ds: Dataset, keyword: str) -> str | None:
    value = str(ds.get(keyword, "") or "").strip()
    return value or None


def _age(ds: Dataset) -> int | None:
    value = _text(ds, "PatientAge")  # e.g. "061Y"; months/weeks/days are not adult ages
    if value and value.endswith("Y") and value[:-1].isdigit():
        return int(value[:-1])
    return None


def _tags(ds: Dataset) -> DicomTags:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    lat = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    return DicomTags(
        study_id=pseudonym(_text(ds, "StudyInstanceUID")),
        patient_id=pseudonym(_text(ds, "PatientID")),
        image_id=pseudonym(_text(ds, "SOPInstanceUID")),
        modality=_text(ds, "Modality"),
        laterality=lat.upper() if lat else None,
        view=_text(ds, "ViewPosition"),
        procedure=_text(ds, "StudyDescription"),
        age=_age(ds),
        transfer_syntax=ts.name if ts else "unknown",
    )


def _load(data: bytes, stop_before_pixels: bool) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on many harmless oddities
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
        raise DicomError(f"not a DICOM file ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on broken files
        raise DicomError(f"unreadable or truncated DICOM ({type(e).__name__}: {str(e)[:120]})") from None


def _source_bytes(source: str | bytes, opts: StorageOptions | None) -> bytes:
    return source if isinstance(source, bytes) else read_bytes(source, opts)


def read_header(source: str | bytes, opts: StorageOptions | None = None) -> DicomTags:
    """The kept tags of a DICOM without decoding its pixels (raises :class:`DicomError`)."""
    name = "" if isinstance(source, bytes) else str(source)
    try:
        return _tags(_load(_source_bytes(source, opts), stop_before_pixels=True))
    except DicomError as e:
        raise DicomError(e.reason, name) from None


def _check_image(ds: Dataset) -> None:
    """Reject everything that is not a decodable single-frame grayscale image."""
    if "PixelData" not in ds:
        raise DicomError("no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise DicomError("no transfer syntax in the file meta information")
    missing = [k for k in REQUIRED_PIXEL_TAGS if k not in ds]
    if missing:
        raise DicomError(f"missing required pixel tag(s): {', '.join(missing)}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in GRAYSCALE or samples != 1:
        raise DicomError(f"colour image (PhotometricInterpretation={photometric or 'missing'}, "
                         f"SamplesPerPixel={samples})")
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_raw or 1)
    except (TypeError, ValueError):
        raise DicomError(f"invalid NumberOfFrames {frames_raw!r}") from None
    if frames > 1:
        raise DicomError(f"multi-frame image ({frames} frames)")
    if ts.is_compressed and not _decodable(ts):
        raise DicomError(f"unsupported transfer syntax {ts.name} ({ts}): no decoder installed")


def _decodable(ts) -> bool:
    try:
        return get_decoder(ts).is_available
    except NotImplementedError:
        return False


def _pixels(ds: Dataset) -> np.ndarray:
    """``ds.pixel_array`` (H×W) with decoding failures turned into reasons."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoders raise many types
        msg = str(e).splitlines()[0][:160]
        if "less than expected" in msg or "truncat" in msg.lower():
            raise DicomError(f"truncated pixel data ({msg})") from None
        ts = ds.file_meta.TransferSyntaxUID.name
        raise DicomError(f"pixel data cannot be decoded ({ts}: {msg})") from None
    if arr.ndim != 2:
        raise DicomError(f"not a single-frame grayscale image (pixel array shape {arr.shape})")
    return arr


def read_dicom(source: str | bytes, opts: StorageOptions | None = None) -> tuple[np.ndarray, Dataset]:
    """Raw pixels (H×W, stored values) and the dataset — for this package and benchmarks only."""
    ds = _load(_source_bytes(source, opts), stop_before_pixels=False)
    _check_image(ds)
    return _pixels(ds), ds


def read_image(source: str | bytes, settings: PixelSettings,
               opts: StorageOptions | None = None) -> tuple[np.ndarray, DicomTags]:
    """Read, check and normalise one DICOM.

    Args:
        source: a URI (local path, ``file://``, ``s3://``) or the file's bytes.
        settings: scaling, crop and output size.
        opts: storage options for s3:// sources.
    Returns:
        ``(image, tags)``: H×W uint8 (MONOCHROME2 polarity, long side = ``settings.long_side``)
        and the non-identifying tags.
    Raises:
        DicomError: with a readable ``reason`` for anything that is not a single-frame
            grayscale image.
    """
    name = "" if isinstance(source, bytes) else str(source)
    try:
        raw, ds = read_dicom(source, opts)
        return preprocess(raw, ds, settings), _tags(ds)
    except DicomError as e:
        raise DicomError(e.reason, name) from None
