"""Fixtures of the evaluation tests: tiny shards and a tiny, randomly initialised checkpoint.

The shards come from the data tests' writer (``write_shards`` in ``tests/conftest.py``: shard schema (docs/architecture.md), known
contents). The checkpoint folder has the layout the training loop writes on rank 0
(``config.yaml``, ``model/model.safetensors`` + ``weights.json``, ``tokenizer/``,
``train_state.json``), so ``load_model_from_checkpoint`` reads it like a real one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mama_ray import config


def write_checkpoint(folder: Path, model, cfg) -> str:
    """Write ``model`` as a (rank-0, consolidated) training checkpoint; returns its URI."""
    from safetensors.torch import save_file

    from mama_ray.data.tokenizer import save_tokenizer
    from mama_ray.layout import TrainState

    (folder / "model").mkdir(parents=True)
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model" / "model.safetensors"))
    (folder / "model" / "weights.json").write_text(json.dumps({"frozen_included": True}))
    save_tokenizer(model.tokenizer, str(folder / "tokenizer"))
    (folder / "config.yaml").write_text(config.dump_yaml(cfg))
    (folder / "train_state.json").write_text(json.dumps(asdict(TrainState(step=7))))
    return str(folder)


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory, write_shards) -> tuple[Path, list[dict]]:
    """``(folder, study rows)``: 80 studies (16 in the test split), 48-px images, fixed seed."""
    root = tmp_path_factory.mktemp("eval_shards")
    return root, write_shards(root, 80, seed=11)


@pytest.fixture(scope="module")
def split_image_ids(eval_shards) -> list[str]:
    """Sorted ids of the test split's usable images (those with a BI-RADS letter)."""
    return sorted(img["image_id"] for s in eval_shards[1] if s["split"] == "test"
                  for img in s["images"] if img["birads"] is not None)


@pytest.fixture(scope="module")
def eval_cfg(eval_shards) -> config.Config:
    # The paper's first-pad text feature (tiny_cpu itself evaluates with the mean pool).
    return config.load("tiny_cpu", {"data.shards": str(eval_shards[0]), "eval.batch_size": 8,
                                    "eval.concurrency": 1, "data.map_batch_size": 8,
                                    "eval.text_feature": "first_pad"})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, eval_cfg) -> str:
    """A randomly initialised tiny model saved as a checkpoint (seed 0)."""
    from mama_ray.models import build_model

    torch.manual_seed(0)
    model = build_model(eval_cfg).eval()
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_00000007", model, eval_cfg)


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, eval_cfg) -> str:
    """A tiny checkpoint whose LoRA B matrices are non-zero (so the adapter changes the output),
    with an evaluation's metrics.json beside it."""
    from mama_ray.models import build_model

    torch.manual_seed(1)
    model = build_model(eval_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    uri = write_checkpoint(tmp_path_factory.mktemp("lora_ckpt") / "checkpoint_00000007", model, eval_cfg)
    metrics = {"split": "test", "shards": "s3://b/shards", "balanced_test": True, "text_feature": "first_pad",
               "zero_shot": {"density": {"n": 8, "accuracy": 0.5, "balanced_accuracy": 0.625, "auc": 0.75}}}
    (Path(uri) / "eval").mkdir()
    (Path(uri) / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return uri
