"""Linear probing and full fine-tuning of the image encoder (method §5.3).

A new ``Linear(C → classes)`` on the pooled image feature (pre-LN token mean) is trained with
cross-entropy, SGD (momentum ``eval.probe_momentum``, weight decay ``eval.probe_weight_decay``),
a linear warm-up from ``eval.probe_min_lr`` over ``eval.probe_warmup_steps`` then cosine back to it, for
``eval.probe_steps`` optimizer steps of ``eval.probe_batch_size`` samples drawn class-balanced
(weight = 1/count of the sample's class, with replacement — the original's
``WeightedRandomSampler``). The training set is a random share (``eval.data_fractions``, seed
``run.seed``) of the training split's labelled images.

* **linear** — the encoder is frozen, so its features are computed once (eval transform, over Ray
  Data) and the head trains on them in the driver: seconds even for the full split.
* **finetune** — the encoder trains too, on the SimCLR train augmentation as §5.3; one process
  (one GPU if available) runs the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mama_ray.config import ConfigError, EvalConfig
from mama_ray.train.schedule import lr_at


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling weight per sample: 1 / (number of samples of its class)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    return 1.0 / counts[labels]


def fraction_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a random ``fraction`` of ``n`` samples (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(n * fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def probe_lr(step: int, ecfg: EvalConfig) -> float:
    """Learning rate of probe step ``step``: the pretraining schedule's shape with the probe's values."""
    return lr_at(step, ecfg.probe_lr, ecfg.probe_min_lr, ecfg.probe_warmup_steps, ecfg.probe_steps)


def _check(ecfg: EvalConfig) -> None:
    if ecfg.probe_warmup_steps > ecfg.probe_steps:
        raise ConfigError(f"config field 'eval.probe_warmup_steps': {ecfg.probe_warmup_steps} "
                          f"exceeds eval.probe_steps={ecfg.probe_steps}")


def train_classifier(
    forward: Callable[[np.ndarray], torch.Tensor],
    params: list[nn.Parameter],
    labels: np.ndarray,
    ecfg: EvalConfig,
    seed: int,
) -> list[float]:
    """The probe / fine-tune loop: class-balanced batches, SGD, warm-up + cosine.

    Args:
        forward: maps a batch of sample indices to B×classes logits.
        params: the trainable parameters.
        labels: N class ids of the training samples.
    Returns:
        the loss of every step.
    """
    _check(ecfg)
    weights = torch.as_tensor(balanced_weights(labels))
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params, lr=ecfg.probe_lr, momentum=ecfg.probe_momentum,
                          weight_decay=ecfg.probe_weight_decay)
    losses = []
    for step in range(ecfg.probe_steps):
        for group in opt.param_groups:
            group["lr"] = probe_lr(step, ecfg)
        idx = torch.multinomial(weights, ecfg.probe_batch_size, replacement=True, generator=gen)
        loss = nn.functional.cross_entropy(forward(idx.numpy()), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, ecfg: EvalConfig,
                     seed: int) -> nn.Linear:
    """Train ``Linear(C → num_classes)`` on frozen N×C features; returns the head."""
    torch.manual_seed(seed)
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))  # N×C
    head = nn.Linear(feats.shape[1], num_classes)
    train_classifier(lambda idx: head(feats[idx]), list(head.parameters()), labels, ecfg, seed)
    return head.eval()


@torch.no_grad()
def predict_scores(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """N×classes logits of a trained head on N×C features."""
    return head(torch.as_tensor(np.asarray(features, dtype=np.float32))).numpy()
