"""An EMBED-like synthetic data set: genuine DICOM MG files plus EMBED-named tables.

Made for the default run and the tests, it carries a learnable signal:

* **density 1–4** is the share and brightness of fibroglandular tissue (smoothed-noise texture
  growing from the chest wall): ≈5 % of the breast at density 1 up to ≈85 % at density 4;
* **BI-RADS** is the presence and look of a mass on the finding side: none (N), a faint large
  asymmetry (A), a small round (B) or oval (P) mass, an irregular (S) or spiculated (M) one, and a
  large irregular mass with a bright biopsy clip (K); M/K also get a calcification cluster.

Files are real DICOM (Digital Mammography For Presentation, file meta, CC and MLO of both
breasts), MONOCHROME1 and MONOCHROME2, 12/14/16-bit, with window tags (some with two windows),
a share stored as JPEG 2000, RLE or JPEG-LS lossless, and PatientName/PatientBirthDate/
AccessionNumber filled with fake identifying values that must never reach a shard. Everything is
deterministic by seed.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from mama_ray.config import override
from mama_ray.storage import StorageOptions, exists, join, write_bytes

MG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
RAW_HEIGHT, RAW_WIDTH = 256, 192  # stored DICOM size: small, so the default set builds in seconds
DENSITY_SHARE = {1: 0.05, 2: 0.25, 3: 0.55, 4: 0.85}  # fibroglandular share of the breast
DENSITY_LEVEL = {1: 0.52, 2: 0.60, 3: 0.68, 4: 0.76}  # brightness of that tissue (fat = 0.35)
BIRADS_CYCLE = "NNNBBAPSMK"  # letters dealt in balanced rounds: N 30 %, B 20 %, others 10 % each
RACES = ("Caucasian or White", "African American  or Black", "Asian", "Unknown, Unavailable or Unmasked")
ETHNICITIES = ("Non-Hispanic or Latino", "Hispanic or Latino", "Unknown")
SYNTAXES = (ExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
            JPEG2000Lossless, RLELossless, JPEGLSLossless)  # cycled over images
ENCODERS = {JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls", RLELossless: None}
MASS = {  # letter → (radius in px at RAW size, irregularity, spicules, amplitude)
    "B": (9, 0.0, 0, 0.45), "P": (11, 0.0, 0, 0.45), "S": (14, 0.35, 0, 0.55),
    "M": (16, 0.35, 10, 0.6), "K": (18, 0.45, 12, 0.6),
}
LEGEND = [  # (Header in export, Code, Meaning), EMBED's legend layout
    ("massshape", "R", "round"), ("massshape", "O", "oval"), ("massshape", "X", "irregular"),
    ("massshape", "S", "spiculated"), ("massdens", "+", "high density"),
    ("massdens", "=", "equal density"), ("calcfind", "P", "pleomorphic"),
    ("calcfind", "A", "amorphous"), ("calcdistri", "G", "grouped"), ("calcdistri", "S", "segmental"),
]
MASS_CODES = {"B": ("R", "="), "P": ("O", "="), "S": ("X", "+"), "M": ("S", "+"), "K": ("X", "+")}


@dataclass(frozen=True)
class SyntheticStudy:
    patient: str  # empi_anon
    acc: str  # acc_anon
    density: int | None  # tissueden (None = missing → dropped by the method)
    letter: str  # BI-RADS of the finding side
    side: str  # finding side L/R
    age: int
    race: str
    ethnicity: str


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def _breast_mask(side: str, view: str) -> np.ndarray:
    """Half ellipse on the chest wall (left edge for R, right edge for L) → H×W bool."""
    yy, xx = np.mgrid[0:RAW_HEIGHT, 0:RAW_WIDTH].astype(np.float32)
    x = xx if side == "R" else (RAW_WIDTH - 1 - xx)
    cy = RAW_HEIGHT * (0.5 if view == "CC" else 0.55)
    return ((x / (0.8 * RAW_WIDTH)) ** 2 + ((yy - cy) / (0.42 * RAW_HEIGHT)) ** 2) <= 1.0


def _tissue(rng: np.random.Generator, mask: np.ndarray, side: str, density: int) -> np.ndarray:
    """Fibroglandular texture: smoothed noise biased to the chest wall, thresholded to the share."""
    noise = cv2.GaussianBlur(rng.standard_normal(mask.shape).astype(np.float32), (0, 0), 5)
    noise /= noise.std() + 1e-6
    xx = np.arange(RAW_WIDTH, dtype=np.float32)[None, :]
    wall = 1.0 - (xx if side == "R" else RAW_WIDTH - 1 - xx) / RAW_WIDTH  # 1 at the chest wall
    field = noise + 2.0 * wall
    cut = np.quantile(field[mask], 1.0 - DENSITY_SHARE[density])
    dense = cv2.GaussianBlur(((field > cut) & mask).astype(np.float32), (0, 0), 1.5)
    grain = cv2.GaussianBlur(rng.standard_normal(mask.shape).astype(np.float32), (0, 0), 1.0)
    return dense * (DENSITY_LEVEL[density] - 0.35 + 0.04 * density * grain)


def _mass(rng: np.random.Generator, mask: np.ndarray, letter: str) -> np.ndarray:
    """Additive mass image for a BI-RADS letter (zeros for N)."""
    out = np.zeros(mask.shape, np.float32)
    ys, xs = np.nonzero(cv2.erode(mask.astype(np.uint8), np.ones((41, 41), np.uint8)))
    if letter == "N" or ys.size == 0:
        return out
    k = rng.integers(ys.size)
    cy, cx = int(ys[k]), int(xs[k])
    if letter == "A":  # asymmetry: broad, faint
        yy, xx = np.mgrid[0:RAW_HEIGHT, 0:RAW_WIDTH]
        return 0.18 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 22.0**2)).astype(np.float32)
    radius, irregular, spicules, amp = MASS[letter]
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 1 + irregular * np.sin(3 * angles + rng.uniform(0, 6.3)) * rng.uniform(0.6, 1.0)
    ry = radius * (0.65 if letter == "P" else 1.0)
    pts = np.stack([cx + radius * wobble * np.cos(angles), cy + ry * wobble * np.sin(angles)], 1)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], amp)
    for a in rng.uniform(0, 2 * np.pi, spicules):
        end = (int(cx + 2.2 * radius * math.cos(a)), int(cy + 2.2 * radius * math.sin(a)))
        cv2.line(out, (cx, cy), end, amp * 0.8, 2)
    if letter in ("M", "K"):  # calcification cluster beside the mass
        for _ in range(8):
            p = (int(cx + rng.normal(0, 6) + radius), int(cy + rng.normal(0, 6)))
            cv2.circle(out, p, 1, 0.7, -1)
    if letter == "K":  # biopsy clip marker
        cv2.rectangle(out, (cx - 2, cy - 2), (cx + 2, cy + 2), 1.0, -1)
    return out


def synth_image(rng: np.random.Generator, side: str, view: str, density: int, letter: str) -> np.ndarray:
    """Display-domain image in [0, 1] (H×W float32, bright = dense)."""
    mask = _breast_mask(side, view)
    img = np.where(mask, 0.35, 0.02).astype(np.float32)
    if view == "MLO":  # pectoral muscle: bright triangle in the upper chest-wall corner
        yy, xx = np.mgrid[0:RAW_HEIGHT, 0:RAW_WIDTH]
        x = xx if side == "R" else RAW_WIDTH - 1 - xx
        img[(x < 0.35 * RAW_WIDTH * (1 - yy / (0.45 * RAW_HEIGHT))) & mask] = 0.7
    img += _tissue(rng, mask, side, density) + _mass(rng, mask, letter) * mask
    img += 0.01 * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------


def _stored(display: np.ndarray, bits: int, mono1: bool) -> np.ndarray:
    maxval = 2**bits - 1
    v = np.rint(display * 0.95 * maxval).astype(np.uint16)
    return (maxval - v).astype(np.uint16) if mono1 else v


def _dicom_bytes(pixels: np.ndarray, bits: int, mono1: bool, syntax, tags: dict, two_windows: bool) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MG_SOP_CLASS
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.Modality, ds.PresentationIntentType = "MG", "FOR PRESENTATION"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    full = 0.95 * (2**bits - 1)  # the window spans the stored range; a 2nd narrow one is ignored
    center = (2**bits - 1) - full / 2 if mono1 else full / 2  # stored values are inverted in MONO1
    ds.WindowCenter = [round(center, 1), round(full * 0.6, 1)] if two_windows else round(center, 1)
    ds.WindowWidth = [round(full, 1), round(full * 0.2, 1)] if two_windows else round(full, 1)
    ds.PixelData = pixels.tobytes()
    if syntax in ENCODERS:
        kwargs = {"encoding_plugin": ENCODERS[syntax]} if ENCODERS[syntax] else {}
        ds.compress(syntax, generate_instance_uid=False, **kwargs)  # keep the seeded UID
    elif syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=[f"mama-ray-synthetic-{seed}", *map(str, parts)])


# ------------------------------------------------------------------------------------------
# Studies and tables
# ------------------------------------------------------------------------------------------


def _studies(n: int, seed: int) -> list[SyntheticStudy]:
    rng = np.random.default_rng(seed)
    densities = np.resize(rng.permutation(np.repeat([1, 2, 3, 4], math.ceil(n / 4))), n)
    letters = [BIRADS_CYCLE[i] for i in np.resize(rng.permutation(np.tile(np.arange(10), math.ceil(n / 10))), n)]
    n_patients = max(1, math.ceil(0.75 * n))  # a quarter of the patients come back for a 2nd study
    patients = [f"{10_000_000 + 7919 * i:08d}" for i in range(n_patients)]
    owner = list(range(n_patients)) + list(rng.integers(0, n_patients, n - n_patients))
    out = []
    for i in range(n):
        out.append(SyntheticStudy(
            patient=patients[owner[i]], acc=f"{seed:04d}{6_000_000_000 + 104_729 * i:012d}",
            density=None if i % 16 == 7 else int(densities[i]),  # a few with no density → dropped
            letter=letters[i], side="LR"[int(rng.integers(2))], age=int(rng.integers(40, 81)),
            race=RACES[int(rng.integers(len(RACES)))], ethnicity=ETHNICITIES[int(rng.integers(3))]))
    return out


def _clinical_rows(s: SyntheticStudy) -> list[dict]:
    """One row per finding side (method.md §1.2 picks per image); a negative exam has one bilateral row."""
    base = dict(acc_anon=s.acc, tissueden=s.density, age_at_study=s.age, RACE_DESC=s.race,
                ETHNIC_GROUP_DESC=s.ethnicity, massshape=None, massdens=None, calcfind=None, calcdistri=None)
    if s.letter == "N":
        return [dict(base, side="B", asses="N")]
    shape, dens = MASS_CODES.get(s.letter, (None, None))
    calc = ("P", "G") if s.letter in ("M", "K") else (None, None)
    finding = dict(base, side=s.side, asses=s.letter, massshape=shape, massdens=dens,
                   calcfind=calc[0], calcdistri=calc[1])
    other = dict(base, side="L" if s.side == "R" else "R", asses="N")
    return [finding, other]


def _procedure(s: SyntheticStudy) -> str:
    if s.letter in ("N", "B", "A"):
        return "MG Screening Bilateral"
    return f"MG Diagnostic {'Left' if s.side == 'L' else 'Right'}"


def _image_tags(seed: int, s: SyntheticStudy, i: int, side: str, view: str) -> dict:
    rng = np.random.default_rng([seed, i, 7])
    return dict(
        PatientName=f"Synthetic^Name{rng.integers(10**6):06d}Zq",  # fake identifying values
        PatientBirthDate=f"{2025 - s.age}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        PatientID=f"MRN{s.patient}X", AccessionNumber=f"RA{s.acc[-9:]}Q",
        PatientAge=f"{s.age:03d}Y", StudyDescription=_procedure(s),
        StudyInstanceUID=_uid(seed, s.acc), SeriesInstanceUID=_uid(seed, s.acc, side, view),
        SOPInstanceUID=_uid(seed, s.acc, side, view, "img"),
        ImageLaterality=side, Laterality=side, ViewPosition=view, PatientOrientation=["A", "R"],
    )


def make_synthetic(out: str, n_studies: int, seed: int, opts: StorageOptions | None = None) -> tuple[str, str]:
    """Write ``n_studies`` synthetic studies (4 DICOMs each) and EMBED-style CSV tables.

    Args:
        out: folder or s3:// prefix; DICOMs go to ``out/dicoms``, tables to ``out/tables``.
        n_studies: number of studies (exams); patients ≈ 0.75 × studies.
        seed: everything (labels, images, UIDs, codecs) follows from it.
    Returns:
        ``(dicoms_uri, tables_uri)``.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be ≥ 1, got {n_studies}")
    dicoms, tables = join(out, "dicoms"), join(out, "tables")
    meta_rows, clin_rows, i = [], [], 0
    for s in _studies(n_studies, seed):
        clin_rows += _clinical_rows(s)
        for side in ("L", "R"):
            for view in ("CC", "MLO"):
                rng = np.random.default_rng([seed, i])
                letter = s.letter if side == s.side else "N"
                display = synth_image(rng, side, view, s.density or 2, letter)
                bits, mono1 = (12, 14, 16)[i % 3], rng.random() < 0.35
                tags = _image_tags(seed, s, i, side, view)
                rel = f"{s.patient}/{s.acc}/{tags['SOPInstanceUID']}.dcm"
                write_bytes(join(dicoms, rel), _dicom_bytes(_stored(display, bits, mono1), bits, mono1,
                                                            SYNTAXES[i % len(SYNTAXES)], tags, i % 5 == 0), opts)
                meta_rows.append(dict(anon_dicom_path=rel, empi_anon=s.patient, acc_anon=s.acc,
                                      FinalImageType="2D", ImageLateralityFinal=side, ViewPosition=view,
                                      StudyDescription=_procedure(s)))
                i += 1
        if int(s.acc[-3:]) % 7 == 0:  # an occasional C-view row the method drops (not 2D)
            meta_rows.append(dict(meta_rows[-1], FinalImageType="cview",
                                  anon_dicom_path=meta_rows[-1]["anon_dicom_path"].replace(".dcm", "_cview.dcm")))
    _write_csv(join(tables, "EMBED_OpenData_metadata.csv"), pd.DataFrame(meta_rows), opts)
    _write_csv(join(tables, "EMBED_OpenData_clinical.csv"), pd.DataFrame(clin_rows), opts)
    _write_csv(join(tables, "AWS_Open_Data_Clinical_Legend.csv"),
               pd.DataFrame(LEGEND, columns=["Header in export", "Code", "Meaning"]), opts)
    return dicoms, tables


def _write_csv(uri: str, df: pd.DataFrame, opts: StorageOptions | None) -> None:
    write_bytes(uri, df.to_csv(index=False).encode(), opts)


def default_root(cfg) -> str:
    """``<cache_dir>/synthetic-n{N}-s{seed}-L{long_side}`` of the default synthetic set."""
    name = f"synthetic-n{cfg.data.synthetic_studies}-s{cfg.run.seed}-L{cfg.ingest.long_side}"
    return join(os.path.expanduser(cfg.storage.cache_dir), name)


def synthetic_key(cfg) -> str:
    """The default set's pseudonym key: a hash of the set's name (studies, seed, size), not a secret.

    The set is synthetic, so there is nothing to protect; deriving the key makes its pseudonyms,
    and with them the patient split and the data plan, the same on every machine (a random key
    per fresh cache gave each machine its own test split).
    """
    name = Path(default_root(cfg)).name
    return hashlib.sha256(f"mama-ray synthetic default set {name}".encode()).hexdigest()


def default_key(cfg) -> str:
    """Path of the default set's pseudonym key file (mode 600, :func:`synthetic_key`), written if missing."""
    path = Path(default_root(cfg)) / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(synthetic_key(cfg) + "\n")
        print(f"note: the synthetic default set's pseudonym key, derived from its seed, is at {path}; "
              "a real ingest needs your own secret key in ingest.pseudonym_key (see docs/ingest.md)", flush=True)
    return str(path)


def ensure_default_shards(cfg) -> str:
    """Generate and ingest the default synthetic set once; returns its shard URI.

    A no-op when the set's ``manifest.json`` exists. Needs Ray to be initialised (the ingest is
    the real Ray job). Unless ``ingest.pseudonym_key`` names one, the ids are pseudonymised with
    the set's derived key, written beside it (:func:`default_key`).
    """
    # why: ingest imports Ray; make_synthetic alone needs no Ray
    from mama_ray.data.ingest import run_ingest

    root = default_root(cfg)
    shards = join(root, "shards")
    if exists(join(shards, "manifest.json")):
        return shards
    dicoms, tables = join(root, "dicoms"), join(root, "tables")
    if not exists(join(tables, "AWS_Open_Data_Clinical_Legend.csv")):  # written last
        dicoms, tables = make_synthetic(root, cfg.data.synthetic_studies, cfg.run.seed)
    if not cfg.ingest.pseudonym_key:
        cfg = override(cfg, {"ingest.pseudonym_key": default_key(cfg)})
    run_ingest(dicoms, shards, cfg, tables=tables)
    return shards
