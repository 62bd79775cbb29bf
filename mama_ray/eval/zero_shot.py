"""Zero-shot BI-RADS (7 classes) and density (4 classes) classification (method.md §5.1).

For every test image the class prompts are built in the training caption format with that
image's **own unmasked** meta prefix (procedure, reason, patient and image info), so only the
class-specific sentences differ between the prompts of one image. The prompt's global text feature
is the hidden state at the first padding position (``eval.text_feature: first_pad``, as the
original zero-shot code) or the training mean pool (``mean``); score = τ·cos(image, prompt) with
τ = exp(logit_scale); prediction = argmax. Metrics use softmax(score) once (method.md §5.2).

Inference is distributed with Ray Data: :mod:`mama_ray.eval.inference` streams the split through
an actor pool that calls :func:`score_batch`.

Class-balanced test set (``eval.balanced_test``, the paper's ``--balanced_test``; its subset files
were not released): per task, among the images with a known label, every class present keeps
``m`` images drawn without replacement with ``numpy.random.default_rng(run.seed)``, ``m`` = the
count of the rarest present class. A class with no test image is absent from the subset.
"""

from __future__ import annotations

import numpy as np
import torch

from mama_ray.config import Config
from mama_ray.data import captions

TASKS = ("density", "birads")
NUM_CLASSES = {"density": 4, "birads": 7}
CLASS_NAMES = {
    "density": ["A fatty", "B scattered", "C heterogeneous", "D extreme"],
    "birads": [f"{n} ({c})" for n, c in enumerate(captions.BIRADS_LETTERS)],
}


def row_fields(batch: dict[str, np.ndarray], i: int) -> captions.CaptionFields:
    """The unmasked caption fields of row ``i`` of an evaluation batch."""
    from mama_ray.data.pipeline import EVAL_FIELDS, eval_caption_fields

    return eval_caption_fields({k: batch[k][i] for k in EVAL_FIELDS})


def prompts(fields: captions.CaptionFields, task: str) -> list[str]:
    """The model texts (BOS … EOS, separators) of one image's class prompts for ``task``."""
    make = captions.density_prompts if task == "density" else captions.birads_prompts
    return [captions.to_model_text(p) for p in make(fields)]


def caption_texts(batch: dict[str, np.ndarray]) -> list[str]:
    """The model texts of each row's own full, unmasked caption (method.md §1.3)."""
    return [captions.to_model_text(captions.caption_text(row_fields(batch, i)))
            for i in range(len(batch["image_id"]))]


def tokenize(tokenizer, texts: list[str], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``sep_mask`` (N×L) on ``device``, with the checkpoint's tokenizer."""
    from mama_ray.models.tokenizer import encode_texts as encode

    return {k: torch.as_tensor(v, device=device) for k, v in encode(tokenizer, texts, max_len).items()}


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], max_len: int, pooling: str) -> torch.Tensor:
    """Global text embeddings (N×E, L2-normalised) of model texts."""
    enc = tokenize(tokenizer, texts, max_len, model.logit_scale.device)
    out = model.encode_text(enc["input_ids"], enc["attention_mask"], pooling=pooling, local=False)
    return out["text_emb"].float()


@torch.no_grad()
def score_batch(model, tokenizer, batch: dict[str, np.ndarray], image_emb: torch.Tensor, max_len: int,
                pooling: str) -> dict:
    """τ·cos scores of every image in ``batch`` against its own class prompts.

    Args:
        image_emb: B×E global image embeddings of the batch's images.
    Returns:
        ``{"density_scores": B×4, "birads_scores": B×7}`` float32 numpy arrays.
    """
    fields = [row_fields(batch, i) for i in range(len(image_emb))]
    return score_fields(model, tokenizer, fields, image_emb, max_len, pooling)


@torch.no_grad()
def score_fields(model, tokenizer, fields: list[captions.CaptionFields], image_emb: torch.Tensor, max_len: int,
                 pooling: str) -> dict:
    """:func:`score_batch` for images given by their caption fields (validation during training uses it)."""
    image_emb = image_emb.float()
    tau = model.logit_scale.detach().float().exp()  # [1]
    out = {}
    for task in TASKS:
        texts = [t for f in fields for t in prompts(f, task)]
        text_emb = encode_texts(model, tokenizer, texts, max_len, pooling)  # (B·K)×E
        text_emb = text_emb.view(len(fields), NUM_CLASSES[task], -1)  # B×K×E
        scores = tau * torch.einsum("be,bke->bk", image_emb, text_emb.to(image_emb.device))  # B×K
        out[f"{task}_scores"] = scores.cpu().numpy()
    return out


def balanced_subset(labels: np.ndarray, seed: int) -> np.ndarray:
    """Sorted row indices of a class-balanced subset of the rows with a known label (≥ 0)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(labels) if c >= 0]
    if not classes:
        return np.zeros(0, dtype=np.int64)
    m = min(int((labels == c).sum()) for c in classes)
    picks = [rng.choice(np.flatnonzero(labels == c), size=m, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def task_rows(cfg: Config, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Image ids evaluated per task: labelled rows, class-balanced if ``eval.balanced_test``."""
    out = {}
    for task in TASKS:
        y = np.asarray(labels[task], dtype=np.int64)
        rows = balanced_subset(y, cfg.run.seed) if cfg.eval.balanced_test else np.flatnonzero(y >= 0)
        out[task] = labels["image_id"][rows]
    return out


def task_metrics(preds: dict[str, np.ndarray], ids: dict[str, np.ndarray]) -> dict:
    """Per-task classification metrics (see :func:`metrics.classification_metrics`)."""
    from mama_ray.eval.metrics import classification_metrics

    out = {}
    for task in TASKS:
        rows = np.isin(preds["image_id"], ids[task])
        if not rows.any():
            raise ValueError(f"zero-shot {task}: no test image has a {task} label")
        out[task] = classification_metrics(preds[task][rows], preds[f"{task}_scores"][rows])
    return out
