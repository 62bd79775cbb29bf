"""Tokenizer: special tokens, exact-length padding/truncation, separator mask, pickling, save/load."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mama_ray import config
from mama_ray.data import captions
from mama_ray.data.tokenizer import (
    build_tiny_tokenizer,
    load_tokenizer,
    load_tokenizer_folder,
    save_tokenizer,
    token_arrays,
)

FIELDS = captions.CaptionFields("MG Diagnostic Left", "diagnostic", 61, "African American  or Black",
                                "Hispanic or Latino", "L", "MLO", 4, "S", "irregular", "high density",
                                "fine pleomorphic", "segmental")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_special_tokens_are_single_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in captions.SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3, 4, 5]  # documented order
    for t, i in zip(captions.SPECIAL_TOKENS, ids, strict=True):
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.sep_token) == (
        captions.BOS, captions.EOS, captions.PAD, captions.SEP)


def test_caption_vocabulary_is_covered_and_unknown_words_map_to_unk(tok):
    text = captions.to_model_text(captions.caption_text(FIELDS))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok("<|startoftext|>Zebra<|endoftext|>", add_special_tokens=False)["input_ids"] == [
        0, tok.unk_token_id, 1]


def test_encode_pads_truncates_and_marks_separators(tok):
    short = f"{captions.BOS}The breast is dense{captions.SEP} Negative{captions.SEP}{captions.EOS}"
    long = captions.to_model_text(captions.caption_text(FIELDS))
    enc = token_arrays(tok, [short, long], max_len=12)
    assert enc["input_ids"].shape == (2, 12) and enc["input_ids"].dtype == np.int64
    # short: BOS the breast is dense SEP negative SEP EOS → 9 tokens, then 3 PADs
    assert enc["input_ids"][0].tolist()[-3:] == [2, 2, 2]
    assert enc["attention_mask"][0].tolist() == [1] * 9 + [0] * 3
    assert np.flatnonzero(enc["sep_mask"][0]).tolist() == [5, 7]
    # long: truncated at 12, no padding; first separator after "procedure reported : mg diagnostic left"
    assert enc["attention_mask"][1].tolist() == [1] * 12
    assert np.flatnonzero(enc["sep_mask"][1]).tolist() == [7]
    full = token_arrays(tok, [long], max_len=144)
    assert int(full["sep_mask"].sum()) == long.count(captions.SEP) == 11


def test_pickle_round_trip_encodes_identically(tok):
    text = captions.to_model_text(captions.caption_text(FIELDS))
    again = pickle.loads(pickle.dumps(tok))
    a, b = token_arrays(tok, [text], 144), token_arrays(again, [text], 144)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_save_load_through_folder_and_s3(tok, tmp_path, s3_bucket):
    text = captions.to_model_text(captions.caption_text(FIELDS))
    want = token_arrays(tok, [text], 144)
    _, bucket = s3_bucket
    for uri in (str(tmp_path / "tok"), f"s3://{bucket}/ckpt/tokenizer"):
        save_tokenizer(tok, uri)
        cfg = config.override(config.from_dict({}), {"text.tokenizer": uri,
                                                     "storage.cache_dir": str(tmp_path / "cache")})
        got = token_arrays(load_tokenizer(cfg), [text], 144)
        assert all(np.array_equal(want[k], got[k]) for k in want), uri


def test_loading_a_foreign_tokenizer_adds_the_special_tokens(tmp_path):
    core = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "breast": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer_folder(tmp_path)
    assert len(tok) == 3 + 6
    enc = token_arrays(tok, [f"{captions.BOS}the breast{captions.SEP}{captions.EOS}"], 6)
    sep = tok.convert_tokens_to_ids(captions.SEP)
    assert enc["input_ids"][0].tolist() == [tok.bos_token_id, 1, 2, sep, tok.eos_token_id, tok.pad_token_id]
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer_folder(tmp_path / "missing")
