"""The model card (README.md) of a Hugging Face export: data, config, metrics, how to load."""

from __future__ import annotations

from mama_ray.config import Config

LOAD_SNIPPET = '''```python
import torch, safetensors.torch
from transformers import AutoModel, AutoTokenizer
from peft import PeftModel

vit = AutoModel.from_pretrained("EXPORT/vision")           # Dinov2WithRegistersModel
heads = safetensors.torch.load_file("EXPORT/heads.safetensors")
pixels = (image_uint8_bx3xhxw.float() / 255 - 0.5) / 0.5    # the method's normalisation
out = vit(pixel_values=pixels, output_hidden_states=True)
pooled = out.hidden_states[-1].mean(dim=1)                   # pre-LN mean of all tokens (probe feature)
image_emb = torch.nn.functional.normalize(
    pooled @ heads["image_proj.weight"].T + heads["image_proj.bias"], dim=-1)
patches = out.last_hidden_state[:, 1 + vit.config.num_register_tokens:]  # post-LN patch tokens

text = PeftModel.from_pretrained(AutoModel.from_pretrained("EXPORT/text"), "EXPORT/text_lora")
tokenizer = AutoTokenizer.from_pretrained("EXPORT/tokenizer")
```'''


def _metrics_section(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["No evaluation was found beside the checkpoint (run `jobs/evaluate.py`, then export",
                "again, or pass `--metrics`)."]
    lines = [f"Evaluated on split `{metrics.get('split')}` of `{metrics.get('shards')}` "
             f"(class-balanced test: {metrics.get('balanced_test')}, text feature: "
             f"{metrics.get('text_feature')}).", "",
             "| protocol | task | data | n | accuracy | balanced accuracy | AUC |", "|---|---|---|---|---|---|---|"]
    rows = [("zero-shot", t, "-", m) for t, m in (metrics.get("zero_shot") or {}).items()]
    for kind in ("linear_probe", "finetune"):
        for task, by_fraction in (metrics.get(kind) or {}).items():
            rows += [(kind.replace("_", " "), task, f"{float(f):.0%}", m) for f, m in by_fraction.items()]
    for proto, task, data, m in rows:
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        lines.append(f"| {proto} | {task} | {data} | {m['n']} | {m['accuracy']:.3f} | "
                     f"{m['balanced_accuracy']:.3f} | {auc} |")
    if metrics.get("retrieval"):
        r = metrics["retrieval"]
        lines += ["", f"Retrieval over {r['n']} image–caption pairs: image→text "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["image_to_text"].items()) + "; text→image "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["text_to_image"].items()) + "."]
    return lines


def model_card(cfg: Config, checkpoint_uri: str, step: int, metrics: dict | None) -> str:
    """Markdown model card of an export."""
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    lora = f"LoRA r={m.lora.r}, alpha={m.lora.alpha} on {', '.join(m.lora.targets)}" if m.lora.enabled else "no LoRA"
    lines = [
        f"# MaMA encoders — run `{cfg.run.name}`", "",
        "Multi-view, multi-scale CLIP pretraining for mammography (MaMA, Du et al., IPMI 2025), "
        "trained with mama-ray (Ray Train + DeepSpeed).", "",
        "## Source", "",
        f"- checkpoint: `{checkpoint_uri}` (optimizer step {step} of {cfg.train.max_steps})",
        f"- training data: `{cfg.data.shards or 'default synthetic set'}` (split `train`; images "
        f"{cfg.data.image_size} px, structured captions with meta masking p={cfg.text.mask_meta})",
        f"- seed {cfg.run.seed}; full config in `mama_config.yaml`", "",
        "## Model", "",
        f"- vision: DINOv2 ViT with {v.num_registers} registers, width {v.hidden_size}, depth {v.num_layers}, "
        f"patch {v.patch_size}, input {v.image_size} px (`vision/`)",
        f"- text: {t.arch} trunk, width {t.hidden_size}, depth {t.num_layers} (`text/`), {lora} (`text_lora/`)",
        f"- heads: global projections to {m.emb_dim}, local heads to {m.local_dim}, multi-view head "
        "(`heads.safetensors`); temperatures `logit_scale`, `local_scale` (use exp)",
        f"- losses: CLIP, multi-view NT-Xent (T={cfg.loss.ntxent_temperature}), second-view CLIP and SLA "
        f"from step {cfg.loss.late_loss_step}", "",
        "## Metrics", "", *_metrics_section(metrics), "",
        "## Loading", "", LOAD_SNIPPET, "",
        "Zero-shot prompts and caption format: see mama-ray `docs/evaluation.md`.", "",
    ]
    return "\n".join(lines)
