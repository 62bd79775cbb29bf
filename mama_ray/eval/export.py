"""Export a training checkpoint to a consolidated Hugging Face folder.

Layout of the export (local folder or s3:// prefix)::

    vision/            Dinov2WithRegistersModel — transformers.AutoModel.from_pretrained(".../vision")
    text/              the frozen text trunk (GPT-2/BERT, embeddings resized for the special tokens)
    text_lora/         the LoRA adapter (absent when model.lora.enabled is false) —
                       peft.PeftModel.from_pretrained(AutoModel.from_pretrained(".../text"), ".../text_lora")
    tokenizer/         the caption tokenizer with its special tokens
    heads.safetensors  image_proj, text_proj, local_image_head, local_text_head, mv_head,
                       logit_scale, local_scale (keys prefixed by module name)
    mama_config.yaml   the run's full config;  README.md  the model card

The checkpoint's weights are already consolidated from the ZeRO shards by the training loop
(``model/model.safetensors``); :func:`load_model_from_checkpoint` rebuilds the model from them.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from mama_ray import config, storage

HEAD_MODULES = ("image_proj", "text_proj", "local_image_head", "local_text_head", "mv_head")
SCALES = ("logit_scale", "local_scale")


def head_state(model) -> dict:
    """Every weight outside the two towers, keyed ``<module>.<param>``."""
    state = {f"{name}.{k}": v for name in HEAD_MODULES for k, v in getattr(model, name).state_dict().items()}
    state.update({name: getattr(model, name).detach() for name in SCALES})
    return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
            for k, v in state.items()}


def save_text(model, folder: Path) -> None:
    """``text/`` = the trunk without LoRA; ``text_lora/`` = the adapter (when LoRA is on)."""
    lm = model.text.lm
    if model.cfg.model.lora.enabled:
        lm.save_pretrained(str(folder / "text_lora"))
        base = copy.deepcopy(lm).unload()  # PEFT: strip the LoRA layers, keep the base weights
    else:
        base = lm
    base.save_pretrained(str(folder / "text"))


def load_metrics(checkpoint_uri: str, metrics_uri: str | None, opts: storage.StorageOptions) -> dict | None:
    """``metrics_uri``, else ``<checkpoint>/eval/metrics.json`` if an evaluation wrote one."""
    uri = metrics_uri or storage.join(checkpoint_uri, "eval", "metrics.json")
    if not storage.exists(uri, opts):
        if metrics_uri:
            raise ValueError(f"--metrics {metrics_uri}: no such file")
        return None
    return json.loads(storage.read_bytes(uri, opts))


def export_checkpoint(checkpoint_uri: str, out_uri: str, metrics_uri: str | None = None) -> list[str]:
    """Write the Hugging Face export of a checkpoint to ``out_uri``; returns the files written."""
    from safetensors.torch import save_file

    from mama_ray.eval.model_card import model_card
    from mama_ray.models.tokenizer import save_tokenizer
    from mama_ray.train.checkpoint import load_model_from_checkpoint

    model, tokenizer, cfg, state = load_model_from_checkpoint(checkpoint_uri)
    opts = storage.StorageOptions.from_config(cfg.storage)
    metrics = load_metrics(checkpoint_uri, metrics_uri, opts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.vision.vit.save_pretrained(str(folder / "vision"))
        save_text(model, folder)
        save_tokenizer(tokenizer, str(folder / "tokenizer"))
        save_file(head_state(model), str(folder / "heads.safetensors"))
        (folder / "mama_config.yaml").write_text(config.dump_yaml(cfg))
        (folder / "README.md").write_text(model_card(cfg, checkpoint_uri, state.step, metrics))
        storage.upload_dir(folder, out_uri, opts)
        return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
