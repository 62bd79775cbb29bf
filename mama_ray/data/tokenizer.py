"""Tokenizers for the text tower: a real Hugging Face one from a URI, or a tiny one built offline.

The method (method.md §2.2) tokenises captions with BioMedLM's GPT-2 tokenizer after adding the special
tokens of :mod:`mama_ray.data.captions` (BOS, EOS, PAD, separator, mask, unk). Any Hugging Face
tokenizer folder works the same way (local path or s3:// URI): :func:`load_tokenizer` adds the
special tokens it lacks, so each is one token id. With no tokenizer configured
(``text.tokenizer: ""``) :func:`build_tiny_tokenizer` builds a word-level tokenizer from the
caption vocabulary, with no download; checkpoints carry whichever tokenizer was used
(:func:`save_tokenizer`).

Captions arrive already wrapped by :func:`captions.to_model_text` (BOS … EOS, separators), so
:func:`token_arrays` adds no special tokens of its own; it only pads/truncates to ``max_len``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mama_ray import storage
from mama_ray.config import Config
from mama_ray.data import captions

# Roles of the special tokens, as Hugging Face names them (method.md §2.2).
SPECIAL_ROLES = {
    "bos_token": captions.BOS,
    "eos_token": captions.EOS,
    "pad_token": captions.PAD,
    "sep_token": captions.SEP,
    "mask_token": captions.MASK,
    "unk_token": captions.UNK,
}

# Words a caption can contain beyond the template and value tables of captions.py: procedure
# names, race descriptions, views and mass/calcification descriptors of EMBED, and the RSNA prompts.
EXTRA_WORDS = """
MG Screening Diagnostic Bilateral Left Right Unilateral Mammo Mammogram Tomosynthesis Tomo
Digital Screen Diag Additional Views Imaging Implant Implants Breast Ultrasound US Stereo Biopsy
Spot Compression Magnification Magnified Extended Marker Needle Localization Specimen Callback
CC MLO XCCL XCCM ML LM LMO SIO FB AT RL RM ID TAN Cleavage MCC MXCCL
White Black Asian African American Caucasian Other Native Hawaiian Pacific Islander Indian
Alaskan Alaska Unknown Unavailable Unreported Multiple Hispanic Latino Non Not Recorded Patient
Declines Declined
oval round irregular lobulated microlobulated indistinct obscured circumscribed spiculated
architectural distortion asymmetry asymmetric focal global developing tubular intramammary
lymph node skin lesion high equal low fat containing density dense amorphous coarse
heterogeneous dystrophic fine linear branching pleomorphic punctate vascular milk calcium
popcorn like rim suture large rod eggshell lucent centered benign grouped clustered segmental
regional diffuse scattered calcifications calcification mass masses
Cancer negative positive overall healthy or just benign finding screening image with known
biopsy proven malignancy suspicious abnormality found N B A required
"""


def _caption_vocabulary() -> set[str]:
    """Every word the caption template and its value tables can produce, plus EXTRA_WORDS."""
    pre = _pre_tokenizer()
    texts = [EXTRA_WORDS, captions.DENSITY_WARNING, " ".join(captions.SIDE_TEXT.values())]
    texts += [captions.density_text(d) for d in captions.DENSITY_TEXT]
    texts += [captions.impression_text(c) for c in captions.BIRADS_LETTERS]
    texts += list(captions.MASS_TEXT.values()) + list(captions.META_FIELDS)
    fields = captions.CaptionFields("MG Screening Bilateral", "screening", 61, "White", None,
                                    "L", "CC", 1, "A", "oval", "high density", "punctate", "grouped")
    texts += [captions.caption_text(fields), captions.caption_text(fields, frozenset(captions.META_FIELDS))]
    texts += [captions.prefix_text(fields).replace("screening", "diagnostic unknown Hispanic Latino")]
    texts += [str(n) for n in range(121)]
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())}
    return words


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words, and each punctuation mark as its own token ("biopsy-proven" → biopsy, -, proven).
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the caption vocabulary; unknown words → UNK.

    Built offline and deterministically (sorted vocabulary), so two builds give the same ids.
    Special tokens take ids 0–5 in the order of ``captions.SPECIAL_TOKENS``.
    """
    vocab = {tok: i for i, tok in enumerate(captions.SPECIAL_TOKENS)}
    for word in sorted(_caption_vocabulary()):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=captions.UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = _pre_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_ROLES)
    tok.add_special_tokens(dict(SPECIAL_ROLES))  # registers them as atomic, unnormalised tokens
    tok.padding_side = "right"
    return tok


def add_special_tokens(tok: PreTrainedTokenizerBase) -> int:
    """Give ``tok`` the caption special tokens (as the method does for BioMedLM); returns #added.

    Roles are always reassigned to our strings (a BERT tokenizer's ``[SEP]`` stops being the
    separator), because captions spell them out literally.
    """
    added = tok.add_special_tokens(dict(SPECIAL_ROLES))
    tok.padding_side = "right"
    return added


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The tokenizer ``cfg.text.tokenizer`` names (local folder or s3://), else the tiny one.

    Raises:
        ValueError: the URI holds no loadable tokenizer.
    """
    uri = cfg.text.tokenizer
    if not uri:
        return build_tiny_tokenizer()
    opts = storage.StorageOptions.from_config(cfg.storage)
    folder = storage.local_copy(uri, Path(cfg.storage.cache_dir) / "tokenizers", opts)
    return load_tokenizer_folder(folder, uri)


def load_tokenizer_folder(folder: str | Path, name: str = "") -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on a local folder, with the special tokens added."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"tokenizer {name or folder}: folder {folder} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {name or folder}: cannot load a Hugging Face tokenizer: {e}") from None
    add_special_tokens(tok)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, uri: str, opts: storage.StorageOptions | None = None) -> None:
    """Write ``tok`` (Hugging Face format) to a local folder or s3:// prefix."""
    if not storage.is_s3(uri):
        tok.save_pretrained(str(storage.filesystem(uri, opts)[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        storage.upload_dir(tmp, uri, opts)


def token_arrays(tok: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """Tokenise model texts (already BOS … EOS-wrapped) to exactly ``max_len`` tokens each.

    Returns:
        ``input_ids`` int64 B×L, ``attention_mask`` int64 B×L (1 = real token), ``sep_mask`` bool
        B×L (True where the token is the separator). Right padding with PAD, truncation at L.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    enc = tok(list(texts), add_special_tokens=False, padding="max_length", truncation=True,
              max_length=max_len, return_attention_mask=True)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(texts), max_len)  # B×L
    attention_mask = np.asarray(enc["attention_mask"], dtype=np.int64).reshape(len(texts), max_len)
    sep_id = tok.convert_tokens_to_ids(captions.SEP)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "sep_mask": input_ids == sep_id}
