"""The training and eval pipeline on a real local Ray cluster over synthetic shards (issue 6)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mama_ray import config, storage
from mama_ray.data import captions, pipeline, samples, stream, transforms
from mama_ray.data.shards import decode_image

SIZE, MBS, MAX_LEN = 32, 4, 144
# How a masked meta field reads in the caption (the fixture's real values are never "unknown").
MASKED_PHRASE = {
    "race": r"This patient is unknown,",
    "ethnicity": r", unknown, and",
    "age": r"and unknown years old",
    "type": r"This is a unknown full-field",
    "side": r"of the unknown breast",
    "view": r"with unknown view",
}


def make_cfg(shards: str, **extra) -> config.Config:
    return config.load("tiny_cpu", {
        "data.shards": shards, "data.image_size": SIZE, "train.micro_batch_size": MBS,
        "data.map_batch_size": 32, "data.map_concurrency": 2,
        "text.max_len": MAX_LEN, **extra})


def rows_of(batches: list[dict]) -> list[dict]:
    """Micro-batches → one dict per sample (tensors as numpy)."""
    out = []
    for b in batches:
        for i in range(len(b["study_id"])):
            out.append({k: (v[i].numpy() if isinstance(v, torch.Tensor) else v[i]) for k, v in b.items()})
    return out


def run_epoch(cfg, epoch=0, rank=0, world=1, skip=0) -> list[dict]:
    return rows_of(list(pipeline.iter_train_batches(cfg, epoch, rank, world, skip, drop_last=False)))


def same_samples(a: list[dict], b: list[dict]) -> bool:
    keys = ("image1", "image2", "input_ids", "sep_mask", "image_id", "image2_id", "sample_id")
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for x, y in zip(a, b, strict=True) for k in keys)


@pytest.fixture(scope="module")
def truth(shard_set):
    root, studies = shard_set
    usable = {s["study_id"]: [i["image_id"] for i in s["images"] if i["birads"]] for s in studies}
    train = sorted(i for s in studies if s["split"] == "train" for i in usable[s["study_id"]])
    return {"usable": usable, "train": train, "studies": {s["study_id"]: s for s in studies}}


@pytest.fixture(scope="module")
def epoch_run(ray_session, shard_set):
    """One epoch of rank 0 of 1: ``(cfg, iterator, micro-batches)``."""
    cfg = make_cfg(str(shard_set[0]))
    it = pipeline.iter_train_batches(cfg, 0, drop_last=False)
    return cfg, it, list(it)


@pytest.fixture(scope="module")
def epoch0(epoch_run):
    cfg, _, batches = epoch_run
    return cfg, rows_of(batches)


def test_epoch_has_one_sample_per_usable_training_image(epoch0, truth):
    _, rows = epoch0
    ids = [r["image_id"] for r in rows]
    # one rank: whole micro-batches, so fewer than one micro-batch of images is left out
    assert len(ids) == len(set(ids)) == len(truth["train"]) // MBS * MBS
    assert set(ids) <= set(truth["train"])
    assert [int(r["sample_index"]) for r in rows] == list(range(len(ids)))
    assert [int(r["epoch_position"]) for r in rows] == list(range(len(ids)))
    # row-group order and the spread order move samples away from the stored order
    assert ids != sorted(ids)


def test_second_image_comes_from_the_same_study(epoch0, truth):
    _, rows = epoch0
    for r in rows:
        assert r["image2_id"] in truth["usable"][r["study_id"]]
        assert r["image_id"] in truth["usable"][r["study_id"]]
        assert bool(r["pair_same_image"]) == (r["image2_id"] == r["image_id"])
        if len(truth["usable"][r["study_id"]]) == 1:
            assert r["pair_same_image"]


def test_cross_image_share_is_about_one_half(epoch0, truth):
    _, rows = epoch0
    multi = [r for r in rows if len(truth["usable"][r["study_id"]]) > 1]
    share = np.mean([not r["pair_same_image"] for r in multi])
    assert len(multi) >= 80
    assert 0.35 <= share <= 0.65, share


def test_each_meta_field_is_masked_in_about_80_percent_of_captions(epoch0):
    _, rows = epoch0
    for field, phrase in MASKED_PHRASE.items():
        share = np.mean([bool(re.search(phrase, r["caption"])) for r in rows])
        assert 0.68 <= share <= 0.92, (field, share)


def test_tokens_match_the_caption(epoch0):
    cfg, rows = epoch0
    for r in rows[:10]:
        want = pipeline.caption_tokens(cfg, [captions.to_model_text(r["caption"])])
        assert np.array_equal(r["input_ids"], want["input_ids"][0])
        assert np.array_equal(r["attention_mask"], want["attention_mask"][0])
        n_sep = r["caption"].count(".") + r["caption"].count(";")
        assert r["attention_mask"].sum() < MAX_LEN  # not truncated, so every separator is there
        assert r["sep_mask"].sum() == n_sep


def test_batches_follow_the_sample_contract(epoch_run, truth):
    _, it, batches = epoch_run
    assert len(batches) == it.num_batches == len(truth["train"]) // MBS  # the plan cuts whole micro-batches
    assert it.wait_seconds > 0 and it.last_wait >= 0
    b = batches[0]
    assert set(b) >= {"image1", "image2", "input_ids", "attention_mask", "sep_mask", "density",
                      "birads", "study_id", "image_id", "sample_index", "pair_same_image"}
    for key in ("image1", "image2"):
        assert b[key].dtype == torch.uint8 and tuple(b[key].shape) == (MBS, 3, SIZE, SIZE)
        assert torch.equal(b[key][:, 0], b[key][:, 2])
    for key in ("input_ids", "attention_mask"):
        assert b[key].dtype == torch.int64 and tuple(b[key].shape) == (MBS, MAX_LEN)
    assert b["sep_mask"].dtype == torch.bool and tuple(b["sep_mask"].shape) == (MBS, MAX_LEN)
    assert b["density"].dtype == torch.int64 and b["birads"].dtype == torch.int64
    for i, image_id in enumerate(b["image_id"]):
        img = next(x for x in truth["studies"][b["study_id"][i]]["images"] if x["image_id"] == image_id)
        assert int(b["density"][i]) == img["density"] - 1
        assert int(b["birads"][i]) == "ANBPSMK".index(img["birads"])


def test_drop_last_keeps_whole_micro_batches_only(epoch_run, truth):
    cfg, _, _ = epoch_run
    plan = pipeline.rank_plan(cfg, 0, 0, 1, skip_samples=2)  # a resume that is not batch-aligned
    n = plan.num_samples - 2
    assert pipeline.TrainBatches(None, plan, MBS, 1, drop_last=True).num_batches == n // MBS
    assert pipeline.TrainBatches(None, plan, MBS, 1, drop_last=False).num_batches == -(-n // MBS)
    per_rank = pipeline.samples_per_rank(cfg, 3)
    # three ranks: whole micro-batches each, at most one global batch (3 × MBS) left out
    assert per_rank % MBS == 0 and 0 <= len(truth["train"]) - 3 * per_rank <= 3 * MBS


def test_same_seed_same_batches_and_epochs_differ(epoch0):
    cfg, rows = epoch0
    assert same_samples(run_epoch(cfg), rows)
    # another epoch: (nearly) the same images in another order, with other views
    orders = [pipeline.rank_plan(cfg, e, 0, 1).samples for e in (0, 1)]
    assert len(set(orders[0]) & set(orders[1])) >= len(orders[0]) - MBS
    assert orders[0].tolist() != orders[1].tolist()


def test_restart_mid_epoch_yields_exactly_the_rest(epoch0):
    cfg, single = epoch0
    full = run_epoch(cfg, rank=1, world=2)
    resumed = run_epoch(cfg, rank=1, world=2, skip=5)
    assert len(resumed) == len(full) - 5 and same_samples(resumed, full[5:])
    # a sample depends on (seed, epoch, its image) only, not on the rank or the world size
    by_id = {int(r["sample_id"]): r for r in single}
    shared = [r for r in full if int(r["sample_id"]) in by_id]
    assert len(shared) >= len(full) - MBS
    assert same_samples(shared, [by_id[int(r["sample_id"])] for r in shared])


def test_next_epoch_is_prefetched_with_the_same_samples(epoch0):
    cfg, _ = epoch0
    assert cfg.data.prefetch_next_epoch  # the default
    stream = pipeline.TrainStream(cfg, 1, 2)
    list(stream.epoch(1))  # 3/4 through, it starts epoch 2
    it = stream.epoch(2, drop_last=False, prefetch_next=False)  # takes it, starts none
    assert it.prefetched
    prefetched = rows_of(list(it))
    assert not stream.epoch(3).prefetched
    assert same_samples(prefetched, run_epoch(cfg, epoch=2, rank=1, world=2))
    # a resumed request must not take the stream started for the epoch's beginning
    list(stream.epoch(2))
    resumed = stream.epoch(3, skip_samples=MBS, drop_last=False)
    assert not resumed.prefetched
    assert same_samples(rows_of(list(resumed)), run_epoch(cfg, epoch=3, rank=1, world=2)[MBS:])
    stream.close()


def global_shuffle_duplicates(counts: list[int], batch: int) -> float:
    """E[batch − distinct studies] of a micro-batch under a uniform random order of the images."""
    from math import comb

    n = sum(counts)
    return batch - sum(1 - comb(n - c, batch) / comb(n, batch) for c in counts)


def test_four_ranks_read_disjoint_row_groups_and_keep_studies_apart(ray_session, shard_set, truth):
    cfg = make_cfg(str(shard_set[0]))
    index = pipeline.split_index(cfg, "train")
    plans = [pipeline.rank_plan(cfg, 0, r, 4) for r in range(4)]
    units = [{u for w in p.windows for u in w.units} for p in plans]
    assert sum(len(u) for u in units) == len(set().union(*units)) == len(index.flat.unit_file)  # each read once
    runs = [run_epoch(cfg, 0, r, 4) for r in range(4)]
    ids = [r["image_id"] for run in runs for r in run]
    assert len(ids) == len(set(ids)) and set(ids) <= set(truth["train"])  # no image twice
    assert len({len(run) for run in runs}) == 1 and len(runs[0]) % MBS == 0  # equal step counts
    assert len(truth["train"]) - len(ids) <= 4 * MBS  # at most one global batch left out
    dups = [MBS - len({r["study_id"] for r in run[m : m + MBS]}) for run in runs for m in range(0, len(run), MBS)]
    counts = [len(v) for sid, v in truth["usable"].items() if truth["studies"][sid]["split"] == "train"]
    assert np.mean(dups) <= 1.5 * global_shuffle_duplicates(counts, MBS)


def test_work_items_read_whole_row_groups_once_and_only_where_needed():
    # file a: 7 rows in row groups of 2, 2, 3; the split's studies are rows 0, 1, 3, 4, 6
    index = pipeline.SplitIndex(
        files=("a", "b"), study_ids=(("s0", "s1", "s2", "s3", "s4"), ("t0", "t1")),
        counts=(np.ones(5, np.int64), np.ones(2, np.int64)),
        rows=(np.array([0, 1, 3, 4, 6]), np.array([0, 1])), row_groups=((2, 2, 3), (2,)))
    wanted = {"s0", "s3", "s4"}.__contains__  # rows 0 (group 0), 4 and 6 (group 2); nothing in b
    # group 1 and file b are not read; rows 4, 6 are rows 0, 2 of group 2, after group 0's 2 rows
    assert stream._work_items(index, [0, 1], wanted, 2) == [
        {"path": "a", "row_groups": [0, 2], "take": [0, 2, 4]}]
    assert stream._work_items(index, [1, 0], wanted, 1) == [
        {"path": "a", "row_groups": [0], "take": [0]}, {"path": "a", "row_groups": [2], "take": [0, 2]}]


def test_reading_from_s3_gives_the_same_samples(epoch0, s3_bucket, shard_set):
    cfg, rows = epoch0
    _, bucket = s3_bucket
    storage.upload_dir(shard_set[0], f"s3://{bucket}/shards")
    s3_rows = run_epoch(config.override(cfg, {"data.shards": f"s3://{bucket}/shards"}))
    assert same_samples(s3_rows, rows)


def test_eval_dataset_is_unmasked_one_row_per_image(ray_session, shard_set, truth):
    cfg = make_cfg(str(shard_set[0]))
    rows = pipeline.build_eval_dataset(cfg, "val").union(pipeline.build_eval_dataset(cfg, "test")).take_all()
    for split in ("val", "test"):
        want = sorted(i for sid, s in truth["studies"].items() if s["split"] == split for i in truth["usable"][sid])
        assert sorted(r["image_id"] for r in rows if truth["studies"][r["study_id"]]["split"] == split) == want
    assert len(rows) == sum(1 for s in truth["studies"].values() if s["split"] != "train"
                            for _ in truth["usable"][s["study_id"]])
    for r in rows:
        study = truth["studies"][r["study_id"]]
        img = next(x for x in study["images"] if x["image_id"] == r["image_id"])
        fields = pipeline.caption_fields_from_study(study, img)
        assert pipeline.eval_caption_fields(r) == fields
        tokens = pipeline.caption_tokens(cfg, [captions.to_model_text(captions.caption_text(fields))])
        assert np.array_equal(r["input_ids"], tokens["input_ids"][0])  # nothing masked
        gray = transforms.eval_transform(decode_image(img["image"], "png"), SIZE)
        assert np.array_equal(r["image"], transforms.to_rgb_chw(gray))


def test_label_dataset_gives_the_eval_rows_labels_without_reading_images(ray_session, shard_set, truth):
    cfg = make_cfg(str(shard_set[0]))
    rows = pipeline.build_label_dataset(cfg, "test").take_all()
    assert sorted(rows[0]) == ["birads", "density", "image_id"]
    want = {}  # image id → (density class, BI-RADS class), from the fixture's own rows
    for s in truth["studies"].values():
        for img in s["images"]:
            if s["split"] == "test" and img["birads"]:
                want[img["image_id"]] = (img["density"] - 1, "ANBPSMK".index(img["birads"]))
    assert {r["image_id"]: (r["density"], r["birads"]) for r in rows} == want
    # The read itself leaves the images' bytes out.
    table = pq.ParquetFile(sorted(shard_set[0].glob("*.parquet"))[0]).read(columns=samples.LABEL_COLUMNS)
    assert "image" not in table.schema.field("images").type.value_type.names


def test_bad_inputs_raise_clear_errors(tmp_path, shard_set):
    with pytest.raises(ValueError, match="data.shards is empty"):
        pipeline.split_index(make_cfg(""), "train")
    with pytest.raises(ValueError, match="no .parquet shards"):
        pipeline.split_index(make_cfg(str(tmp_path)), "train")
    cfg = make_cfg(str(shard_set[0]))
    with pytest.raises(ValueError, match="split 'dev'"):
        pipeline.split_index(cfg, "dev")
    with pytest.raises(ValueError, match="rank 2"):
        pipeline.rank_plan(cfg, 0, 2, 2)
    with pytest.raises(ValueError, match="skip_samples"):
        pipeline.rank_plan(cfg, 0, 0, 1, skip_samples=10_000)


def test_shard_list_comes_from_the_manifest_else_skips_the_quarantine(tmp_path, shard_set):
    import json
    import shutil

    from mama_ray.data.shards import QUARANTINE, quarantine_bytes

    root, _ = shard_set
    folder = tmp_path / "shards"
    shutil.copytree(root, folder)
    (folder / QUARANTINE).write_bytes(quarantine_bytes([]))
    _, files = pipeline.shard_paths(str(folder), storage.StorageOptions())
    assert [f.rsplit("/", 1)[-1] for f in files] == sorted(p.name for p in root.glob("*.parquet"))
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-00001.parquet"},
                                                                 {"file": "shard-00000.parquet"}]}))
    _, files = pipeline.shard_paths(str(folder), storage.StorageOptions())
    assert files == [str(folder / "shard-00000.parquet"), str(folder / "shard-00001.parquet")]


def test_elastic_resume_plans_what_two_ranks_left_among_four(ray_session, shard_set, truth):
    from mama_ray.train.launch import PipelineSource

    cfg = make_cfg(str(shard_set[0]))
    consumed = 2 * MBS  # per rank, in the 2-rank segment
    done = {int(q) for r in range(2) for q in pipeline.rank_plan(cfg, 0, r, 2).samples[:consumed]}
    history = ((2, consumed, MBS, 1),)
    # the loop's counter includes the earlier segment; the new ranks start at its end
    sources = [PipelineSource(cfg, r, 4, local_ranks=1) for r in range(4)]
    runs = [rows_of(list(s.epoch_batches(0, consumed, history))) for s in sources]
    for s in sources:
        s.stream.close()
    rest = [int(r["sample_id"]) for run in runs for r in run]
    assert len(rest) == len(set(rest)) and not done & set(rest)  # nothing repeated
    assert len({len(run) for run in runs}) == 1  # equal steps on the new ranks
    n = len(truth["train"])
    assert n - len(done) - len(rest) <= 4 * MBS  # what is left comes back but for one global batch
    offset = 2 * consumed  # positions continue after what the 2 ranks consumed
    assert sorted(int(r["epoch_position"]) for run in runs for r in run) == list(range(offset, offset + len(rest)))


def test_an_execution_refreshes_its_limits_every_tenth_of_a_second_until_it_has_them(ray_session, shard_set):
    """Ray Data reads an execution's limits from its coordinator at most once per interval, and the
    first read answers zero: at Ray's 1 s a new execution ran one map task for its first second
    (docs/pipeline.md, "What held the second map task back"). After building a dataset, a resource
    manager refreshes every 0.1 s while its CPU limit is zero and at Ray's own interval after. If
    a Ray upgrade renames what this relies on, this fails instead of the stream silently slowing."""
    import time

    from ray.data._internal.execution.interfaces import ExecutionOptions, ExecutionResources
    from ray.data._internal.execution.resource_manager import ResourceManager

    pipeline.build_eval_dataset(make_cfg(str(shard_set[0])), "val")
    assert stream.LIMITS_REFRESH_S == 0.1 and ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 1  # Ray's
    answers = [ExecutionResources.zero(), ExecutionResources(cpu=2, object_store_memory=10**9)]
    asked = []

    def coordinator():  # what the coordinator actor answers: nothing yet, then the node's CPUs
        asked.append(time.monotonic())
        return answers[min(len(asked) - 1, 1)]

    manager = object.__new__(ResourceManager)  # only what get_global_limits reads
    manager._options, manager._get_total_resources = ExecutionOptions(), coordinator
    manager._object_store_memory_limit_fraction = 0.5
    manager._global_limits, manager._global_limits_last_update_time = ExecutionResources.zero(), 0
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        manager.get_global_limits()
        time.sleep(0.005)
    # zero → asked again ≈ 0.1 s later → 2 CPUs: then not again within Ray's 1 s
    assert len(asked) == 2 and 0.09 <= asked[1] - asked[0] < 0.3, asked
    assert manager.get_global_limits().cpu == 2 and manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 1
