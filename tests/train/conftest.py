"""Shared pieces of the training tests: a tiny config, a deterministic batch source, a no-dropout model.

The batch source stands in for the Ray Data pipeline (tested in tests/data) so the loop's maths can
be compared across world sizes: rank r's j-th sample is global sample
``(j // B)·B·W + r·B + j % B`` (B = micro-batch), so 2 ranks × B at step s see exactly the samples
one process sees in its 2 accumulated micro-batches of B at step s.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mama_ray import config

MAX_LEN = 16
IMAGE = 32


def tiny_cfg(**over):
    base = {"model.vision.image_size": IMAGE, "model.vision.patch_size": 8, "data.image_size": IMAGE,
            "text.max_len": MAX_LEN, "train.micro_batch_size": 4, "train.grad_accum": 1,
            "train.max_steps": 6, "optim.warmup_steps": 2, "optim.lr": 1e-3, "loss.late_loss_step": 3,
            "train.log_every": 1, "train.checkpoint_every": 3, "train.keep_checkpoints": 2,
            "train.eval_at_end": False, "scaling.num_workers": 1, "run.seed": 7}
    return config.load("tiny_cpu", {**base, **over})


def sample(p: int, vocab: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """Global sample ``p``: an image whose brightness carries ``p % 4`` and a short token sequence."""
    rng = np.random.default_rng(1000 + p)
    img = (rng.integers(0, 96, (1, IMAGE, IMAGE)) + 40 * (p % 4)).astype(np.uint8)
    img2 = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
    ids = np.full(MAX_LEN, pad_id, np.int64)
    ids[:12] = rng.integers(10, vocab - 10, 12)
    ids[[4, 8, 11]] = sep_id
    mask = (np.arange(MAX_LEN) < 12).astype(np.int64)
    return {"image1": img, "image2": img2, "input_ids": ids, "attention_mask": mask, "sep_mask": ids == sep_id}


class SyntheticSource:
    """Deterministic batches of the tiny test samples (see the module docstring for the layout)."""

    def __init__(self, cfg, rank: int, world_size: int, samples_per_rank: int = 10_000):
        from mama_ray.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg)
        self.vocab, self.sep, self.pad = len(tok), tok.convert_tokens_to_ids("<|separatetext|>"), tok.pad_token_id
        self.b, self.rank, self.world = cfg.train.micro_batch_size, rank, world_size
        self.n = samples_per_rank

    def global_index(self, epoch: int, j: int) -> int:
        b, w = self.b, self.world
        return epoch * self.n * w + (j // b) * b * w + self.rank * b + j % b

    def epoch_batches(self, epoch: int, skip_samples: int):
        for start in range(skip_samples, self.n - self.b + 1, self.b):
            rows = [sample(self.global_index(epoch, j), self.vocab, self.sep, self.pad) for j in range(start, start + self.b)]
            batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
            for k in ("image1", "image2"):
                batch[k] = batch[k].expand(-1, 3, -1, -1)
            yield batch


def no_dropout_model(cfg, tokenizer):
    """The real tiny MamaModel with every dropout at 0, so ranks and processes draw no random masks."""
    from mama_ray.models import build_model

    model = build_model(cfg, tokenizer)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def run_local(cfg, root, build_model=no_dropout_model):
    """Train ``cfg`` in this process (world size 1); returns the LocalContext with its reports."""
    import os

    from mama_ray.train.context import LocalContext
    from mama_ray.train.loop import train_loop

    os.environ["DS_ACCELERATOR"] = "cpu"
    with LocalContext(root / "ckpt", keep=cfg.train.keep_checkpoints) as ctx:
        train_loop(cfg, ctx, SyntheticSource(cfg, 0, 1), run_uri=str(root / "run"), build_model=build_model)
    return ctx


def weights(checkpoint_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{checkpoint_dir}/model/model.safetensors")


@pytest.fixture(scope="session")
def kit():
    """The helpers above (conftest modules are not importable under --import-mode=importlib).

    Ray workers unpickle ``SyntheticSource``/``no_dropout_model`` by value, since this module is not
    importable there either.
    """
    import sys
    import types

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return types.SimpleNamespace(tiny_cfg=tiny_cfg, SyntheticSource=SyntheticSource, run_local=run_local,
                                 no_dropout_model=no_dropout_model, weights=weights)


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory, write_shards) -> str:
    """60 synthetic studies (48-px images) as shards, written once; their val split holds 19 images."""
    root = tmp_path_factory.mktemp("val_shards")
    write_shards(root, 60, seed=3)
    return str(root)
