"""Export a training checkpoint to a consolidated Hugging Face folder that the Auto* classes load.

Layout of the export (local folder or s3:// prefix)::

    vision/            Dinov2WithRegistersModel + preprocessor_config.json —
                       transformers.AutoModel / AutoImageProcessor / pipeline("image-feature-extraction")
    text/              the frozen text trunk (GPT-2/BERT, embeddings resized for the special tokens)
    text_lora/         the LoRA adapter with its tokenizer and README (absent when model.lora.enabled
                       is false) — peft.AutoPeftModel.from_pretrained(".../text_lora")
    tokenizer/         the caption tokenizer with its special tokens
    heads.safetensors  image_proj, text_proj, local_image_head, local_text_head, mv_head,
                       logit_scale, local_scale (keys prefixed by module name) — :func:`load_heads`
    mama_config.yaml   the run's full config;  README.md  the model card (YAML metadata header)

The Otsu breast crop of the eval transform (method.md §1.6) is not a step any Hugging Face image
processor has, so the exported processor does only resize → rescale → normalise (mean/std 0.5,
gray → RGB) and the model card documents the crop as a step before it (:data:`CROP_SNIPPET` in
``model_card.py``). An image already cropped and resized to the model's side passes the
processor's resize unchanged, so it gives exactly our eval tensors.

The checkpoint's weights are already consolidated from the ZeRO shards by the training loop
(``model/model.safetensors``); :func:`mama_ray.layout.load_model_from_checkpoint` rebuilds the model from them.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mama_ray import config, storage
from mama_ray.data.tokenizer import save_tokenizer
from mama_ray.export.model_card import adapter_readme, model_card
from mama_ray.layout import load_model_from_checkpoint
from mama_ray.models.heads import LocalImageHead, LocalTextHead, MultiViewHead

log = logging.getLogger(__name__)

HEAD_MODULES = ("image_proj", "text_proj", "local_image_head", "local_text_head", "mv_head")
SCALES = ("logit_scale", "local_scale")
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR: antialiased when shrinking, like cv2.INTER_AREA


def head_state(model) -> dict:
    """Every weight outside the two towers, keyed ``<module>.<param>``."""
    state = {f"{name}.{k}": v for name in HEAD_MODULES for k, v in getattr(model, name).state_dict().items()}
    state.update({name: getattr(model, name).detach() for name in SCALES})
    return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
            for k, v in state.items()}


def load_heads(folder: str | Path):
    """The heads of an export as a ``torch.nn.ModuleDict`` (eval mode), sizes read from the weights.

    Keys: the five :data:`HEAD_MODULES` (``image_proj``/``text_proj`` are ``nn.Linear``; the
    local and multi-view heads are mama-ray's own modules) and the two :data:`SCALES` as
    ``nn.ParameterDict`` entries under ``scales``.
    """
    w = load_file(str(Path(folder) / "heads.safetensors"))

    def linear(name: str) -> torch.nn.Linear:
        out_dim, in_dim = w[f"{name}.weight"].shape
        return torch.nn.Linear(in_dim, out_dim)

    def local(cls, name: str):
        hidden, in_dim = w[f"{name}.fc1.weight"].shape
        return cls(in_dim, hidden, w[f"{name}.fc2.weight"].shape[0])

    hidden, in_dim = w["mv_head.net.0.weight"].shape
    heads = torch.nn.ModuleDict({
        "image_proj": linear("image_proj"), "text_proj": linear("text_proj"),
        "local_image_head": local(LocalImageHead, "local_image_head"),
        "local_text_head": local(LocalTextHead, "local_text_head"),
        "mv_head": MultiViewHead(in_dim, hidden, w["mv_head.net.3.weight"].shape[0]),
        "scales": torch.nn.ParameterDict({s: torch.nn.Parameter(w.pop(s)) for s in SCALES}),
    })
    heads.load_state_dict({**w, **{f"scales.{s}": heads["scales"][s] for s in SCALES}})
    return heads.eval()


def image_processor_config(size: int) -> dict:
    """``preprocessor_config.json`` of the vision folder: the eval transform after the crop.

    Resize to size×size (aspect not kept, as method.md §1.6), ×1/255, normalise with mean = std = 0.5,
    gray → RGB; no centre crop (at the model's side it is a no-op in the method).
    """
    return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"height": size, "width": size}, "resample": PIL_BILINEAR,
            "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def adapter_base_path(out_uri: str) -> str:
    """What ``text_lora/adapter_config.json`` names as its base model.

    peft's ``AutoPeftModel`` passes ``base_model_name_or_path`` to ``from_pretrained`` as it is,
    relative to the working directory, so a local export gets the absolute path of its
    ``text/``; an s3:// export (transformers cannot read S3) gets ``../text``, and the card says
    to point it at the downloaded folder (:func:`link_adapter`).
    """
    if storage.is_s3(out_uri):
        return "../text"
    return str(Path(storage.filesystem(storage.join(out_uri, "text"))[1]))


def link_adapter(adapter_dir: str | Path, base: str) -> None:
    """Set the adapter's ``base_model_name_or_path`` (e.g. after downloading an export)."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_text(model, tokenizer, folder: Path, base: str) -> None:
    """``text/`` = the trunk without LoRA; ``text_lora/`` = the adapter (when LoRA is on), with the
    tokenizer beside it (AutoPeftModel looks for one there, else asks the Hub) and a README."""
    lm = model.text.lm
    if model.cfg.model.lora.enabled:
        lm.save_pretrained(str(folder / "text_lora"))
        link_adapter(folder / "text_lora", base)
        save_tokenizer(tokenizer, str(folder / "text_lora"))
        (folder / "text_lora" / "README.md").write_text(adapter_readme(model.cfg))
        base_lm = copy.deepcopy(lm).unload()  # PEFT: strip the LoRA layers, keep the base weights
    else:
        base_lm = lm
    base_lm.save_pretrained(str(folder / "text"))


def _read_json(uri: str, opts: storage.StorageOptions) -> dict | None:
    return json.loads(storage.read_bytes(uri, opts)) if storage.exists(uri, opts) else None


def _location(uri: str) -> str:
    """A URI in one spelling (local paths absolute, no ``file://``, no trailing ``/``)."""
    return uri.rstrip("/") if storage.is_s3(uri) else storage.filesystem(uri)[1].rstrip("/")


def load_metrics(checkpoint_uri: str, metrics_uri: str | None, opts: storage.StorageOptions) -> dict | None:
    """The evaluation to put in the card: ``metrics_uri``, else ``<checkpoint>/eval/metrics.json``,
    else the run's ``<run>/eval/metrics.json`` (where pretraining's end-of-run evaluation writes)
    when it names this checkpoint."""
    if metrics_uri:
        found = _read_json(metrics_uri, opts)
        if found is None:
            raise ValueError(f"--metrics {metrics_uri}: no such file")
        return found
    found = _read_json(storage.join(checkpoint_uri, "eval", "metrics.json"), opts)
    if found is not None:
        return found
    run_uri = checkpoint_uri.rstrip("/").rsplit("/", 1)[0]
    found = _read_json(storage.join(run_uri, "eval", "metrics.json"), opts)
    if found is not None and _location(str(found.get("checkpoint") or "-")) == _location(checkpoint_uri):
        return found
    if found is not None:
        log.warning("%s/eval/metrics.json evaluates %s, not %s: the card gets no metrics",
                    run_uri, found.get("checkpoint"), checkpoint_uri)
    return None


def export_checkpoint(checkpoint_uri: str, out_uri: str, metrics_uri: str | None = None) -> list[str]:
    """Write the Hugging Face export of a checkpoint to ``out_uri``; returns the files written."""
    model, tokenizer, cfg, state = load_model_from_checkpoint(checkpoint_uri)
    log.info("loaded %s (run %s, step %d)", checkpoint_uri, cfg.run.name, state.step)
    opts = storage.StorageOptions.from_config(cfg.storage)
    metrics = load_metrics(checkpoint_uri, metrics_uri, opts)
    log.info("model card evaluation: %s", "found" if metrics else "none")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.vision.vit.save_pretrained(str(folder / "vision"))
        (folder / "vision" / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(cfg.model.vision.image_size), indent=2) + "\n")
        save_text(model, tokenizer, folder, adapter_base_path(out_uri))
        save_tokenizer(tokenizer, str(folder / "tokenizer"))
        save_file(head_state(model), str(folder / "heads.safetensors"))
        (folder / "mama_config.yaml").write_text(config.dump_yaml(cfg))
        (folder / "README.md").write_text(model_card(cfg, checkpoint_uri, state.step, metrics))
        log.info("writing the export to %s", out_uri)
        storage.upload_dir(folder, out_uri, opts)
        return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
