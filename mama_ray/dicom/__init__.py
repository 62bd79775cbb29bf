"""DICOM → normalised uint8 image + the few tags the method needs.

No identifying tag (names, birth dates, accession numbers, raw UIDs) leaves this package: ids
come out as keyed one-way pseudonyms (:func:`pseudonym`, HMAC-SHA256 under the operator's key). Everything that cannot become a single-frame
grayscale image raises :class:`DicomError` with a human-readable reason.
"""

from mama_ray.dicom.pixels import PixelSettings, otsu_crop, preprocess, resize_long_side, to_uint8
from mama_ray.dicom.pseudonyms import key_id, load_key, pseudonym, pseudonym_path
from mama_ray.dicom.read import DicomError, DicomTags, read_dicom, read_header, read_image

__all__ = [
    "DicomError", "DicomTags", "PixelSettings", "key_id", "load_key", "otsu_crop", "preprocess",
    "pseudonym", "pseudonym_path", "read_dicom", "read_header", "read_image", "resize_long_side",
    "to_uint8",
]
