"""The interpretability view: sentence→patch similarity of an image's own caption (paper figure).

For an image and its unmasked caption, each separator-token sentence feature (local text head)
is compared by cosine with every patch feature (local image head) — the quantities the SLA loss
aligns (method §3d). One heatmap per sentence, drawn over the mammogram, shows where the model
finds that sentence. Sentence k is the caption text that ends at the k-th separator.
"""

from __future__ import annotations

import numpy as np
import torch

from mama_ray.data import captions


def sentences(model_text: str) -> list[str]:
    """The caption pieces ending at each separator token of a model text (BOS … EOS)."""
    body = model_text.removeprefix(captions.BOS).removesuffix(captions.EOS)
    return body.split(captions.SEP)[:-1]


@torch.no_grad()
def sentence_patch_similarity(model, batch: dict[str, np.ndarray], i: int) -> np.ndarray:
    """K×P cosine similarities of row ``i``'s K caption sentences to its P patches."""
    image = torch.from_numpy(np.ascontiguousarray(batch["image"][i : i + 1]))  # 1×3×S×S uint8
    patch_emb = model.encode_image(image)["patch_emb"][0]  # P×E′
    ids, mask, sep = (torch.from_numpy(np.asarray(batch[k][i : i + 1]))
                      for k in ("input_ids", "attention_mask", "sep_mask"))
    text = model.encode_text(ids, mask, sep, pooling="mean", local=True)
    sent_emb = text["sent_emb"][0][text["sent_mask"][0]]  # K×E′
    return (sent_emb @ patch_emb.T).float().numpy()


def attention_pngs(model, batch: dict[str, np.ndarray]) -> dict[str, bytes]:
    """One PNG per row of an evaluation batch: ``{image_id: png bytes}``."""
    from mama_ray.data.pipeline import EVAL_FIELDS, eval_caption_fields
    from mama_ray.eval.plots import sentence_heatmaps_png

    out = {}
    for i, image_id in enumerate(batch["image_id"]):
        fields = eval_caption_fields({k: batch[k][i] for k in EVAL_FIELDS})
        sims = sentence_patch_similarity(model, batch, i)
        texts = sentences(captions.to_model_text(captions.caption_text(fields)))[: len(sims)]
        out[str(image_id)] = sentence_heatmaps_png(batch["image"][i], sims, texts,
                                                   f"{image_id}: sentence→patch similarity")
    return out
