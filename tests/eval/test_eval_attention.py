"""Sentence→patch similarities: one row per caption sentence, one column per patch, cosines."""

from __future__ import annotations

import numpy as np
import torch

from mama_ray import config
from mama_ray.data import captions
from mama_ray.eval.attention import sentence_patch_similarity, sentences


def test_sentences_end_at_each_separator():
    text = captions.to_model_text("Procedure reported: MG; Reason: screening; The breast is dense. ")
    assert sentences(text) == ["Procedure reported: MG", " Reason: screening", " The breast is dense"]


def test_similarity_has_a_row_per_sentence_and_is_a_cosine():
    from mama_ray.models import build_model

    cfg = config.load("tiny_cpu")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    fields = captions.CaptionFields("MG Screening Bilateral", "screening", 50, "White", None, "R", "MLO", 3, "B")
    text = captions.to_model_text(captions.caption_text(fields))
    image = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    sims = sentence_patch_similarity(model, model.tokenizer, image, text)
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    assert sims.shape == (len(sentences(text)), grid * grid)  # the caption fits in max_len
    assert np.abs(sims).max() <= 1.0 + 1e-5 and sims.std() > 0
