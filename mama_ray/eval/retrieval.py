"""Image↔text retrieval recall@K over a test split.

Each test image is paired with its own unmasked caption (method.md §1.3); the gallery is every caption (for
image→text) or every image (for text→image) of the evaluated set, and the correct item is the
pair's own partner — a different image's identical caption counts as a miss. Similarities are
cosines of the global embeddings; the N×N matrix is computed in row chunks so large test splits
fit in memory.
"""

from __future__ import annotations

import numpy as np

from mama_ray.eval_metrics import match_ranks, recall_from_ranks

CHUNK = 2048  # query rows per similarity block (2048 × N floats)


def _ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Rank of each query's partner (same row index) in the gallery."""
    ranks = []
    for start in range(0, len(queries), CHUNK):
        sim = queries[start:start + CHUNK] @ gallery.T  # chunk×N
        ranks.append(match_ranks(sim, np.arange(start, start + len(sim))))
    return np.concatenate(ranks)


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks: list[int]) -> dict:
    """Recall@K both ways for N paired, L2-normalised embeddings.

    Returns:
        ``{"n": N, "image_to_text": {"R@1": …}, "text_to_image": {"R@1": …}}``.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)  # N×E
    text_emb = np.asarray(text_emb, dtype=np.float32)  # N×E
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"need paired N×E embeddings, got {image_emb.shape} and {text_emb.shape}")
    out: dict = {"n": int(len(image_emb))}
    for name, q, g in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb)):
        out[name] = {f"R@{k}": v for k, v in recall_from_ranks(_ranks(q, g), ks).items()}
    return out
