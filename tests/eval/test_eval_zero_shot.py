"""Zero-shot over Ray Data on tiny shards, written to S3 (moto): shapes, values against a direct
computation for a few images, pictures, and an untrained model at chance."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mama_ray import storage
from mama_ray.data import captions
from mama_ray.data.pipeline import eval_batch, eval_caption_fields
from mama_ray.data.tokenizer import token_arrays
from mama_ray.eval import run_zero_shot
from mama_ray.layout import load_model_from_checkpoint
from mama_ray.storage import s3_client


@pytest.fixture(scope="module")
def zero_shot_run(ray_session, s3_server, eval_cfg, tiny_checkpoint):
    """``run_zero_shot`` of the random tiny checkpoint, read from S3 by the actors, with its
    outputs written to S3 too."""
    s3_client().create_bucket(Bucket="zero-shot-out")
    checkpoint = "s3://zero-shot-out/run/checkpoint_00000007"
    storage.upload_dir(tiny_checkpoint, checkpoint)
    out = "s3://zero-shot-out/eval"
    metrics, table = run_zero_shot(eval_cfg, checkpoint, out)
    return metrics, table, out


def eval_rows(cfg, root, n: int) -> list[dict]:
    """The first ``n`` test-split eval rows, made by the pipeline's map function without Ray."""
    table = pq.read_table(sorted(root.glob("*.parquet"))[1])  # studies 8–15: 8 and 9 are test
    batch = eval_batch(table.filter(pc.equal(table["split"], "test")), cfg)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _direct_scores(model, tok, row, max_len) -> dict[str, np.ndarray]:
    """τ·cos by hand: pre-LN token mean → image_proj; first-pad hidden state → text_proj."""
    pixels = (torch.from_numpy(np.array(row["image"][None])).float() / 255 - 0.5) / 0.5
    tokens = model.vision.vit.encoder(model.vision.vit.embeddings(pixels)).last_hidden_state
    img = F.normalize(model.image_proj(tokens.mean(1)), dim=-1)[0]  # E
    fields = eval_caption_fields(row)
    out = {}
    for task, make in (("density", captions.density_prompts), ("birads", captions.birads_prompts)):
        enc = token_arrays(tok, [captions.to_model_text(p) for p in make(fields)], max_len)
        hidden = model.text.lm(input_ids=torch.as_tensor(enc["input_ids"]),
                               attention_mask=torch.as_tensor(enc["attention_mask"])).last_hidden_state
        first_pad = [int(np.flatnonzero(m == 0)[0]) for m in enc["attention_mask"]]
        txt = F.normalize(model.text_proj(hidden[torch.arange(len(first_pad)), first_pad]), dim=-1)
        out[task] = (model.logit_scale.exp() * (txt @ img)).detach().numpy()
    return out


def _predictions(out: str) -> dict[str, np.ndarray]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/zero_shot_predictions.parquet")))
    return {name: np.array(table[name].to_pylist()) for name in table.column_names}


def test_scores_have_class_shapes_and_cover_the_test_split(zero_shot_run, split_image_ids):
    metrics, _, out = zero_shot_run
    preds = _predictions(out)
    assert preds["image_id"].tolist() == split_image_ids
    assert preds["density_scores"].shape == (len(split_image_ids), 4)
    assert preds["birads_scores"].shape == (len(split_image_ids), 7)
    assert metrics["density"]["n"] == len(split_image_ids)  # not balanced: every labelled image
    assert sum(metrics["birads"]["support"]) == len(split_image_ids)


def test_scores_equal_a_direct_computation(zero_shot_run, eval_cfg, eval_shards, tiny_checkpoint):
    preds = _predictions(zero_shot_run[2])
    model, tok, ckpt_cfg, _ = load_model_from_checkpoint(tiny_checkpoint)
    for row in eval_rows(eval_cfg, eval_shards[0], 3):
        i = preds["image_id"].tolist().index(row["image_id"])
        want = _direct_scores(model, tok, row, ckpt_cfg.text.max_len)
        assert preds["density_scores"][i] == pytest.approx(want["density"], rel=1e-4, abs=1e-5)
        assert preds["birads_scores"][i] == pytest.approx(want["birads"], rel=1e-4, abs=1e-5)
        assert preds["density"][i] == row["density"] and preds["birads"][i] == row["birads"]


def test_metrics_follow_from_the_saved_scores(zero_shot_run):
    metrics, table, out = zero_shot_run
    preds = _predictions(out)
    saved_all = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    assert saved_all["checkpoint"] == "s3://zero-shot-out/run/checkpoint_00000007"
    saved = saved_all["zero_shot"]
    for task in ("density", "birads"):
        pred = preds[f"{task}_scores"].argmax(axis=1)
        assert metrics[task]["accuracy"] == pytest.approx(float((pred == preds[task]).mean()))
        assert saved[task]["balanced_accuracy"] == pytest.approx(metrics[task]["balanced_accuracy"])
        assert f"{metrics[task]['balanced_accuracy']:.3f}" in table


def test_untrained_model_is_near_chance(zero_shot_run):
    metrics = zero_shot_run[0]
    # chance is 0.25 (density) and 1/7 (BI-RADS); a learnt signal lifts it well above
    assert metrics["density"]["balanced_accuracy"] < 0.45
    assert metrics["birads"]["balanced_accuracy"] < 0.4


def test_pictures_are_written_and_non_trivial(zero_shot_run):
    out = zero_shot_run[2]
    imgs = {}
    for name in ("density_confusion", "birads_confusion", "density_roc", "birads_roc"):
        data = storage.read_bytes(f"{out}/zero_shot_{name}.png")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and min(img.shape[:2]) > 100 and img.std() > 10
        imgs[name] = img
    assert imgs["density_confusion"].shape != imgs["birads_confusion"].shape  # 4×4 vs 7×7
