"""Parameter counts: the `base` preset on the meta device against the numbers of method.md §2."""

from __future__ import annotations

import importlib
import json

import pytest

from mama_ray import config
from mama_ray.data.tokenizer import build_tiny_tokenizer
from mama_ray.models import BIOMEDLM_VOCAB, build_model, count_parameters

D = 2560  # BioMedLM width


@pytest.fixture(scope="module")
def base_counts():
    return count_parameters(config.from_dict({"model": {"preset": "base"}}), vocab_size=BIOMEDLM_VOCAB)


def test_base_counts_match_the_method(base_counts):
    parts = base_counts["parts"]
    assert parts["vision"]["total"] == pytest.approx(86.58e6, abs=0.01e6)  # ViT-B/14 reg4 at 518
    assert parts["vision"]["trainable"] == parts["vision"]["total"] - 768 - 2 * 768  # mask token, final LN
    assert parts["lora"] == {"total": 32 * 8 * (D + 3 * D), "trainable": 32 * 8 * (D + 3 * D)}  # 2.62M
    # GPT-2 trunk by hand: 32 blocks of 12d² + 13d, token + position embeddings, ln_f; all frozen
    trunk = 32 * (12 * D * D + 13 * D) + (BIOMEDLM_VOCAB + 1024) * D + 2 * D
    assert parts["text"] == {"total": trunk, "trainable": 0}
    assert parts["projections"]["total"] == (768 * 512 + 512) + (D * 512 + 512)  # 1.70M
    assert parts["local_image_head"]["total"] == 768 * 2048 + 2048 + 2 * 2048 + 2048 * 512 + 512  # 2.63M
    assert parts["local_text_head"]["total"] == D * 2048 + 2048 + 2 * 2048 + 2048 * 512 + 512  # 6.30M
    assert parts["mv_head"]["total"] == 768 * 768 + 2 * 768 + 768 * 512 + 2 * 512  # 0.99M
    assert parts["scales"]["total"] == 2
    assert base_counts["trainable"] == pytest.approx(101e6, abs=0.5e6)
    assert base_counts["total"] == sum(p["total"] for p in parts.values())


def test_counts_of_a_built_model_match_the_meta_count():
    cfg = config.from_dict({})
    built = count_parameters(build_model(cfg, build_tiny_tokenizer()))
    assert built == count_parameters(cfg)
    assert built["trainable"] == sum(p["trainable"] for p in built["parts"].values()) < built["total"]


def test_cli_prints_json(base_counts, capsys):
    # `python -m mama_ray.models` runs this main(); called in-process to spare an interpreter start
    main = importlib.import_module("mama_ray.models.__main__").main
    main(["--preset", "base", "--json"])
    assert json.loads(capsys.readouterr().out) == base_counts
    main(["--preset", "base"])
    table = capsys.readouterr().out
    assert "lora" in table and "100.82M" in table.splitlines()[-1]
