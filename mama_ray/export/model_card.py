"""The model card (README.md) of a Hugging Face export and the LoRA adapter's README.

The card follows the Hub's conventions: a YAML metadata header (license, library_name, tags,
base_model, pipeline_tag), then intended use, limitations, training data, config, the run's
evaluation and code that loads every part. A mammography model must say plainly that it is a
research artefact, not a medical device; the limitations section does.
"""

from __future__ import annotations

import json

from mama_ray.config import Config

# Hub ids of the weights the `base` preset starts from (method.md §2), with the tower sizes that
# identify them; a tower trained from random init (the tiny preset) has no base model.
VISION_BASE = ("facebook/dinov2-with-registers-base", (768, 12, 4, 14))
TEXT_BASE = ("stanford-crfm/BioMedLM", ("gpt2", 2560, 32))
TAGS = ("mammography", "medical-imaging", "vision-language", "clip", "contrastive-learning",
        "dinov2", "mama", "mama-ray")

# The eval transform's crop + resize (method.md §1.6), which no Hugging Face processor step does.
# An image this returns passes the processor's resize unchanged: the tensors are exactly ours.
CROP_SNIPPET = '''import cv2, numpy as np

SIZE = {size}  # the model's input side


def breast_crop(gray: np.ndarray) -> np.ndarray:
    """H×W uint8 mammogram → SIZE×SIZE: Otsu foreground box, then resize (aspect not kept)."""
    _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    x, y, w, h = cv2.boundingRect(mask)
    if w and h:
        gray = gray[y:y + h, x:x + w]
    interp = cv2.INTER_AREA if gray.size > SIZE * SIZE else cv2.INTER_LINEAR
    return cv2.resize(gray, (SIZE, SIZE), interpolation=interp)'''

IMAGE_SNIPPET = '''import safetensors.torch, torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("EXPORT/vision")  # resize, /255, mean=std=0.5, RGB
vit = AutoModel.from_pretrained("EXPORT/vision").eval()          # Dinov2WithRegistersModel
heads = safetensors.torch.load_file("EXPORT/heads.safetensors")
pixels = processor(Image.fromarray(breast_crop(gray)), return_tensors="pt")["pixel_values"]  # 1×3×S×S
with torch.no_grad():
    out = vit(pixel_values=pixels, output_hidden_states=True)
pooled = out.hidden_states[-1].mean(dim=1)    # pre-LN mean of all tokens: the probe feature, 1×C
image_emb = F.normalize(pooled @ heads["image_proj.weight"].T + heads["image_proj.bias"], dim=-1)
patches = out.last_hidden_state[:, 1 + vit.config.num_register_tokens:]  # post-LN patch tokens'''

TEXT_SNIPPET = '''from peft import AutoPeftModel
from transformers import AutoTokenizer

MAX_LEN = {max_len}
tokenizer = AutoTokenizer.from_pretrained("EXPORT/tokenizer")
text = AutoPeftModel.from_pretrained("EXPORT/text_lora").eval()  # base: text/ (adapter_config.json)
# a caption in the training format, "." and ";" → the separator token, wrapped in BOS … EOS
texts = ["<|startoftext|>" + c.replace("\\n", " ").replace(".", "<|separatetext|>")
         .replace(";", "<|separatetext|>") + "<|endoftext|>" for c in captions]
enc = tokenizer(texts, add_special_tokens=False, padding="max_length", truncation=True,
                max_length=MAX_LEN, return_tensors="pt")
with torch.no_grad():
    hidden = text(**enc).last_hidden_state                                # B×L×C
text_emb = F.normalize(hidden.mean(dim=1) @ heads["text_proj.weight"].T + heads["text_proj.bias"], dim=-1)
score = heads["logit_scale"].exp() * image_emb @ text_emb.T               # 1×B'''

HEADS_SNIPPET = '''from mama_ray.export import load_heads   # pip install mama-ray

heads = load_heads("EXPORT")       # ModuleDict: image_proj, text_proj (nn.Linear), local_image_head,
patch_emb = heads["local_image_head"](patches)   # local_text_head, mv_head, scales  — B×P×E′'''


def _metrics_section(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["No evaluation was found for this checkpoint (run `mama-evaluate`, then export",
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


def base_models(cfg: Config) -> list[str]:
    """Hub ids of the pretrained weights the towers started from (none for a random init)."""
    v, t = cfg.model.vision, cfg.model.text
    out = []
    if v.weights and (v.hidden_size, v.num_layers, v.num_registers, v.patch_size) == VISION_BASE[1]:
        out.append(VISION_BASE[0])
    if t.weights and (t.arch, t.hidden_size, t.num_layers) == TEXT_BASE[1]:
        out.append(TEXT_BASE[0])
    return out


def metadata(cfg: Config, metrics: dict | None) -> list[str]:
    """The card's YAML header (Hub model-card metadata)."""
    lines = ["---", "license: apache-2.0", "library_name: transformers",
             "pipeline_tag: image-feature-extraction", "tags:", *[f"- {t}" for t in TAGS]]
    bases = base_models(cfg)
    if bases:
        lines += ["base_model:", *[f"- {b}" for b in bases]]
    if metrics and metrics.get("zero_shot"):
        data = {"name": str(metrics.get("shards") or "unknown"), "type": "mammography",
                "split": str(metrics.get("split"))}
        lines += ["model-index:", f"- name: {json.dumps(f'mama-{cfg.run.name}')}", "  results:"]
        for task, m in metrics["zero_shot"].items():
            score = {"type": "balanced_accuracy", "value": round(float(m["balanced_accuracy"]), 4),
                     "name": f"zero-shot {task} balanced accuracy"}
            lines += ["  - task: {type: zero-shot-image-classification}",
                      f"    dataset: {json.dumps(data)}", f"    metrics: [{json.dumps(score)}]"]
    return [*lines, "---"]


def _use_and_limits() -> list[str]:
    return [
        "## Intended use", "",
        "Research on mammography representation learning: feature extraction, zero-shot and "
        "linear-probe studies, retrieval, as a starting point for fine-tuning. **Research use "
        "only, not for clinical use**: it is not a medical device, has not been validated "
        "prospectively or cleared by any regulator, and must not inform the diagnosis, "
        "screening or treatment of any person.", "",
        "## Limitations", "",
        "- Trained on one data source; screening populations, vendors, processing and label "
        "practice differ between sites, and performance elsewhere is unknown until measured there.",
        "- BI-RADS and density labels are radiologists' reports, with their inter-reader variability; "
        "classes are imbalanced (the evaluation states whether a class-balanced test set was used).",
        "- Subgroup performance (age, race, ethnicity, breast density, device) has not been audited.",
        "- The image input is one 2D view; the model never sees priors or the other views at test time.",
        "- Weights derived from a base model or data set inherit their terms (e.g. the EMBED data "
        "use agreement; BioMedLM's license), whatever the license field above says about the code.",
        "- The Otsu breast crop is not part of the Hugging Face processor: skip it and the inputs "
        "differ from training (see How to use).", "",
    ]


def model_card(cfg: Config, checkpoint_uri: str, step: int, metrics: dict | None) -> str:
    """Markdown model card of an export, with a YAML metadata header."""
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    lora = f"LoRA r={m.lora.r}, alpha={m.lora.alpha} on {', '.join(m.lora.targets)}" if m.lora.enabled else "no LoRA"
    bases = base_models(cfg)
    init = f"initialised from {', '.join(bases)}" if bases else "towers initialised as the config's weights say " \
        f"(vision: `{v.weights or 'random init'}`, text: `{t.weights or 'random init'}`)"
    lines = [
        *metadata(cfg, metrics), "",
        f"# MaMA encoders — run `{cfg.run.name}`", "",
        "Multi-view, multi-scale CLIP pretraining for mammography (MaMA, Du et al., IPMI 2025), "
        f"trained with mama-ray (Ray Train + DeepSpeed); {init}.", "",
        *_use_and_limits(),
        "## Training data", "",
        f"- shards: `{cfg.data.shards or 'the default synthetic EMBED-like set (not real patients)'}`, "
        f"split `train` (patient-level split {cfg.ingest.split_fractions} train/val/test)",
        f"- images {cfg.data.image_size} px after the Otsu breast crop; structured captions from the "
        f"EMBED tables with meta masking p={cfg.text.mask_meta}", "",
        "## Training", "",
        f"- checkpoint: `{checkpoint_uri}` (optimizer step {step} of {cfg.train.max_steps})",
        f"- seed {cfg.run.seed}; lr {cfg.optim.lr}, {cfg.scaling.num_workers} workers × micro-batch "
        f"{cfg.train.micro_batch_size} × accumulation {cfg.train.grad_accum}, DeepSpeed ZeRO-"
        f"{cfg.deepspeed.zero_stage}; full config in `mama_config.yaml`",
        f"- vision: DINOv2 ViT with {v.num_registers} registers, width {v.hidden_size}, depth {v.num_layers}, "
        f"patch {v.patch_size}, input {v.image_size} px (`vision/`)",
        f"- text: {t.arch} trunk, width {t.hidden_size}, depth {t.num_layers} (`text/`), {lora} (`text_lora/`)",
        f"- heads: global projections to {m.emb_dim}, local heads to {m.local_dim}, multi-view head "
        "(`heads.safetensors`); temperatures `logit_scale`, `local_scale` (use exp)",
        f"- losses: CLIP, multi-view NT-Xent (T={cfg.loss.ntxent_temperature}), second-view CLIP and SLA "
        f"from step {cfg.loss.late_loss_step}", "",
        "## Evaluation", "", *_metrics_section(metrics), "",
        "## How to use", "",
        "The eval transform is Otsu breast crop → resize → normalise (mean = std = 0.5) → gray "
        "replicated to RGB. `vision/preprocessor_config.json` does the last three; do the crop first:", "",
        "```python", CROP_SNIPPET.format(size=v.image_size), "```", "",
        "Image embedding (`pipeline(\"image-feature-extraction\", model=\"EXPORT/vision\")` gives "
        "`last_hidden_state` of the same cropped image):", "",
        "```python", IMAGE_SNIPPET, "```", "",
        "Text embedding (mean "
        "pool as in training, or the first-pad state for zero-shot, see mama-ray "
        "`docs/evaluation.md`). `text_lora/adapter_config.json` names the absolute path of `text/` "
        "at export time (`../text` for an s3:// export): after moving or downloading the folder, "
        "set it with `mama_ray.export.link_adapter(\"EXPORT/text_lora\", \"/abs/EXPORT/text\")`.", "",
        "```python", TEXT_SNIPPET.format(max_len=cfg.text.max_len), "```", "",
        "Local (SLA) and multi-view heads:", "", "```python", HEADS_SNIPPET, "```", "",
    ]
    return "\n".join(lines)


def adapter_readme(cfg: Config) -> str:
    """README.md of ``text_lora/`` (replaces peft's blank template)."""
    lo = cfg.model.lora
    return "\n".join([
        "---", "library_name: peft", "tags:", "- lora", "- mammography", "- mama-ray", "---", "",
        f"# LoRA adapter of the MaMA text tower — run `{cfg.run.name}`", "",
        f"LoRA r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout} on `{', '.join(lo.targets)}` of the "
        f"{cfg.model.text.arch} trunk in `../text` (embeddings resized for the caption tokenizer's "
        "special tokens, which this folder also holds). Research use only, not for clinical use; "
        "see `../README.md` for data, evaluation and limitations.", "",
        "```python", "from peft import AutoPeftModel",
        'text = AutoPeftModel.from_pretrained("EXPORT/text_lora")  # loads ../text as the base', "```",
        "",
        "`base_model_name_or_path` in `adapter_config.json` is the absolute path of `text/` at export",
        "time; after moving the export, update it (`mama_ray.export.link_adapter`).", "",
    ])
