"""Linear probing and full fine-tuning of the image encoder (method.md §5.3).

A new ``Linear(C → classes)`` on the pooled image feature (pre-LN token mean) is trained with
cross-entropy, SGD (momentum ``eval.probe_momentum``, weight decay ``eval.probe_weight_decay``),
a linear warm-up from ``eval.probe_min_lr`` over ``eval.probe_warmup_steps`` then cosine back to it, for
``eval.probe_steps`` optimizer steps of ``eval.probe_batch_size`` samples drawn class-balanced
(weight = 1/count of the sample's class, with replacement — the original's
``WeightedRandomSampler``). The training set is a random share (``eval.data_fractions``, seed
``run.seed``) of the training split's labelled images.

* **linear** — the encoder is frozen, so its features are computed once (eval transform, over Ray
  Data) and the head trains on them in the driver: seconds even for the full split.
* **finetune** — the encoder trains too, on the SimCLR train augmentation as method.md §5.3; one process
  (one GPU if available) runs the loop.

Both log one progress line with an ETA (:class:`mama_ray.runtime.Progress`) at most every 10 s
over all their steps (tasks × data fractions × ``eval.probe_steps``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mama_ray.config import EvalConfig, check_probe_schedule
from mama_ray.data.transforms import to_rgb_chw, train_transform
from mama_ray.eval.inference import device
from mama_ray.eval_metrics import classification_metrics
from mama_ray.layout import load_model_from_checkpoint
from mama_ray.models.mama import normalize_image
from mama_ray.models.zero_shot import NUM_CLASSES, TASKS
from mama_ray.runtime import Progress
from mama_ray.schedule import lr_at

log = logging.getLogger(__name__)


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


def train_classifier(
    forward: Callable[[np.ndarray], torch.Tensor],
    params: list[nn.Parameter],
    labels: np.ndarray,
    ecfg: EvalConfig,
    seed: int,
    progress: Progress | None = None,
) -> list[float]:
    """The probe / fine-tune loop: class-balanced batches, SGD, warm-up + cosine.

    Args:
        forward: maps a batch of sample indices to B×classes logits.
        params: the trainable parameters.
        labels: N class ids of the training samples.
        progress: advanced by one per step.
    Returns:
        the loss of every step.
    """
    check_probe_schedule(ecfg)
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
        if progress is not None:
            progress.update()
    return losses


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, ecfg: EvalConfig,
                     seed: int, progress: Progress | None = None) -> nn.Linear:
    """Train ``Linear(C → num_classes)`` on frozen N×C features; returns the head."""
    torch.manual_seed(seed)
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))  # N×C
    head = nn.Linear(feats.shape[1], num_classes)
    train_classifier(lambda idx: head(feats[idx]), list(head.parameters()), labels, ecfg, seed, progress)
    return head.eval()


@torch.no_grad()
def predict_scores(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """N×classes logits of a trained head on N×C features."""
    return head(torch.as_tensor(np.asarray(features, dtype=np.float32))).numpy()


def _train_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of the labelled training images kept for a data fraction."""
    known = np.flatnonzero(np.asarray(labels) >= 0)
    if len(known) == 0:
        raise ValueError("probe: no training image has a label for this task")
    return known[fraction_subset(len(known), fraction, seed)]


def linear_probe_metrics(cfg, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
                         test_ids: dict[str, np.ndarray]) -> dict:
    """Linear probes on frozen ``pooled_image`` features, per task and data fraction.

    Args:
        train, test: :func:`mama_ray.eval.inference.embed_split` outputs.
        test_ids: task → test image ids evaluated (balanced subset or all labelled).
    Returns:
        ``{task: {"<fraction>": classification metrics + "train_images"}}``.
    """
    def fit_and_score(task: str, num_classes: int, rows: np.ndarray, test_rows: np.ndarray,
                      progress: Progress) -> np.ndarray:
        head = fit_linear_probe(train["pooled_image"][rows], train[task][rows], num_classes,
                                cfg.eval, cfg.run.seed, progress)
        return predict_scores(head, test["pooled_image"][test_rows])

    return _per_task_and_fraction(cfg, train, test, test_ids, fit_and_score, "linear probe")


def _per_task_and_fraction(cfg, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
                           test_ids: dict[str, np.ndarray], fit_and_score, what: str) -> dict:
    """Run ``fit_and_score(task, num_classes, train_rows, test_rows, progress) -> scores`` for every
    task and data fraction; ``{task: {"<fraction>": classification metrics + "train_images"}}``."""
    out: dict = {}
    progress = Progress(f"{what} steps", len(TASKS) * len(cfg.eval.data_fractions) * cfg.eval.probe_steps, log)
    for task in TASKS:
        test_rows = np.isin(test["image_id"], test_ids[task])
        out[task] = {}
        for fraction in cfg.eval.data_fractions:
            rows = _train_rows(train[task], fraction, cfg.run.seed)
            progress.detail = f"{task} {fraction:.0%} of the data, {len(rows)} images"
            scores = fit_and_score(task, NUM_CLASSES[task], rows, test_rows, progress)
            m = classification_metrics(test[task][test_rows], scores)
            out[task][f"{fraction:g}"] = {**m, "train_images": int(len(rows))}
    return out


class FineTuner(nn.Module):
    """A copy of the checkpoint's vision tower, fully trainable, with a new linear head."""

    def __init__(self, vision: nn.Module, num_classes: int):
        super().__init__()
        self.vision = vision.requires_grad_(True)
        self.head = nn.Linear(vision.hidden_size, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # B×{1,3}×S×S uint8 → B×classes
        image = image.expand(-1, 3, -1, -1)  # gray → the model's 3 equal channels
        pooled, _ = self.vision(normalize_image(image, self.head.weight.dtype))  # B×C
        return self.head(pooled)


def _augment(images: np.ndarray, idx: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
    """SimCLR train augmentation (method.md §1.6) of the gray channel of the chosen eval images."""
    return torch.from_numpy(np.stack([to_rgb_chw(train_transform(images[i, 0], size, rng)) for i in idx]))


def _finetune(net: FineTuner, images: np.ndarray, labels: np.ndarray, cfg, dev: torch.device,
              progress: Progress | None = None) -> None:
    """Train ``net`` in place on augmented ``images`` (N×1×S×S uint8)."""
    rng, size = np.random.default_rng(cfg.run.seed), images.shape[-1]
    net.train()
    train_classifier(lambda idx: net(_augment(images, idx, size, rng).to(dev)),
                     [p for p in net.parameters() if p.requires_grad], labels, cfg.eval, cfg.run.seed,
                     progress)


@torch.no_grad()
def _predict(net: FineTuner, images: np.ndarray, batch_size: int, dev: torch.device) -> np.ndarray:
    net.eval()
    parts = [net(torch.from_numpy(images[s:s + batch_size]).to(dev)).float().cpu().numpy()
             for s in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def finetune_metrics(cfg, checkpoint_uri: str, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
                     test_ids: dict[str, np.ndarray]) -> dict:
    """Full fine-tuning (encoder + new head) per task and data fraction, in this process.

    Args:
        train, test: numpy columns ``image_id``, ``image`` (N×1×S×S uint8), ``density``, ``birads``.
    Returns:
        ``{task: {"<fraction>": classification metrics + "train_images"}}``.
    """
    model, _, _, _ = load_model_from_checkpoint(checkpoint_uri)
    dev = device()

    def fit_and_score(task: str, num_classes: int, rows: np.ndarray, test_rows: np.ndarray,
                      progress: Progress) -> np.ndarray:
        torch.manual_seed(cfg.run.seed)  # the head's init
        net = FineTuner(copy.deepcopy(model.vision), num_classes).to(dev)
        _finetune(net, train["image"][rows], train[task][rows], cfg, dev, progress)
        return _predict(net, test["image"][test_rows], cfg.eval.batch_size, dev)

    return _per_task_and_fraction(cfg, train, test, test_ids, fit_and_score, "fine-tune")
