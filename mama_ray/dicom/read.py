"""Read one DICOM (local path, ``file://`` or ``s3://``) into pixels and non-identifying tags.

The pydicom ``Dataset`` never leaves this package: callers get a :class:`DicomTags` (keyed
pseudonymous ids, laterality, view, procedure, age) and a uint8 image. Every way a file can fail
to be a single-frame grayscale image is turned into one :class:`DicomError` whose ``reason`` says
why.

A header scan (:func:`read_header`) reads only a prefix of the file: :data:`HEADER_PREFIX` bytes
first, doubled (reading only the new part) while the parse has not yet passed the last tag it
keeps — so a typical file costs one 64 KiB read however large its pixel data.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.pixels import get_decoder

from mama_ray.dicom.pixels import PixelSettings, preprocess
from mama_ray.dicom.pseudonyms import pseudonym
from mama_ray.storage import StorageOptions, filesystem, read_bytes, translated

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
REQUIRED_PIXEL_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
HEADER_PREFIX = 64 * 1024  # bytes of a header scan's first read; doubled while the header runs past it
LAST_KEPT_TAG = 0x00200062  # ImageLaterality: the highest tag DicomTags needs, the header parse stops after it
DEFER_BYTES = 4096  # values longer than this are skipped, not read, by the header parse


class DicomError(ValueError):
    """A DICOM that cannot be ingested; ``reason`` is one human-readable line."""

    def __init__(self, reason: str, source: str = "", final: bool = True):
        self.reason = reason
        self.source = source
        self.final = final  # False: a longer prefix of the file might parse
        super().__init__(f"{source}: {reason}" if source else reason)


@dataclass(frozen=True)
class DicomTags:
    """The tags the method needs — nothing identifying (ids are keyed pseudonyms)."""

    study_id: str | None  # pseudonym of StudyInstanceUID
    patient_id: str | None  # pseudonym of PatientID
    image_id: str | None  # pseudonym of SOPInstanceUID
    modality: str | None  # MG, CT, …
    laterality: str | None  # L / R / B (ImageLaterality, else Laterality)
    view: str | None  # raw ViewPosition
    procedure: str | None  # StudyDescription
    age: int | None  # from PatientAge "061Y", as stored (the ingest applies the Safe Harbor cap)
    transfer_syntax: str  # name of the transfer syntax


def _text(ds: Dataset, keyword: str) -> str | None:
    value = str(ds.get(keyword, "") or "").strip()
    return value or None


def _age(ds: Dataset) -> int | None:
    value = _text(ds, "PatientAge")  # e.g. "061Y"; months/weeks/days are not adult ages
    if value and value.endswith("Y") and value[:-1].isdigit():
        return int(value[:-1])
    return None


def _tags(ds: Dataset, key: bytes) -> DicomTags:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    lat = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    return DicomTags(
        study_id=pseudonym(_text(ds, "StudyInstanceUID"), key),
        patient_id=pseudonym(_text(ds, "PatientID"), key),
        image_id=pseudonym(_text(ds, "SOPInstanceUID"), key),
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


def _parse_prefix(data: bytes, whole: bool) -> tuple[Dataset, bool]:
    """Parse the start of a file → ``(dataset, passed)``; ``passed``: every kept tag was in it.

    Raises :class:`DicomError`; ``final=False`` when a longer prefix might parse.
    """
    passed = []

    def stop(tag, vr, length) -> bool:  # top-level elements arrive in tag order
        if tag > LAST_KEPT_TAG:
            passed.append(tag)
        return bool(passed)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(io.BytesIO(data), stop_when=stop, defer_size=DEFER_BYTES)
    except InvalidDicomError as e:  # no DICM preamble/meta: the first bytes already decide that
        raise DicomError(f"not a DICOM file ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # noqa: BLE001 - a cut element or sequence raises many types
        raise DicomError(f"unreadable or truncated DICOM ({type(e).__name__}: {str(e)[:120]})",
                         final=whole) from None
    return ds, bool(passed)


def _header(size: int, read_at: Callable[[int, int], bytes]) -> Dataset:
    """Dataset of a file's header, reading as little of the file as it can.

    Args:
        size: the file's size in bytes.
        read_at: ``(nbytes, offset) → bytes`` of the file.
    """
    data, want = b"", HEADER_PREFIX
    while True:
        data += read_at(min(want, size) - len(data), len(data))  # only the part not read yet
        whole = len(data) >= size
        try:
            ds, passed = _parse_prefix(data, whole)
        except DicomError as e:
            if e.final:
                raise
            passed = False
        if passed or whole:
            return ds
        want *= 2


def read_header(source: str | bytes, key: bytes, opts: StorageOptions | None = None) -> DicomTags:
    """The kept tags of a DICOM from a prefix of the file (raises :class:`DicomError`).

    Args:
        source: a URI (local path, ``file://``, ``s3://``) or the file's bytes.
        key: the pseudonym key (:func:`mama_ray.dicom.pseudonyms.load_key`).
        opts: storage options for s3:// sources.
    Returns:
        The tags, ids as keyed pseudonyms. Reads :data:`HEADER_PREFIX` bytes (or the whole file
        when smaller), more only when the header is longer.
    """
    if isinstance(source, bytes):
        return _tags(_header(len(source), lambda n, at: source[at: at + n]), key)
    fs, path = filesystem(source, opts)  # S3 requests retry in the SDK (storage.retries attempts)
    with translated(source):
        f = fs.open_input_file(path)  # s3: one HEAD for the size

    def read_at(n: int, at: int) -> bytes:
        with translated(source):
            return bytes(f.read_at(n, at))  # s3: one ranged GET each

    try:
        return _tags(_header(f.size(), read_at), key)
    except DicomError as e:
        raise DicomError(e.reason, str(source)) from None
    finally:
        f.close()


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


def read_image(source: str | bytes, settings: PixelSettings, opts: StorageOptions | None = None) -> np.ndarray:
    """Read, check and normalise one DICOM.

    Args:
        source: a URI (local path, ``file://``, ``s3://``) or the file's bytes.
        settings: scaling, crop and output size.
        opts: storage options for s3:// sources.
    Returns:
        H×W uint8 image (MONOCHROME2 polarity, long side = ``settings.long_side``). Its tags come
        from :func:`read_header`.
    Raises:
        DicomError: with a readable ``reason`` for anything that is not a single-frame
            grayscale image.
    """
    name = "" if isinstance(source, bytes) else str(source)
    try:
        raw, ds = read_dicom(source, opts)
        return preprocess(raw, ds, settings)
    except DicomError as e:
        raise DicomError(e.reason, name) from None
