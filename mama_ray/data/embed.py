"""EMBED tables → per-image records (method.md §1.1, §1.2, method.md §1.3 fields, method.md §1.7 split).

Reads the image metadata, the clinical table (full, with mass/calcification codes; the reduced
one also works) and the legend that decodes those codes, from a folder or prefix of CSV/Parquet
files (local or s3://). For every metadata row it either yields an :class:`ImageRecord` (the caption
fields and labels of that image) or a quarantine entry saying why the method drops it. The caption
*text* is built later by :mod:`mama_ray.data.captions` from the same fields.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mama_ray.data.captions import BIRADS_LETTERS, CaptionFields, is_complete, reason_from_procedure
from mama_ray.storage import StorageOptions, join, list_files, read_bytes

ID_COLUMNS = ("anon_dicom_path", "empi_anon", "acc_anon")  # read as text: ids, not numbers
METADATA_COLUMNS = ("anon_dicom_path", "empi_anon", "acc_anon", "FinalImageType",
                    "ImageLateralityFinal", "ViewPosition", "StudyDescription")
CLINICAL_COLUMNS = ("acc_anon", "side", "asses", "tissueden", "age_at_study", "RACE_DESC",
                    "ETHNIC_GROUP_DESC")
CODE_COLUMNS = ("massshape", "massdens", "calcfind", "calcdistri")  # decoded with the legend
LEGEND_HEADER, LEGEND_CODE, LEGEND_MEANING = "Header in export", "Code", "Meaning"


@dataclass(frozen=True)
class ImageRecord:
    """One image to ingest: where it is, its study/patient, and its caption fields."""

    source: str  # URI of the DICOM
    image_id: str  # pseudonymous (anon_dicom_path stem)
    study_id: str  # acc_anon
    patient_id: str  # empi_anon
    fields: CaptionFields


@dataclass
class EmbedTables:
    metadata: pd.DataFrame
    clinical: pd.DataFrame
    legend: pd.DataFrame | None


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def _read_table(uri: str, opts: StorageOptions | None) -> pd.DataFrame:
    data = io.BytesIO(read_bytes(uri, opts))
    if uri.endswith(".parquet"):
        df = pd.read_parquet(data)
        return df.astype({c: str for c in ID_COLUMNS if c in df.columns})
    return pd.read_csv(data, dtype={c: str for c in ID_COLUMNS}, low_memory=False)


def _pick(files: list[str], word: str, avoid: str = "") -> list[str]:
    names = [f for f in files if word in f.rsplit("/", 1)[-1].lower()]
    return [f for f in names if not (avoid and avoid in f.rsplit("/", 1)[-1].lower())]


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} table lacks EMBED column(s) {missing}; has {list(df.columns)[:20]}")


def load_tables(tables: str, opts: StorageOptions | None = None) -> EmbedTables:
    """Load EMBED-style tables from a folder/prefix (file names as in EMBED Open Data).

    Metadata: every file whose name contains ``metadata`` (train/valid/test parts are concatenated);
    clinical: the one containing ``clinical`` (the full table is preferred over ``reduced``);
    legend: the one containing ``legend`` (optional; without it codes stay undecoded → null).
    """
    files = [f for f in list_files(tables, opts=opts) if f.endswith((".csv", ".parquet"))]
    meta_files = _pick(files, "metadata")
    clinical = _pick(files, "clinical", avoid="legend")
    clinical = [f for f in clinical if "reduced" not in f.lower()] or clinical
    legend = _pick(files, "legend")
    if not meta_files or not clinical:
        raise ValueError(f"{tables}: needs an EMBED metadata table and a clinical table "
                         f"(file names containing 'metadata' and 'clinical'); found {files}")
    metadata = pd.concat([_read_table(f, opts) for f in meta_files], ignore_index=True)
    clin = _read_table(clinical[0], opts)
    _require(metadata, METADATA_COLUMNS, "metadata")
    _require(clin, CLINICAL_COLUMNS, "clinical")
    return EmbedTables(metadata, clin, _read_table(legend[0], opts) if legend else None)


# ------------------------------------------------------------------------------------------
# method.md §1.2 clinical-row choice and value cleaning
# ------------------------------------------------------------------------------------------


def _letter_number(value) -> int | None:
    s = str(value).strip() if isinstance(value, str) else ""
    return BIRADS_LETTERS.index(s) if len(s) == 1 and s in BIRADS_LETTERS else None


def choose_clinical_row(rows: list[dict], side: str | None) -> int | None:
    """Position in ``rows`` (clinical rows of one study) of the row describing an image of
    laterality ``side`` (method.md §1.2).

    Same side, else side ``B``, else all rows; a mix of A/N/B only → the A row; otherwise the
    highest BI-RADS number (first on ties); no valid letter → the first row. None if no rows.
    """
    if not rows:
        return None
    cand = [i for i, r in enumerate(rows) if r.get("side") == side]
    cand = cand or [i for i, r in enumerate(rows) if r.get("side") == "B"] or list(range(len(rows)))
    nums = [_letter_number(rows[i].get("asses")) for i in cand]
    valid = [n for n in nums if n is not None]
    if not valid:
        return cand[0]
    target = 0 if (max(valid) <= 2 and min(valid) == 0) else max(valid)
    return cand[nums.index(target)]


def _clean(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    s = str(value).strip()
    return s or None


def _int(value) -> int | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else int(f)


def _legend_map(legend: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    if legend is None:
        return {}
    return {(str(h).strip(), str(c).strip()): str(m).strip()
            for h, c, m in zip(legend[LEGEND_HEADER], legend[LEGEND_CODE], legend[LEGEND_MEANING], strict=True)}


def _decode(codes: dict, header: str, row: dict) -> str | None:
    code = _clean(row.get(header))
    return codes.get((header, code)) if code else None


def caption_fields_from_tables(meta: dict, clin: dict | None, codes: dict) -> CaptionFields:
    """Caption fields of one image from its metadata row and chosen clinical row (method.md §1.3)."""
    procedure = _clean(meta["StudyDescription"])
    clin = clin or {}
    get = clin.get
    return CaptionFields(
        procedure=procedure,
        reason=reason_from_procedure(procedure),
        age=_int(get("age_at_study")),
        race=_clean(get("RACE_DESC")),
        ethnicity=_clean(get("ETHNIC_GROUP_DESC")),
        laterality=_clean(meta["ImageLateralityFinal"]),
        view=_clean(meta["ViewPosition"]),
        density=_int(get("tissueden")),
        birads=_clean(get("asses")) if _letter_number(get("asses")) is not None else None,
        mass_shape=_decode(codes, "massshape", clin),
        mass_density=_decode(codes, "massdens", clin),
        calc_find=_decode(codes, "calcfind", clin),
        calc_distri=_decode(codes, "calcdistri", clin),
    )


def _missing(f: CaptionFields) -> str:
    parts = [name for name, ok in (("procedure", f.procedure), ("reason", f.reason),
                                   ("density", f.density in (1, 2, 3, 4, 5)),
                                   ("BI-RADS letter", f.birads)) if not ok]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------


def resolve_source(dicoms: str, anon_dicom_path: str) -> str:
    """A metadata path relative to ``dicoms`` is joined onto it; an absolute path/URI is kept."""
    p = str(anon_dicom_path)
    return p if p.startswith("/") or "://" in p else join(dicoms, p)


def _image_id(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".dcm")


def _by_study(clinical: pd.DataFrame) -> dict[str, list[dict]]:
    """Clinical rows as plain dicts grouped by ``acc_anon``, in table order."""
    out: dict[str, list[dict]] = {}
    for row in clinical.to_dict("records"):
        out.setdefault(str(row["acc_anon"]), []).append(row)
    return out


class _ClinicalIndex:
    """Clinical rows by study, with the method.md §1.2 choice cached per (study, side)."""

    def __init__(self, clinical: pd.DataFrame):
        self.by_acc = _by_study(clinical)
        self.cache: dict[tuple[str, str | None], dict | None] = {}

    def row(self, acc: str, side: str | None) -> dict | None:
        if (acc, side) not in self.cache:
            rows = self.by_acc.get(acc, [])
            chosen = choose_clinical_row(rows, side)
            self.cache[(acc, side)] = rows[chosen] if chosen is not None else None
        return self.cache[(acc, side)]


def _image_record(meta: dict, dicoms: str, clinical: _ClinicalIndex, codes: dict):
    """One metadata row → ``(ImageRecord, None)`` or ``(None, quarantine entry)``."""
    source = resolve_source(dicoms, meta["anon_dicom_path"])
    image_id, acc = _image_id(str(meta["anon_dicom_path"])), str(meta["acc_anon"])
    reject = dict(source=source, image_id=image_id, study_id=acc)
    if str(meta["FinalImageType"]).strip() != "2D":
        return None, dict(reject, reason=f"FinalImageType {meta['FinalImageType']!r} is not 2D")
    clin = clinical.row(acc, _clean(meta["ImageLateralityFinal"]))
    fields = caption_fields_from_tables(meta, clin, codes)
    if clin is None:
        return None, dict(reject, reason="no clinical row for the study")
    if not is_complete(fields):
        return None, dict(reject, reason=f"caption incomplete: missing {_missing(fields)}")
    return ImageRecord(source, image_id, acc, str(meta["empi_anon"]), fields), None


def image_records(tables: EmbedTables, dicoms: str) -> tuple[list[ImageRecord], list[dict]]:
    """Per-image records of the 2D images with a complete caption, and the rest as quarantine.

    Returns:
        ``(records, quarantine)``; each quarantine entry is ``{source, image_id, study_id, reason}``.
    """
    clinical, codes = _ClinicalIndex(tables.clinical), _legend_map(tables.legend)
    records, quarantine = [], []
    for meta in tables.metadata.to_dict("records"):
        record, rejected = _image_record(meta, dicoms, clinical, codes)
        if record:
            records.append(record)
        else:
            quarantine.append(rejected)
    return records, quarantine


def patient_splits(patients, fractions: list[float], seed: int) -> dict[str, str]:
    """Patient-level random split (method.md §1.7): ``{patient_id: "train"|"val"|"test"}``.

    Patients are sorted, permuted by ``seed``; the first ``fractions[0]`` share is train, the next
    ``fractions[1]`` val, the rest test — so the split depends only on the patient set and the seed.
    """
    ids = sorted({str(p) for p in patients})
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = round(fractions[0] * len(ids))
    n_val = round(fractions[1] * len(ids))
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out
