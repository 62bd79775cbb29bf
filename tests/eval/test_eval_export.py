"""The Hugging Face export reloads with plain transformers/peft (Auto* classes, the pipeline and the
model card's own code) and reproduces the checkpoint's eval-path outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import AutoPeftModel, PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, pipeline

from mama_ray.data import captions, transforms
from mama_ray.data.tokenizer import token_arrays
from mama_ray.export import export_checkpoint, load_heads
from mama_ray.layout import load_model_from_checkpoint

FIELDS = captions.CaptionFields("MG Screening Bilateral", "screening", 55, "White", None, "L", "CC", 2, "N")


@pytest.fixture(scope="module")
def exported(lora_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mama-tiny"
    files = export_checkpoint(lora_checkpoint, str(out))
    model, tok, cfg, _ = load_model_from_checkpoint(lora_checkpoint)
    return out, files, model, tok, cfg


def mammogram(seed: int = 3) -> np.ndarray:
    """A 150×90 gray 'breast' (bright textured blob) on a black background: the Otsu crop cuts."""
    rng = np.random.default_rng(seed)
    img = np.zeros((150, 90), np.uint8)
    img[20:140, 0:60] = rng.integers(90, 256, (120, 60))
    return img


def card_code(out: Path) -> list[str]:
    """The python blocks of the export's README, pointed at the export folder."""
    card = (out / "README.md").read_text()
    return [b.replace("EXPORT", str(out)) for b in re.findall(r"```python\n(.*?)```", card, re.S)]


def test_vision_encoder_reloads_with_plain_transformers(exported):
    out, files, model, _, cfg = exported
    assert "vision/config.json" in files and "heads.safetensors" in files
    vit = AutoModel.from_pretrained(str(out / "vision")).eval()
    assert type(vit).__name__ == "Dinov2WithRegistersModel"
    image = torch.randint(0, 256, (2, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8)
    want = model.encode_image(image)
    with torch.no_grad():
        hf = vit(pixel_values=(image.float() / 255 - 0.5) / 0.5, output_hidden_states=True)
    pooled = hf.hidden_states[-1].mean(dim=1)
    torch.testing.assert_close(pooled, want["pooled_image"], rtol=1e-5, atol=1e-5)
    heads = load_file(str(out / "heads.safetensors"))
    image_emb = F.normalize(pooled @ heads["image_proj.weight"].T + heads["image_proj.bias"], dim=-1)
    torch.testing.assert_close(image_emb, want["image_emb"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads["logit_scale"], model.logit_scale.detach())


def test_card_code_with_auto_image_processor_gives_the_eval_embedding(exported):
    out, _, model, _, cfg = exported
    gray = mammogram()
    assert transforms.otsu_crop(gray).shape != gray.shape  # the crop really cuts
    # our eval path: Otsu crop → resize S×S → 3 channels → model (which normalises uint8 itself)
    rgb = transforms.to_rgb_chw(transforms.eval_transform(gray, cfg.data.image_size))
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(rgb)[None], local=False)
    scope = {"gray": gray}
    crop, image = card_code(out)[:2]
    exec(crop, scope)  # noqa: S102 - the card's documented code is what is under test
    exec(image, scope)  # noqa: S102
    torch.testing.assert_close(scope["pooled"], want["pooled_image"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scope["image_emb"], want["image_emb"], rtol=1e-5, atol=1e-5)
    # the processor's tensor is exactly (x/255 − 0.5)/0.5 of the cropped image, 3 equal channels
    ref = (torch.from_numpy(rgb).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(scope["pixels"][0], ref, rtol=0, atol=1e-6)


def test_processor_resizes_and_pipeline_extracts_features(exported):
    out, _, model, _, cfg = exported
    s = cfg.model.vision.image_size
    processor = AutoImageProcessor.from_pretrained(str(out / "vision"))
    # a smooth pre-cropped image, not yet resized (120×60 → S×S): the processor resizes it
    crop = (np.add.outer(np.arange(120), np.arange(60)) + 40).astype(np.uint8)
    pixels = processor(Image.fromarray(crop), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, s, s) and torch.equal(pixels[0, 0], pixels[0, 2])
    ours = (torch.from_numpy(transforms.resize(crop, s)).float() / 255 - 0.5) / 0.5
    assert (pixels[0, 0] - ours).abs().max() < 0.05  # PIL bilinear vs OpenCV: within 6 gray levels
    extractor = pipeline("image-feature-extraction", model=str(out / "vision"))
    vit = AutoModel.from_pretrained(str(out / "vision")).eval()
    square = Image.fromarray(transforms.eval_transform(mammogram(), s))
    with torch.no_grad():
        want = vit(pixel_values=processor(square, return_tensors="pt")["pixel_values"]).last_hidden_state
    got = torch.tensor(extractor(square))  # 1×T×C, T = 1 + registers + patches
    assert got.shape == (1, 1 + cfg.model.vision.num_registers + (s // cfg.model.vision.patch_size) ** 2,
                         cfg.model.vision.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_adapter_reloads_with_peft_and_auto_peft_model(exported):
    out, _, model, tok, cfg = exported
    base = AutoModel.from_pretrained(str(out / "text")).eval()
    text = PeftModel.from_pretrained(AutoModel.from_pretrained(str(out / "text")), str(out / "text_lora")).eval()
    auto = AutoPeftModel.from_pretrained(str(out / "text_lora")).eval()
    adapter = json.loads((out / "text_lora" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "text")
    hf_tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(hf_tok) == len(tok)
    enc = token_arrays(hf_tok, [captions.to_model_text(captions.caption_text(FIELDS))], cfg.text.max_len)
    ids, mask = torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"])
    with torch.no_grad():
        want = model.text(ids, mask)
        got = text(input_ids=ids, attention_mask=mask).last_hidden_state
        got_auto = auto(input_ids=ids, attention_mask=mask).last_hidden_state
        bare = base(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_auto, want, rtol=1e-5, atol=1e-5)
    assert (bare - want).abs().max() > 1e-3  # the adapter is what makes them equal
    readme = (out / "text_lora" / "README.md").read_text()
    assert "[More Information Needed]" not in readme and "LoRA r=4, alpha=16" in readme


def test_card_text_and_heads_code_give_the_model_outputs(exported):
    out, _, model, tok, cfg = exported
    caption = captions.caption_text(FIELDS)
    enc = token_arrays(tok, [captions.to_model_text(caption)], cfg.text.max_len)
    gray = mammogram()
    rgb = torch.from_numpy(transforms.to_rgb_chw(transforms.eval_transform(gray, cfg.data.image_size)))[None]
    with torch.no_grad():
        want_text = model.encode_text(torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"]),
                                      pooling="mean", local=False)["text_emb"]
        want_patches = model.encode_image(rgb)["patch_emb"]
    scope = {"gray": gray, "captions": [caption]}
    for block in card_code(out):
        exec(block, scope)  # noqa: S102 - the card's documented code is what is under test
    torch.testing.assert_close(scope["text_emb"], want_text, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(scope["patch_emb"], want_patches, rtol=1e-5, atol=1e-5)
        pooled = model.encode_image(rgb)["pooled_image"]
        torch.testing.assert_close(load_heads(out)["mv_head"](pooled), model.mv_head(pooled))


def card_metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_states_metadata_use_data_config_and_metrics(exported):
    out = exported[0]
    card = Path(out / "README.md").read_text()
    meta = card_metadata(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert "mammography" in meta["tags"] and "base_model" not in meta  # random-init towers
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == 0.625 and result["dataset"]["name"] == "s3://b/shards"
    assert "## Intended use" in card and "not for clinical use" in card and "## Limitations" in card
    assert "checkpoint_00000007" in card and "optimizer step 7" in card
    assert "| zero-shot | density | - | 8 | 0.500 | 0.625 | 0.750 |" in card
    assert "LoRA r=4" in card and (out / "mama_config.yaml").is_file()


def test_card_finds_the_evaluation_pretraining_wrote_beside_the_run(lora_checkpoint, tmp_path):
    """Pretraining's end-of-run evaluation writes <run>/eval/metrics.json naming the checkpoint."""
    run = tmp_path / "runs" / "mama-tiny"
    ckpt = run / "checkpoint_00000007"
    shutil.copytree(lora_checkpoint, ckpt, ignore=shutil.ignore_patterns("eval"))
    metrics = {"checkpoint": str(ckpt), "split": "test", "shards": "/data/shards", "balanced_test": False,
               "text_feature": "mean",
               "zero_shot": {"birads": {"n": 12, "accuracy": 0.25, "balanced_accuracy": 0.375, "auc": None}}}
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    export_checkpoint(str(ckpt), str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| zero-shot | birads | - | 12 | 0.250 | 0.375 | n/a |" in card
    # an evaluation of another checkpoint of the run is not this checkpoint's
    metrics["checkpoint"] = str(run / "checkpoint_00000003")
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    export_checkpoint(str(ckpt), str(tmp_path / "out2"))
    assert "No evaluation was found" in (tmp_path / "out2" / "README.md").read_text()
