"""Validation during training in one process (LocalContext, real DeepSpeed on CPU, real shards for val).

Training batches come from the deterministic test source; the val split is read from shards
written by the data tests' writer (``write_shards``, tests/conftest.py) through the real ValSet. 6 steps, late
terms from step 3, validation every 2 steps (2, 4, 6).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mama_ray.data.pipeline import split_index
from mama_ray.data.validation import ValSet
from mama_ray.eval.retrieval import retrieval_metrics
from mama_ray.train.best import improves, read_best
from mama_ray.train.validate import retrieval_recalls

VAL = {"train.val_every": 2}
REPO = Path(__file__).parents[2]


def _run(kit, shards, root, **over):
    import os

    from mama_ray.train.context import LocalContext
    from mama_ray.train.loop import train_loop

    cfg = kit.tiny_cfg(**{"data.shards": shards, **VAL, **over})
    os.environ["DS_ACCELERATOR"] = "cpu"
    val = ValSet(cfg, 0, 1)
    with LocalContext(root / "ckpt", keep=cfg.train.keep_checkpoints) as ctx:
        train_loop(cfg, ctx, kit.SyntheticSource(cfg, 0, 1), run_uri=str(root / "run"),
                   build_model=kit.no_dropout_model, val=val)
    val.close()
    return cfg, ctx


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kit, val_shards):
    a_root, b_root = tmp_path_factory.mktemp("val_a"), tmp_path_factory.mktemp("val_b")
    a = _run(kit, val_shards, a_root)
    b = _run(kit, val_shards, b_root, **{"loss.mv_weight": 0.5})
    return (a_root, *a), (b_root, *b)


def _val_reports(ctx):
    return {int(r["step"]): r for r in ctx.reports if "val_loss" in r}


def test_val_metrics_at_each_val_step(runs, val_shards, kit):
    (root, cfg, ctx), _ = runs
    val = _val_reports(ctx)
    assert sorted(val) == [2, 4, 6]
    logged = {int(m["step"]): m for m in map(json.loads, (root / "run" / "metrics.jsonl").read_text().splitlines())}
    n = split_index(cfg, "val").num_samples
    for step, r in val.items():
        keys = [k for k in r if k.startswith("val_")]
        assert {"val_loss", "val_clip_loss", "val_clip2_loss", "val_mv_loss", "val_sla_loss", "val_i2t_r1",
                "val_i2t_r5", "val_t2i_r1", "val_t2i_r5"} <= set(keys)
        assert all(math.isfinite(r[k]) for k in keys) and logged[step]["val_loss"] == pytest.approx(r["val_loss"])
        assert r["val_images"] == n  # one rank: every val image once
        # every term is computed at every validation, also before the late step (3)
        assert all(r[k] > 0 for k in ("val_clip_loss", "val_clip2_loss", "val_mv_loss", "val_sla_loss"))
        # CLIP of B samples is ≤ 2·ln(B) + margins; recall@5 ≥ recall@1
        assert r["val_i2t_r5"] >= r["val_i2t_r1"] and r["val_t2i_r5"] >= r["val_t2i_r1"]
    # before the late step the objective is CLIP alone; after it the weighted sum (all weights 1 here)
    assert val[2]["val_loss"] == pytest.approx(val[2]["val_clip_loss"], rel=1e-6)
    for s in (4, 6):
        terms = sum(val[s][k] for k in ("val_clip_loss", "val_clip2_loss", "val_mv_loss", "val_sla_loss"))
        assert val[s]["val_loss"] == pytest.approx(terms, rel=1e-5)
    assert 5 not in val and 3 in {int(r["step"]) for r in ctx.reports}  # log steps still report


def test_unweighted_terms_do_not_depend_on_the_weights(runs):
    (_, _, a), (_, cfg_b, b) = runs
    va, vb = _val_reports(a), _val_reports(b)
    # before the late step (3) the two runs trained identically: the val terms are equal
    for k in ("val_clip_loss", "val_mv_loss", "val_sla_loss", "val_loss"):
        assert va[2][k] == pytest.approx(vb[2][k], rel=1e-6), k
    # after it, the weighted total differs (mv weighted 0.5 in b) and is the weighted sum of b's terms
    for s in (4, 6):
        assert va[s]["val_loss"] != pytest.approx(vb[s]["val_loss"], rel=1e-4)
        w = cfg_b.loss
        want = (w.clip_weight * vb[s]["val_clip_loss"] + w.clip2_weight * vb[s]["val_clip2_loss"]
                + w.mv_weight * vb[s]["val_mv_loss"] + w.sla_weight * vb[s]["val_sla_loss"])
        assert vb[s]["val_loss"] == pytest.approx(want, rel=1e-5)


def test_best_checkpoint_kept_beside_the_latest(runs, kit):
    (root, cfg, ctx), _ = runs
    val = _val_reports(ctx)
    # val_loss changes meaning at the late step (3): the best is the lowest of the late objective
    best_step = min((4, 6), key=lambda s: val[s]["val_loss"])
    record = read_best(str(root / "run"))
    assert record == {"metric": "val_loss", "mode": "min", "value": pytest.approx(val[best_step]["val_loss"]),
                      "step": best_step, "phase": "late"}
    best = root / "run" / "best"
    assert json.loads((best / "train_state.json").read_text())["step"] == best_step
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["checkpoint_00000003", "checkpoint_00000006"]
    if best_step == 6:  # the best is the last step: the same weights as the latest checkpoint
        latest = kit.weights(root / "ckpt" / "checkpoint_00000006")
        assert all(torch.equal(v, latest[k]) for k, v in kit.weights(best).items())


def test_best_rule():
    early = {"metric": "val_loss", "mode": "min", "value": 2.0, "step": 2, "phase": "early"}
    late = {**early, "value": 9.0, "phase": "late"}
    assert improves(8.0, late, "val_loss", "min", "late") and not improves(9.5, late, "val_loss", "min", "late")
    assert improves(30.0, early, "val_loss", "min", "late")  # the first late val_loss replaces an early best
    assert improves(1.0, early, "val_loss", "min", "early") and not improves(3.0, early, "val_loss", "min", "early")
    clip = {"metric": "val_clip_loss", "mode": "min", "value": 2.0, "step": 2, "phase": "early"}
    assert not improves(2.5, clip, "val_clip_loss", "min", "late")  # unweighted: compared across the late step
    r1 = {"metric": "val_i2t_r1", "mode": "max", "value": 0.3, "step": 2, "phase": "early"}
    assert improves(0.4, r1, "val_i2t_r1", "max", "late") and not improves(0.2, r1, "val_i2t_r1", "max", "late")
    assert improves(5.0, r1, "val_loss", "min")  # a record of another metric never counts
    assert not improves(float("nan"), None, "val_loss", "min")


def test_validation_keeps_batchnorm_stats_and_train_mode(kit, val_shards, tmp_path):
    import os

    from mama_ray.train.context import LocalContext
    from mama_ray.train.loop import make_engine
    from mama_ray.train.validate import Validation

    cfg = kit.tiny_cfg(**{"data.shards": val_shards, **VAL})
    os.environ["DS_ACCELERATOR"] = "cpu"
    with LocalContext(tmp_path) as ctx:
        model = kit.no_dropout_model(cfg, None)
        engine = make_engine(model, cfg, ctx)
        engine.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        v = Validation(cfg, ctx, ValSet(cfg, 0, 1), None)
        m1, m2 = v.evaluate(engine, model, 1), v.evaluate(engine, model, 1)
        assert engine.module.training and model.training
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
        assert m1 == {**m2, "val_seconds": m1["val_seconds"]}  # deterministic


def test_val_set_shares_and_pairs(val_shards, kit):
    cfg = kit.tiny_cfg(**{"data.shards": val_shards})
    n = split_index(cfg, "val").num_samples
    one = ValSet(cfg, 0, 1)
    r0, r1 = ValSet(cfg, 0, 2), ValSet(cfg, 1, 2)
    assert r0.num_samples == r1.num_samples == n // 2
    assert not set(r0.image_ids) & set(r1.image_ids)  # each image at most once across ranks
    assert r0.image_ids + r1.image_ids == one.image_ids[: 2 * (n // 2)]
    # x² is from the same study; some pairs are another image, some the image itself (p = 0.5)
    same = [a == b for a, b in zip(one.image_ids, one.image2_ids, strict=True)]
    assert all(i2.rsplit("_", 1)[0] == i1.rsplit("_", 1)[0] for i1, i2 in zip(one.image_ids, one.image2_ids, strict=True))
    assert 0 < sum(same) < len(same)
    # batches: the training micro-batch size, the last one smaller, every sample once
    sizes = [len(b["index"]) for b in one.batches()]
    b = cfg.train.micro_batch_size
    assert sizes == [b] * (n // b) + ([n % b] if n % b else [])
    idx = np.concatenate([b["index"].numpy() for b in one.batches()])
    assert sorted(idx) == list(range(n))
    # the caption of every val sample is unmasked (no meta field replaced by "unknown")
    first = next(iter(one.batches()))
    ref = ValSet(cfg, 0, 1)
    assert torch.equal(first["input_ids"], next(iter(ref.batches()))["input_ids"])
    for s in (one, r0, r1, ref):
        s.close()


def test_recall_matches_the_evaluation_retrieval():
    rng = np.random.default_rng(0)
    img = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(12, 8))).float(), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.from_numpy(rng.normal(size=(12, 8))).float(), dim=1)
    ref = retrieval_metrics(img.numpy(), txt.numpy(), [1, 5])
    # two "ranks" of 6 queries against the full gallery, averaged
    parts = [retrieval_recalls(img[o:o + 6], txt[o:o + 6], o, img, txt) for o in (0, 6)]
    mean = {k: (parts[0][k] + parts[1][k]) / 2 for k in parts[0]}
    assert mean["val_i2t_r1"] == pytest.approx(ref["image_to_text"]["R@1"])
    assert mean["val_i2t_r5"] == pytest.approx(ref["image_to_text"]["R@5"])
    assert mean["val_t2i_r1"] == pytest.approx(ref["text_to_image"]["R@1"])
    assert mean["val_t2i_r5"] == pytest.approx(ref["text_to_image"]["R@5"])


def test_zero3_validation_matches_the_saved_model(kit, val_shards, tmp_path):
    """Under ZeRO-3 (parameters partitioned, gathered in the engine's hooks) the val CLIP loss and
    the zero-shot accuracies at step 6 are those of the step-6 checkpoint's weights, recomputed here
    without DeepSpeed."""
    from mama_ray.eval_metrics import classification_metrics
    from mama_ray.layout import load_model_from_checkpoint
    from mama_ray.losses import clip_loss
    from mama_ray.models.zero_shot import score_fields

    cfg, ctx = _run(kit, val_shards, tmp_path, **{"deepspeed.zero_stage": 3, "eval.val_zero_shot": True})
    r = _val_reports(ctx)[6]
    model, tok, _, _ = load_model_from_checkpoint(str(tmp_path / "ckpt" / "checkpoint_00000006"))
    vs = ValSet(cfg, 0, 1)
    clip, scores, labels = 0.0, {"density": [], "birads": []}, {"density": [], "birads": []}
    with torch.no_grad():
        for b in vs.batches():
            out = model(b["image1"], b["input_ids"], b["attention_mask"], b["sep_mask"], local=False)
            clip += len(b["index"]) * float(clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"]))
            s = score_fields(model, tok, [vs.fields[int(i)] for i in b["index"]], out["image_emb"],
                             cfg.text.max_len, cfg.eval.text_feature)
            for task in scores:
                scores[task].append(s[f"{task}_scores"])
                labels[task].append(b[task].numpy())
    n = vs.num_samples
    vs.close()
    assert r["val_clip_loss"] == pytest.approx(clip / n, rel=1e-4)
    for task in scores:
        y, s = np.concatenate(labels[task]), np.concatenate(scores[task])
        want = classification_metrics(y[y >= 0], s[y >= 0])["balanced_accuracy"]
        assert r[f"val_{task}_balanced_accuracy"] == pytest.approx(want)
