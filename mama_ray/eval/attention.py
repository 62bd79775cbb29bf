"""The interpretability view: sentence→patch similarity of an image's own caption (paper figure).

For an image and its unmasked caption, each separator-token sentence feature (local text head)
is compared by cosine with every patch feature (local image head) — the quantities the SLA loss
aligns (method.md §3d). One heatmap per sentence, drawn over the mammogram, shows where the model
finds that sentence. Sentence k is the caption text that ends at the k-th separator.
"""

from __future__ import annotations

import numpy as np
import torch

from mama_ray.data import captions
from mama_ray.eval.plots import sentence_heatmaps_png
from mama_ray.eval.zero_shot import caption_texts
from mama_ray.models.zero_shot import token_tensors


def sentences(model_text: str) -> list[str]:
    """The caption pieces ending at each separator token of a model text (BOS … EOS)."""
    body = model_text.removeprefix(captions.BOS).removesuffix(captions.EOS)
    return body.split(captions.SEP)[:-1]


@torch.no_grad()
def sentence_patch_similarity(model, tokenizer, image: np.ndarray, model_text: str) -> np.ndarray:
    """K×P cosine similarities of a caption's K sentences to an image's P patches.

    Args:
        image: 3×S×S uint8. model_text: the caption as :func:`captions.to_model_text` makes it.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(image[None]))  # 1×3×S×S uint8
    patch_emb = model.encode_image(pixels)["patch_emb"][0]  # P×E′
    enc = token_tensors(tokenizer, [model_text], model.cfg.text.max_len, torch.device("cpu"))
    text = model.encode_text(enc["input_ids"], enc["attention_mask"], enc["sep_mask"], local=True)
    sent_emb = text["sent_emb"][0][text["sent_mask"][0]]  # K×E′
    return (sent_emb @ patch_emb.T).float().numpy()


def attention_pngs(model, tokenizer, batch: dict[str, np.ndarray]) -> dict[str, bytes]:
    """One PNG per row of an evaluation batch: ``{image_id: png bytes}``."""
    out = {}
    for i, (image_id, text) in enumerate(zip(batch["image_id"], caption_texts(batch), strict=True)):
        sims = sentence_patch_similarity(model, tokenizer, batch["image"][i], text)
        out[str(image_id)] = sentence_heatmaps_png(batch["image"][i], sims, sentences(text)[: len(sims)],
                                                   f"{image_id}: sentence→patch similarity")
    return out
