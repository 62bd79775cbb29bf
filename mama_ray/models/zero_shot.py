"""Zero-shot scoring of a model: an image against the class prompts built from its own caption
fields (method.md §5.1).

The prompt's global text feature is the hidden state at the first padding position (``pooling:
first_pad``, as the original zero-shot code) or the training mean pool (``mean``); score =
τ·cos(image, prompt) with τ = exp(logit_scale). Validation during training
(:mod:`mama_ray.train.validate`) and the evaluation tasks (:mod:`mama_ray.eval.zero_shot`) both
score through here.
"""

from __future__ import annotations

import torch

from mama_ray.data import captions
from mama_ray.data.tokenizer import token_arrays

TASKS = ("density", "birads")
NUM_CLASSES = {"density": 4, "birads": 7}
CLASS_NAMES = {
    "density": ["A fatty", "B scattered", "C heterogeneous", "D extreme"],
    "birads": [f"{n} ({c})" for n, c in enumerate(captions.BIRADS_LETTERS)],
}


def prompts(fields: captions.CaptionFields, task: str) -> list[str]:
    """The model texts (BOS … EOS, separators) of one image's class prompts for ``task``."""
    make = captions.density_prompts if task == "density" else captions.birads_prompts
    return [captions.to_model_text(p) for p in make(fields)]


def token_tensors(tokenizer, texts: list[str], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``sep_mask`` (N×L) on ``device``, with the checkpoint's tokenizer."""
    return {k: torch.as_tensor(v, device=device) for k, v in token_arrays(tokenizer, texts, max_len).items()}



@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], max_len: int, pooling: str) -> torch.Tensor:
    """Global text embeddings (N×E, L2-normalised) of model texts."""
    enc = token_tensors(tokenizer, texts, max_len, model.logit_scale.device)
    out = model.encode_text(enc["input_ids"], enc["attention_mask"], pooling=pooling, local=False)
    return out["text_emb"].float()


@torch.no_grad()
def score_fields(model, tokenizer, fields: list[captions.CaptionFields], image_emb: torch.Tensor, max_len: int,
                 pooling: str) -> dict:
    """τ·cos scores of images, given by their caption fields, against their own class prompts.

    Validation during training and :func:`mama_ray.eval.zero_shot.score_batch` use it.

    Args:
        image_emb: B×E global image embeddings of the images.
    Returns:
        ``{"density_scores": B×4, "birads_scores": B×7}`` float32 numpy arrays.
    """
    image_emb = image_emb.float()
    tau = model.logit_scale.detach().float().exp()  # [1]
    out = {}
    for task in TASKS:
        texts = [t for f in fields for t in prompts(f, task)]
        text_emb = text_embeddings(model, tokenizer, texts, max_len, pooling)  # (B·K)×E
        text_emb = text_emb.view(len(fields), NUM_CLASSES[task], -1)  # B×K×E
        scores = tau * torch.einsum("be,bke->bk", image_emb, text_emb.to(image_emb.device))  # B×K
        out[f"{task}_scores"] = scores.cpu().numpy()
    return out
