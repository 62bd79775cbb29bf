"""Zero-shot over Ray Data on tiny shards: shapes, values against a direct computation, chance."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mama_ray.data import captions
from mama_ray.data.pipeline import eval_batch, eval_caption_fields
from mama_ray.eval import zero_shot
from mama_ray.models.tokenizer import encode_texts
from mama_ray.train.checkpoint import load_model_from_checkpoint


@pytest.fixture(scope="module")
def scored(ray_session, eval_cfg, tiny_checkpoint):
    return zero_shot.score_split(eval_cfg, tiny_checkpoint)


def eval_rows(cfg, root, n: int) -> list[dict]:
    """The first ``n`` test-split eval rows, made by the pipeline's map function without Ray."""
    table = pq.read_table(sorted(root.glob("*.parquet"))[1])  # studies 8–15: 8 and 9 are test
    test = table.filter(pc.equal(table["split"], "test"))
    batch = eval_batch(test, cfg)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _direct_scores(model, tok, row, max_len) -> dict[str, np.ndarray]:
    """τ·cos by hand: pre-LN token mean → image_proj; first-pad hidden state → text_proj."""
    pixels = (torch.from_numpy(np.array(row["image"][None])).float() / 255 - 0.5) / 0.5
    tokens = model.vision.vit.encoder(model.vision.vit.embeddings(pixels)).last_hidden_state
    img = F.normalize(model.image_proj(tokens.mean(1)), dim=-1)[0]  # E
    fields = eval_caption_fields(row)
    out = {}
    for task, make in (("density", captions.density_prompts), ("birads", captions.birads_prompts)):
        enc = encode_texts(tok, [captions.to_model_text(p) for p in make(fields)], max_len)
        hidden = model.text.lm(input_ids=torch.as_tensor(enc["input_ids"]),
                               attention_mask=torch.as_tensor(enc["attention_mask"])).last_hidden_state
        first_pad = [int(np.flatnonzero(m == 0)[0]) for m in enc["attention_mask"]]
        txt = F.normalize(model.text_proj(hidden[torch.arange(len(first_pad)), first_pad]), dim=-1)
        out[task] = (model.logit_scale.exp() * (txt @ img)).detach().numpy()
    return out


def test_scores_have_class_shapes_and_cover_the_test_split(scored, test_image_ids):
    preds, ids = scored
    assert preds["image_id"].tolist() == test_image_ids
    assert preds["density_scores"].shape == (len(test_image_ids), 4)
    assert preds["birads_scores"].shape == (len(test_image_ids), 7)
    assert sorted(ids["density"].tolist()) == test_image_ids  # not balanced: every labelled image


def test_scores_equal_a_direct_computation(scored, eval_cfg, eval_shards, tiny_checkpoint):
    preds, _ = scored
    model, tok, ckpt_cfg, _ = load_model_from_checkpoint(tiny_checkpoint)
    for row in eval_rows(eval_cfg, eval_shards[0], 3):
        i = preds["image_id"].tolist().index(row["image_id"])
        want = _direct_scores(model, tok, row, ckpt_cfg.text.max_len)
        assert preds["density_scores"][i] == pytest.approx(want["density"], rel=1e-4, abs=1e-5)
        assert preds["birads_scores"][i] == pytest.approx(want["birads"], rel=1e-4, abs=1e-5)
        assert preds["density"][i] == row["density"] and preds["birads"][i] == row["birads"]
