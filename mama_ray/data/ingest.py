"""The ingest job: EMBED tables or a DICOM folder → Parquet shards, on Ray.

1. **Plan** (driver, no pixels): with tables, :mod:`mama_ray.data.embed` gives per-image records
   (method.md §1.1–1.3 drop rules); with a folder only, Ray tasks read every header (a 64 KiB
   prefix of each file) and derives study, patient, laterality and view (no labels; non-MG
   modalities are quarantined unless ``ingest.admit_non_mg``). Ids and stored paths become keyed
   pseudonyms (HMAC-SHA256 under ``ingest.pseudonym_key``), ages over 89 become 90. Studies are
   sorted by id, split by patient (method.md §1.7), and cut into *planned shards* of ``studies_per_shard`` —
   so shard membership depends only on the inputs, the key and the config, and every run writes
   the same bytes.
2. **Process** (Ray tasks, a few studies each): read + normalise each DICOM (:mod:`mama_ray.dicom`)
   and encode it; a bad file becomes a quarantine entry, never a crash. The results stay in the
   object store.
3. **Write** (one Ray task per shard): the shard task's arguments are the ObjectRefs of its
   studies' results, so Ray hands it their rows from the object store once they are all done; it
   writes the shard (atomically, with its sha256), then a small ``_parts/shard-NNNNN.json``
   receipt, and returns that receipt. A re-run skips shards that have a receipt, so a killed run
   loses nothing written and ends with exactly the shards of a clean run.
4. **Finalise**: ``quarantine.parquet`` (every input not ingested, with a reason and its full
   path — for the operator) and ``manifest.json`` (written last: its presence means complete).

The driver holds the plan, ObjectRefs and receipts only — never an image's bytes — so its memory
and CPU do not grow with image size; ``ingest.resources`` places every task (e.g. on the CPU
pool's ``ingest_cpu`` nodes).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import ray

from mama_ray.config import Config, ConfigError
from mama_ray.data.captions import AGE_CAP, reason_from_procedure, safe_harbor_age
from mama_ray.data.embed import image_records, load_tables, patient_splits
from mama_ray.data.schema import SCHEMA_VERSION, SPLITS
from mama_ray.data.shards import (
    MANIFEST,
    QUARANTINE,
    encode_image,
    quarantine_bytes,
    sha256,
    shard_bytes,
    shard_name,
)
from mama_ray.dicom import (
    DicomError,
    DicomTags,
    PixelSettings,
    key_id,
    load_key,
    pseudonym,
    pseudonym_path,
    read_header,
    read_image,
)
from mama_ray.monitoring import IngestMonitor
from mama_ray.runtime import FORWARDED_PREFIXES
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
IMAGES_PER_TASK = 64  # images one study task reads: amortises the driver's CPU per Ray task (≈1 ms)
WIDTH_EVERY_S = 10.0  # how often the driver re-reads the cluster's size (ray.cluster_resources ≈ 10 ms)
LABEL_KEYS = ("density", "birads", "mass_shape", "mass_density", "calc_find", "calc_distri")
RECEIPT_BASE_BYTES = 4096  # a receipt's fixed fields (counts, sha256, node ids) fit in this
RECEIPT_BYTES_PER_IMAGE = 1024  # + this and the image's URI per planned image (its quarantine entry)


@dataclass
class StudyTask:
    """One study to ingest: shard-row fields plus the images still to read."""

    study_id: str  # pseudonym
    patient_id: str  # pseudonym
    split: str
    procedure: str | None
    reason: str | None
    age: int | None  # Safe Harbor: ≤ 90
    race: str | None
    ethnicity: str | None
    images: list[dict] = field(default_factory=list)  # image_id, laterality, view, labels, source, uri

    def payload(self) -> dict:
        """The task as a plain dict for a Ray task (shallow: ``dataclasses.asdict`` deep-copies)."""
        return dict(vars(self))


@dataclass
class IngestPlan:
    shards: list[list[StudyTask]]  # planned shard → its studies, sorted by study_id
    quarantine: list[dict]  # inputs rejected before any pixel was read
    inputs: int  # metadata rows (tables) or files (folder)
    settings: dict  # preprocessing + planning settings, recorded in the manifest

    def fingerprint(self) -> str:
        body = [self.settings, [[[s.study_id, [i["uri"] for i in s.images]] for s in sh] for sh in self.shards]]
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
    key_id: str  # public fingerprint of the pseudonym key (never the key)


# ------------------------------------------------------------------------------------------
# Privacy: the key, stored paths and ids
# ------------------------------------------------------------------------------------------


def pseudonym_key(cfg: Config, opts: StorageOptions) -> bytes:
    """The HMAC key ``ingest.pseudonym_key`` names (a ConfigError, exit 2, if it names none)."""
    spec = cfg.ingest.pseudonym_key
    try:
        if spec.startswith("env:") and spec[4:].startswith(FORWARDED_PREFIXES):
            raise ValueError(f"names {spec[4:]!r}: variables starting with {', '.join(FORWARDED_PREFIXES)} are "
                             "forwarded to every Ray worker (and shown in the dashboard); use another name")
        return load_key(spec, opts)
    except ValueError as e:
        raise ConfigError(str(e), "ingest.pseudonym_key") from None


def _roots(dicoms: str) -> tuple[str, ...]:
    """The prefixes of ``--dicoms``' files: as given, and as :func:`list_files` spells them."""
    return tuple(f"{r}/" for r in dict.fromkeys((dicoms.rstrip("/"), _listing_root(dicoms))))


def _relative(uri: str, roots: tuple[str, ...]) -> str:
    """``uri`` relative to ``--dicoms`` (see :func:`_roots`), else the URI without its scheme."""
    for root in roots:
        if uri.startswith(root):
            return uri[len(root):]
    return uri.split("://", 1)[-1].lstrip("/")


def _image(uri: str, roots: tuple[str, ...], key: bytes, keep_path: bool, **fields) -> dict:
    """An image to read: ``uri`` is where (never stored), ``source`` what the shard keeps."""
    rel = _relative(uri, roots)  # the image id hashes the path: unique even if UIDs repeat
    return dict(image_id=pseudonym(rel, key), source=uri if keep_path else pseudonym_path(rel, key),
                uri=uri, **fields)


def reason_kind(reason: str) -> str:
    """A quarantine reason without its details — a small set of labels (metrics, manifest)."""
    return reason.split(" (", 1)[0].split(": ", 1)[0]


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def _embed_studies(dicoms: str, tables: str, cfg: Config, key: bytes,
                   opts: StorageOptions) -> tuple[list[StudyTask], list[dict], int]:
    t = load_tables(tables, opts)
    records, rejected = image_records(t, dicoms)
    by_study: dict[str, list] = defaultdict(list)
    for r in records:
        by_study[r.study_id].append(r)
    studies, roots = [], _roots(dicoms)
    for sid, recs in by_study.items():
        recs = sorted(recs, key=lambda r: r.source)
        f = recs[0].fields
        images = [_image(r.source, roots, key, cfg.ingest.keep_source_paths, laterality=r.fields.laterality,
                         view=r.fields.view, **{k: getattr(r.fields, k) for k in LABEL_KEYS}) for r in recs]
        studies.append(StudyTask(pseudonym(sid, key), pseudonym(recs[0].patient_id, key), "", f.procedure,
                                 f.reason, safe_harbor_age(f.age), f.race, f.ethnicity, images))
    quarantine = [dict(q, study_id=pseudonym(q["study_id"], key),
                       image_id=pseudonym(_relative(q["source"], roots), key)) for q in rejected]
    return studies, quarantine, len(t.metadata)


def _failure(e: Exception) -> str:
    return e.reason if isinstance(e, DicomError) else f"{type(e).__name__}: {str(e)[:200]}"


def _scan_header(source: str, key: bytes, opts: StorageOptions) -> dict:
    """Header of one file → its tags, or the reason it is unusable."""
    try:
        return {"source": source, "tags": asdict(read_header(source, key, opts)), "reason": ""}
    except Exception as e:  # noqa: BLE001 - a bad file must never stop the job
        return {"source": source, "tags": None, "reason": _failure(e)}


@ray.remote
def _scan_task(files: list[str], key: bytes, opts: StorageOptions) -> list[dict]:
    """Headers of a batch of files (header reads are cheap: one task reads many)."""
    return [_scan_header(f, key, opts) for f in files]


def _placement(cfg: Config) -> dict:
    """Ray task options of every ingest task: one CPU plus ``ingest.resources``."""
    return dict(num_cpus=1, resources=dict(cfg.ingest.resources) or None)


def _scan(files: list[str], cfg: Config, key: bytes, opts: StorageOptions) -> list[dict]:
    """Every file's header, read by Ray tasks (at most ``ingest.concurrency`` at once)."""
    scan = _scan_task.options(**_placement(cfg))
    pending = deque(files[i: i + HEADERS_PER_TASK] for i in range(0, len(files), HEADERS_PER_TASK))
    limit, running, rows = cfg.ingest.concurrency or len(pending), [], []
    while pending or running:
        while pending and len(running) < limit:
            running.append(scan.remote(pending.popleft(), key, opts))
        (done,), running = ray.wait(running, num_returns=1)
        rows += ray.get(done)
    return rows


def _folder_studies(dicoms: str, cfg: Config, key: bytes,
                    opts: StorageOptions) -> tuple[list[StudyTask], list[dict], int]:
    files = list_files(dicoms, opts=opts)
    if not files:
        raise StorageError(f"{dicoms}: no files to ingest")
    studies: dict[str, StudyTask] = {}
    quarantine, roots = [], _roots(dicoms)
    for row in sorted(_scan(files, cfg, key, opts), key=lambda r: r["source"]):
        tags = DicomTags(**row["tags"]) if row["tags"] else None
        why = row["reason"] or _folder_reject(tags, cfg.ingest.admit_non_mg)
        if why:
            quarantine.append(dict(source=row["source"], image_id=None, study_id=None, reason=why))
            continue
        task = studies.setdefault(tags.study_id, StudyTask(
            tags.study_id, tags.patient_id or tags.study_id, "", tags.procedure,
            reason_from_procedure(tags.procedure), safe_harbor_age(tags.age), None, None))
        task.images.append(_image(row["source"], roots, key, cfg.ingest.keep_source_paths,
                                  laterality=tags.laterality, view=tags.view, **dict.fromkeys(LABEL_KEYS)))
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


def plan_ingest(dicoms: str, cfg: Config, tables: str | None, key: bytes, opts: StorageOptions) -> IngestPlan:
    """Decide every shard's studies before reading any pixel (deterministic, see module doc)."""
    if tables:
        studies, quarantine, inputs = _embed_studies(dicoms, tables, cfg, key, opts)
    else:
        studies, quarantine, inputs = _folder_studies(dicoms, cfg, key, opts)
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
                    admit_non_mg=ing.admit_non_mg, pseudonyms="hmac-sha256", key_id=key_id(key),
                    keep_source_paths=ing.keep_source_paths, age_cap=AGE_CAP)
    return IngestPlan(shards, quarantine, inputs, settings)


# ------------------------------------------------------------------------------------------
# Ray tasks: read studies, write shards
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    """What every task needs besides its studies (no key: the plan already holds the pseudonyms)."""

    out: str
    settings: PixelSettings
    codec: str
    row_group_studies: int
    opts: StorageOptions


def ingest_study(task: dict, work: _Work) -> tuple[dict | None, list[dict]]:
    """One study → ``(its shard row, or None if no image was usable; quarantine entries)``."""
    images, quarantine = [], []
    for image in task["images"]:
        try:
            img = read_image(image["uri"], work.settings, work.opts)  # H×W uint8
            data = encode_image(img, work.codec)
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the job
            quarantine.append(dict(source=image["uri"], image_id=image["image_id"],
                                   study_id=task["study_id"], reason=_failure(e)))
            continue
        kept = {k: v for k, v in image.items() if k != "uri"}  # where it was read is not stored
        images.append(dict(kept, image=data, codec=work.codec, height=img.shape[0], width=img.shape[1]))
    return (dict(task, images=images) if images else None), quarantine


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote
def _studies_task(tasks: list[dict], work: _Work) -> dict:
    """A few studies of one shard → their rows and quarantine entries (for its shard task)."""
    rows, quarantine = [], []
    for task in tasks:
        row, rejected = ingest_study(task, work)
        rows += [row] if row else []
        quarantine += rejected
    return {"rows": rows, "quarantine": quarantine, "node": _node()}


@ray.remote
def _shard_task(k: int, work: _Work, *parts: dict) -> dict:
    """One planned shard: ``parts`` are its study results (resolved by Ray) → shard + receipt."""
    return _write_shard(work, k, parts)


def _receipt(out: str, k: int) -> str:
    return join(out, PARTS, f"{shard_name(k).removesuffix('.parquet')}.json")


def _write_shard(work: _Work, k: int, parts: tuple[dict, ...]) -> dict:
    """Write one finished shard (if it has rows), then its receipt; returns the receipt.

    The receipt carries what the driver (and a metrics counter fed from its loop) needs: images,
    quarantined inputs by reason, rows, bytes written, and the nodes that did the work.
    """
    rows = [r for p in parts for r in p["rows"]]
    quarantine = [q for p in parts for q in p["quarantine"]]
    receipt = dict(shard=k, file=None, rows=len(rows), images=sum(len(r["images"]) for r in rows),
                   bytes=0, sha256=None, quarantine=quarantine, quarantined=len(quarantine),
                   reasons=dict(Counter(reason_kind(q["reason"]) for q in quarantine)),
                   splits={s: sum(r["split"] == s for r in rows) for s in SPLITS},
                   nodes=sorted({p["node"] for p in parts} | {_node()}))
    if rows:
        data = shard_bytes(rows, work.row_group_studies)
        write_bytes(join(work.out, shard_name(k)), data, work.opts)
        receipt.update(file=shard_name(k), bytes=len(data), sha256=sha256(data))
    write_bytes(_receipt(work.out, k), json.dumps(receipt, sort_keys=True).encode(), work.opts)
    return receipt


def _receipt_bound(shard: list[StudyTask]) -> int:
    """Most bytes a shard's receipt can take: fixed fields + one quarantine entry per image."""
    return RECEIPT_BASE_BYTES + sum(len(i["uri"]) + RECEIPT_BYTES_PER_IMAGE for s in shard for i in s.images)


def _studies_per_task(plan: IngestPlan) -> int:
    studies = [s for sh in plan.shards for s in sh]
    per_study = sum(len(s.images) for s in studies) / max(1, len(studies))
    return max(1, min(plan.settings["studies_per_shard"], round(IMAGES_PER_TASK / max(per_study, 1.0))))


def _slots(resources: dict[str, float]) -> int:
    """Tasks the cluster can run at once now (at least 1: an autoscaler may still add nodes)."""
    total = ray.cluster_resources()
    need = {"CPU": 1.0, **resources}
    return max(1, int(min(total.get(k, 0.0) / v for k, v in need.items())))


class _Driver:
    """The driver's loop: submit study tasks and shard tasks, collect receipts.

    Without ``ingest.concurrency`` it keeps enough shards open for twice the tasks the cluster
    can run now (at least 2); with it, at most that many study tasks run at once.
    """

    def __init__(self, plan: IngestPlan, todo: list[int], cfg: Config, work: _Work):
        place = _placement(cfg)
        self.study_fn, self.shard_fn = _studies_task.options(**place), _shard_task.options(**place)
        self.plan, self.work, self.cfg = plan, work, cfg
        per = _studies_per_task(plan)
        self.pending = deque((k, i, per) for k in todo for i in range(0, len(plan.shards[k]), per))
        self.tasks_of = {k: -(-len(plan.shards[k]) // per) for k in todo}
        self.per_shard = max(self.tasks_of.values(), default=1)  # study tasks of a full shard
        self.width, self.width_at = 2, -float("inf")  # shards open at once, and when it was set
        self.gathering: dict[int, list] = defaultdict(list)  # shard → refs of its study tasks
        self.writers: dict = {}  # shard task ref → shard
        self.running: set = set()  # study task refs (tracked only under ingest.concurrency)

    def _room(self) -> bool:
        if self.cfg.ingest.concurrency:
            return len(self.running) < self.cfg.ingest.concurrency
        if self.pending[0][0] in self.gathering:  # a shard is always submitted whole
            return True
        if time.monotonic() > self.width_at + WIDTH_EVERY_S:  # the cluster may have grown
            self.width = max(2, -(-2 * _slots(self.cfg.ingest.resources) // self.per_shard))
            self.width_at = time.monotonic()
        return len(self.writers) + len(self.gathering) < self.width

    def _submit(self) -> None:
        while self.pending and self._room():
            k, i, per = self.pending.popleft()
            studies = [s.payload() for s in self.plan.shards[k][i: i + per]]
            ref = self.study_fn.remote(studies, self.work)
            self.gathering[k].append(ref)
            if self.cfg.ingest.concurrency:
                self.running.add(ref)
            if len(self.gathering[k]) == self.tasks_of[k]:
                self.writers[self.shard_fn.remote(k, self.work, *self.gathering.pop(k))] = k

    def run(self, on_shard: Callable[[dict], None] | None) -> None:
        while self.pending or self.writers:
            self._submit()
            waiting = [*self.writers, *self.running]
            assert waiting, "work left but nothing running"
            (ref,), _ = ray.wait(waiting, num_returns=1, fetch_local=False)
            if ref not in self.writers:
                self.running.discard(ref)
                continue
            k = self.writers.pop(ref)
            receipt = ray.get(ref)
            assert len(json.dumps(receipt)) <= _receipt_bound(self.plan.shards[k]), f"shard {k}: receipt too large"
            if on_shard:
                on_shard(receipt)


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
            raise ConfigError(f"{out} already holds an ingest of other inputs, settings or pseudonym key; "
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
                    quarantine_reasons=dict(sorted(Counter(reason_kind(q["reason"]) for q in quarantine).items())),
                    studies=sum(r["rows"] for r in receipts),
                    shards=sum(1 for r in receipts if r["file"]),
                    splits={s: sum(r["splits"][s] for r in receipts) for s in SPLITS}),
        shards=[{k: r[k] for k in ("file", "rows", "images", "bytes", "sha256")} for r in receipts if r["file"]],
    )
    write_bytes(join(out, QUARANTINE), quarantine_bytes(quarantine), opts)
    write_bytes(join(out, MANIFEST), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), opts)
    return manifest


def run_ingest(dicoms: str, out: str, cfg: Config, tables: str | None = None, overwrite: bool = False,
               on_shard: Callable[[dict], None] | None = None) -> IngestSummary:
    """Ingest DICOMs (guided by EMBED tables if given) into Parquet shards at ``out``.

    Args:
        dicoms: folder or s3:// prefix of the DICOM files.
        out: folder or s3:// prefix for shards, ``manifest.json`` and ``quarantine.parquet``.
        cfg: the config (``ingest``, ``run.seed``, ``storage``); ``ingest.pseudonym_key`` must
            name a key.
        tables: folder or s3:// prefix of EMBED-style tables; None = derive everything from tags.
        overwrite: delete whatever ``out`` holds first; otherwise finished shards are kept.
        on_shard: called on the driver with each receipt as its shard is written (``shard``,
            ``images``, ``rows``, ``bytes``, ``quarantined``, ``reasons`` {kind: n}, ``nodes``) —
            e.g. to feed progress counters.
    Returns:
        The counts of the finished output. Ray must already be initialised.
    """
    opts = StorageOptions.from_config(cfg.storage)
    key = pseudonym_key(cfg, opts)
    for uri in (dicoms, out, tables or ""):
        check_bucket(uri, opts)
    if not tables and f"{_listing_root(out)}/".startswith(f"{_listing_root(dicoms)}/"):
        raise ConfigError(f"--out {out} lies inside --dicoms {dicoms}: its shards would become inputs")
    if overwrite:
        delete(out, opts)
    plan = plan_ingest(dicoms, cfg, tables, key, opts)
    _check_plan(out, plan, opts)
    todo = [k for k in range(len(plan.shards)) if not exists(_receipt(out, k), opts)]
    if todo:
        work = _Work(out, PixelSettings.from_config(cfg.ingest), cfg.ingest.codec, cfg.ingest.row_group_studies, opts)
        monitor = IngestMonitor(out)  # the dashboard's ingest counters: this run's work, receipt by receipt
        monitor.quarantined(Counter(reason_kind(q["reason"]) for q in plan.quarantine))
        _Driver(plan, todo, cfg, work).run(lambda r: (monitor.shard(r), on_shard and on_shard(r)))
    manifest = _finalise(out, plan, opts)
    c = manifest["counts"]
    return IngestSummary(out, c["inputs"], c["images"], c["quarantined"], c["studies"], c["shards"],
                         len(plan.shards) - len(todo), plan.settings["key_id"])
