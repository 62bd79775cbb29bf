"""The Hugging Face export reloads with plain transformers/peft and reproduces the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from mama_ray.data import captions
from mama_ray.eval.export import export_checkpoint
from mama_ray.models.tokenizer import encode_texts
from mama_ray.train.checkpoint import load_model_from_checkpoint


@pytest.fixture(scope="module")
def exported(lora_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mama-tiny"
    files = export_checkpoint(lora_checkpoint, str(out))
    model, tok, cfg, _ = load_model_from_checkpoint(lora_checkpoint)
    return out, files, model, tok, cfg


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


def test_lora_adapter_reloads_with_peft(exported):
    out, _, model, tok, cfg = exported
    base = AutoModel.from_pretrained(str(out / "text")).eval()
    text = PeftModel.from_pretrained(AutoModel.from_pretrained(str(out / "text")), str(out / "text_lora")).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(hf_tok) == len(tok)
    fields = captions.CaptionFields("MG Screening Bilateral", "screening", 55, "White", None, "L", "CC", 2, "N")
    enc = encode_texts(hf_tok, [captions.to_model_text(captions.caption_text(fields))], cfg.text.max_len)
    ids, mask = torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"])
    with torch.no_grad():
        want = model.text(ids, mask)
        got = text(input_ids=ids, attention_mask=mask).last_hidden_state
        bare = base(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (bare - want).abs().max() > 1e-3  # the adapter is what makes them equal


def test_model_card_states_data_config_and_metrics(exported):
    out = exported[0]
    card = Path(out / "README.md").read_text()
    assert "checkpoint_00000007" in card and "optimizer step 7" in card
    assert "| zero-shot | density | - | 8 | 0.500 | 0.625 | 0.750 |" in card
    assert "LoRA r=4" in card and (out / "mama_config.yaml").is_file()
