"""The ingest job: EMBED tables or a DICOM folder → Parquet shards, on Ray Data.

1. **Plan** (driver, no pixels): with tables, :mod:`mama_ray.data.embed` gives per-image records
   (method §1.1–1.3 drop rules); with a folder only, a Ray Data pass reads every header and derives
   study, patient, laterality and view (no labels; non-MG modalities are quarantined unless
   ``ingest.admit_non_mg``). Studies are sorted by id, split by patient (§1.7), and cut into
   *planned shards* of ``studies_per_shard`` — so shard membership depends only on the inputs and
   the config, and every run writes the same bytes.
2. **Process** (Ray Data, one task per study): read + normalise each DICOM
   (:mod:`mama_ray.dicom`), encode, and return the study row; a bad file becomes a quarantine entry,
   never a crash.
3. **Write as shards complete**: when every study of a planned shard is back, the shard is written
   (atomically, with its sha256) followed by a small ``_parts/shard-NNNNN.json`` receipt. A re-run
   skips shards that have a receipt, so a killed run loses nothing written and ends with exactly
   the shards of a clean run.
4. **Finalise**: ``quarantine.parquet`` (every input not ingested, with a reason) and
   ``manifest.json`` (written last: its presence means the output is complete).

The driver only gathers study rows of shards in flight (≈ one or two shards of memory).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from mama_ray.config import Config, ConfigError
from mama_ray.data.captions import reason_from_procedure
from mama_ray.data.embed import image_records, load_tables, patient_splits
from mama_ray.data.schema import SCHEMA_VERSION
from mama_ray.data.shards import (
    MANIFEST,
    QUARANTINE,
    encode_image,
    quarantine_bytes,
    sha256,
    shard_bytes,
    shard_name,
)
from mama_ray.dicom import DicomError, DicomTags, PixelSettings, pseudonym, read_header, read_image
from mama_ray.storage import (
    StorageError,
    StorageOptions,
    check_bucket,
    delete,
    exists,
    filesystem,
    is_s3,
    join,
    list_files,
    read_bytes,
    write_bytes,
)

PARTS = "_parts"  # per-shard receipts and the plan fingerprint
PNG_BYTES_PER_PIXEL = 0.35  # planning estimate: stored PNG bytes per long_side² (cropped breast ≈ 0.6 area)
HEADERS_PER_TASK = 256  # folder mode: files whose headers one scan task reads
LABEL_KEYS = ("density", "birads", "mass_shape", "mass_density", "calc_find", "calc_distri")


@dataclass
class StudyTask:
    """One study to ingest: shard-row fields plus the images still to read."""

    study_id: str
    patient_id: str
    split: str
    procedure: str | None
    reason: str | None
    age: int | None
    race: str | None
    ethnicity: str | None
    images: list[dict] = field(default_factory=list)  # image_id, laterality, view, labels, source


@dataclass
class IngestPlan:
    shards: list[list[StudyTask]]  # planned shard → its studies, sorted by study_id
    quarantine: list[dict]  # inputs rejected before any pixel was read
    inputs: int  # metadata rows (tables) or files (folder)
    settings: dict  # preprocessing + planning settings, recorded in the manifest

    def fingerprint(self) -> str:
        body = [self.settings, [[[s.study_id, [i["source"] for i in s.images]] for s in sh] for sh in self.shards]]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class IngestSummary:
    out: str  # shard URI
    inputs: int  # inputs considered
    images: int  # images ingested
    quarantined: int  # inputs not ingested (images + quarantined = inputs)
    studies: int  # shard rows
    shards: int  # shard files
    skipped_shards: int  # shards already finished by an earlier run


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def _embed_studies(dicoms: str, tables: str, opts: StorageOptions) -> tuple[list[StudyTask], list[dict], int]:
    t = load_tables(tables, opts)
    records, quarantine = image_records(t, dicoms)
    by_study: dict[str, list] = defaultdict(list)
    for r in records:
        by_study[r.study_id].append(r)
    studies = []
    for sid, recs in by_study.items():
        recs = sorted(recs, key=lambda r: r.source)
        f = recs[0].fields
        images = [dict(image_id=r.image_id, laterality=r.fields.laterality, view=r.fields.view,
                       source=r.source, **{k: getattr(r.fields, k) for k in LABEL_KEYS}) for r in recs]
        studies.append(StudyTask(sid, recs[0].patient_id, "", f.procedure, f.reason, f.age, f.race,
                                 f.ethnicity, images))
    return studies, quarantine, len(t.metadata)


def _scan_header(row: dict, opts: StorageOptions) -> dict:
    """Ray Data map: header of one file → its tags as JSON, or the reason it is unusable."""
    try:
        return {"source": row["source"], "tags": json.dumps(asdict(read_header(row["source"], opts))), "reason": ""}
    except Exception as e:  # noqa: BLE001 - a bad file must never stop the job
        reason = e.reason if isinstance(e, DicomError) else f"{type(e).__name__}: {str(e)[:200]}"
        return {"source": row["source"], "tags": "", "reason": reason}


def _folder_image(source: str, root: str, tags: DicomTags) -> dict:
    rel = source[len(root):].lstrip("/")  # the image id hashes the path, unique even if UIDs repeat
    return dict(image_id=pseudonym(rel), laterality=tags.laterality, view=tags.view, source=source,
                **dict.fromkeys(LABEL_KEYS))


def _folder_studies(dicoms: str, admit_non_mg: bool, opts: StorageOptions) -> tuple[list[StudyTask], list[dict], int]:
    import ray

    files = list_files(dicoms, opts=opts)
    if not files:
        raise StorageError(f"{dicoms}: no files to ingest")
    root = _listing_root(dicoms)
    blocks = -(-len(files) // HEADERS_PER_TASK)  # header reads are cheap: batch them per task
    scanned = (ray.data.from_items([{"source": f} for f in files], override_num_blocks=blocks)
               .map(_scan_header, fn_kwargs={"opts": opts}).take_all())
    studies: dict[str, StudyTask] = {}
    quarantine = []
    for row in sorted(scanned, key=lambda r: r["source"]):
        tags = DicomTags(**json.loads(row["tags"])) if row["tags"] else None
        why = row["reason"] or _folder_reject(tags, admit_non_mg)
        if why:
            quarantine.append(dict(source=row["source"], image_id=None, study_id=None, reason=why))
            continue
        task = studies.setdefault(tags.study_id, StudyTask(
            tags.study_id, tags.patient_id or tags.study_id, "", tags.procedure,
            reason_from_procedure(tags.procedure), tags.age, None, None))
        task.images.append(_folder_image(row["source"], root, tags))
    return list(studies.values()), quarantine, len(files)


def _folder_reject(tags: DicomTags, admit_non_mg: bool) -> str:
    """Why a readable file cannot be ingested in folder mode ('' = it can)."""
    if tags.modality != "MG" and not admit_non_mg:
        return f"modality {tags.modality or 'missing'} is not MG (set ingest.admit_non_mg=true to admit it)"
    if not tags.study_id:
        return "no StudyInstanceUID: cannot group the image into a study"
    return ""


def _listing_root(dicoms: str) -> str:
    """``dicoms`` as :func:`list_files` spells its files' prefix (local paths come back absolute)."""
    return dicoms.rstrip("/") if is_s3(dicoms) else filesystem(dicoms)[1]


def _studies_per_shard(cfg: Config, studies: list[StudyTask]) -> int:
    if cfg.ingest.studies_per_shard > 0:
        return cfg.ingest.studies_per_shard
    per_image = PNG_BYTES_PER_PIXEL * cfg.ingest.long_side**2
    per_study = per_image * max(1.0, sum(len(s.images) for s in studies) / max(1, len(studies)))
    return max(1, int(cfg.ingest.shard_mb * 1e6 // per_study))


def plan_ingest(dicoms: str, cfg: Config, tables: str | None, opts: StorageOptions) -> IngestPlan:
    """Decide every shard's studies before reading any pixel (deterministic, see module doc)."""
    if tables:
        studies, quarantine, inputs = _embed_studies(dicoms, tables, opts)
    else:
        studies, quarantine, inputs = _folder_studies(dicoms, cfg.ingest.admit_non_mg, opts)
    studies.sort(key=lambda s: s.study_id)
    splits = patient_splits([s.patient_id for s in studies], cfg.ingest.split_fractions, cfg.run.seed)
    for s in studies:
        s.split = splits[s.patient_id]
    per_shard = _studies_per_shard(cfg, studies)
    shards = [studies[i: i + per_shard] for i in range(0, len(studies), per_shard)]
    ing = cfg.ingest
    settings = dict(mode="tables" if tables else "folder", long_side=ing.long_side, scaling=ing.scaling,
                    crop=ing.crop, codec=ing.codec, row_group_studies=ing.row_group_studies,
                    studies_per_shard=per_shard, split_fractions=ing.split_fractions, seed=cfg.run.seed,
                    admit_non_mg=ing.admit_non_mg)
    return IngestPlan(shards, quarantine, inputs, settings)


# ------------------------------------------------------------------------------------------
# Processing (Ray Data tasks) and writing
# ------------------------------------------------------------------------------------------


def _read_one(image: dict, settings: PixelSettings, codec: str, opts: StorageOptions) -> dict:
    img, _ = read_image(image["source"], settings, opts)  # H×W uint8
    return dict(image, image=encode_image(img, codec), codec=codec, height=img.shape[0], width=img.shape[1])


def ingest_study(item: dict, settings: PixelSettings, codec: str, opts: StorageOptions) -> dict:
    """Ray Data map, one study: ``{"shard", "payload"}`` with the pickled ``(row | None, quarantine)``."""
    task = StudyTask(**json.loads(item["task"]))
    images, quarantine = [], []
    for image in task.images:
        try:
            images.append(_read_one(image, settings, codec, opts))
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the job
            reason = e.reason if isinstance(e, DicomError) else f"{type(e).__name__}: {str(e)[:200]}"
            quarantine.append(dict(source=image["source"], image_id=image["image_id"],
                                   study_id=task.study_id, reason=reason))
    row = dict(asdict(task), images=images) if images else None
    return {"shard": item["shard"], "payload": pickle.dumps((row, quarantine))}


def _receipt(out: str, k: int) -> str:
    return join(out, PARTS, f"{shard_name(k).removesuffix('.parquet')}.json")


def _write_shard(out: str, k: int, results: list[tuple], cfg: Config, opts: StorageOptions) -> None:
    """Write one finished shard (if it has rows), then its receipt."""
    rows = [r for r, _ in results if r is not None]
    quarantine = [q for _, qs in results for q in qs]
    receipt = dict(shard=k, file=None, rows=len(rows), images=sum(len(r["images"]) for r in rows),
                   bytes=0, sha256=None, quarantine=quarantine,
                   splits={s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")})
    if rows:
        data = shard_bytes(rows, cfg.ingest.row_group_studies)
        write_bytes(join(out, shard_name(k)), data, opts)
        receipt.update(file=shard_name(k), bytes=len(data), sha256=sha256(data))
    write_bytes(_receipt(out, k), json.dumps(receipt, sort_keys=True).encode(), opts)


def _process(out: str, plan: IngestPlan, todo: list[int], cfg: Config, opts: StorageOptions) -> None:
    import ray

    items = [{"shard": k, "task": json.dumps(asdict(s))} for k in todo for s in plan.shards[k]]
    expected = {k: len(plan.shards[k]) for k in todo}
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(  # one block = one study
        ingest_study, fn_kwargs=dict(settings=PixelSettings.from_config(cfg.ingest),
                                     codec=cfg.ingest.codec, opts=opts),
        concurrency=cfg.ingest.concurrency or None)
    pending: dict[int, list] = defaultdict(list)
    for row in ds.iter_rows():
        k = int(row["shard"])
        pending[k].append(pickle.loads(row["payload"]))
        if len(pending[k]) == expected[k]:
            _write_shard(out, k, pending.pop(k), cfg, opts)
    assert not pending, f"shards never completed: {sorted(pending)}"


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------


def _check_plan(out: str, plan: IngestPlan, opts: StorageOptions) -> None:
    """Refuse to mix a different plan into an existing output; record ours otherwise."""
    uri = join(out, PARTS, "plan.json")
    mine = plan.fingerprint()
    if exists(uri, opts):
        theirs = json.loads(read_bytes(uri, opts))["fingerprint"]
        if theirs != mine:
            raise ConfigError(f"{out} already holds an ingest of other inputs or settings; "
                              "pass --overwrite to replace it or choose another --out")
        return
    write_bytes(uri, json.dumps({"fingerprint": mine}).encode(), opts)


def _finalise(out: str, plan: IngestPlan, opts: StorageOptions) -> dict:
    receipts = [json.loads(read_bytes(_receipt(out, k), opts)) for k in range(len(plan.shards))]
    quarantine = plan.quarantine + [q for r in receipts for q in r["quarantine"]]
    images = sum(r["images"] for r in receipts)
    assert images + len(quarantine) == plan.inputs, (images, len(quarantine), plan.inputs)
    manifest = dict(
        schema_version=SCHEMA_VERSION, settings=plan.settings,
        counts=dict(inputs=plan.inputs, images=images, quarantined=len(quarantine),
                    studies=sum(r["rows"] for r in receipts),
                    shards=sum(1 for r in receipts if r["file"]),
                    splits={s: sum(r["splits"][s] for r in receipts) for s in ("train", "val", "test")}),
        shards=[{k: r[k] for k in ("file", "rows", "images", "bytes", "sha256")} for r in receipts if r["file"]],
    )
    write_bytes(join(out, QUARANTINE), quarantine_bytes(quarantine), opts)
    write_bytes(join(out, MANIFEST), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), opts)
    return manifest


def run_ingest(dicoms: str, out: str, cfg: Config, tables: str | None = None,
               overwrite: bool = False) -> IngestSummary:
    """Ingest DICOMs (guided by EMBED tables if given) into Parquet shards at ``out``.

    Args:
        dicoms: folder or s3:// prefix of the DICOM files.
        out: folder or s3:// prefix for shards, ``manifest.json`` and ``quarantine.parquet``.
        cfg: the config (``ingest``, ``run.seed``, ``storage``).
        tables: folder or s3:// prefix of EMBED-style tables; None = derive everything from tags.
        overwrite: delete whatever ``out`` holds first; otherwise finished shards are kept.
    Returns:
        The counts of the finished output. Ray must already be initialised.
    """
    opts = StorageOptions.from_config(cfg.storage)
    for uri in (dicoms, out, tables or ""):
        check_bucket(uri, opts)
    if not tables and f"{_listing_root(out)}/".startswith(f"{_listing_root(dicoms)}/"):
        raise ConfigError(f"--out {out} lies inside --dicoms {dicoms}: its shards would become inputs")
    if overwrite:
        delete(out, opts)
    plan = plan_ingest(dicoms, cfg, tables, opts)
    _check_plan(out, plan, opts)
    todo = [k for k in range(len(plan.shards)) if not exists(_receipt(out, k), opts)]
    if todo:
        _process(out, plan, todo, cfg, opts)
    manifest = _finalise(out, plan, opts)
    c = manifest["counts"]
    return IngestSummary(out, c["inputs"], c["images"], c["quarantined"], c["studies"], c["shards"],
                         len(plan.shards) - len(todo))
