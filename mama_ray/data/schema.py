"""The shard schema (docs/architecture.md, shard schema): one Parquet row per study, images as a list of structs.

Both the ingest (writer) and the training pipeline (reader) use these definitions; bump
``SCHEMA_VERSION`` on any change and record it in ``manifest.json``.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

IMAGE_STRUCT = pa.struct(
    [
        ("image_id", pa.string()),  # pseudonymous image id (EMBED anon_dicom_path stem or SOP UID hash)
        ("laterality", pa.string()),  # L / R (B or null when unknown)
        ("view", pa.string()),  # raw ViewPosition: CC, MLO, XCCL, …
        ("image", pa.binary()),  # encoded grayscale uint8 image (lossless)
        ("codec", pa.string()),  # "png"
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("density", pa.int8()),  # tissueden 1–5 (5 = male), null unknown
        ("birads", pa.string()),  # BI-RADS letter A/N/B/P/S/M/K, null unknown
        ("mass_shape", pa.string()),  # decoded words, null
        ("mass_density", pa.string()),
        ("calc_find", pa.string()),
        ("calc_distri", pa.string()),
        ("source", pa.string()),  # path under --dicoms, pseudonymised per component (full URI if ingest.keep_source_paths)
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),  # train / val / test, by patient
        ("procedure", pa.string()),  # StudyDescription
        ("reason", pa.string()),  # screening / diagnostic (null when neither)
        ("age", pa.int32()),
        ("race", pa.string()),
        ("ethnicity", pa.string()),
        ("images", pa.list_(IMAGE_STRUCT)),
    ]
)

SPLITS = ("train", "val", "test")
