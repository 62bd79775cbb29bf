"""MaMA model: vision tower, text tower (+ LoRA), heads, presets, tokenizer (method.md §2).

Public API: :func:`build_model`, :class:`MamaModel`, :func:`count_parameters`, and the tokenizer
functions (:func:`build_tiny_tokenizer`, :func:`load_tokenizer`, :func:`save_tokenizer`,
:func:`encode_texts`). Presets (``tiny``, ``base``) live in ``mama_ray.config.MODEL_PRESETS``.
"""

from mama_ray.models.mama import MamaModel, build_model
from mama_ray.models.params import BIOMEDLM_VOCAB, count_parameters, format_table
from mama_ray.models.tokenizer import (
    build_tiny_tokenizer,
    encode_texts,
    load_tokenizer,
    save_tokenizer,
)

__all__ = [
    "BIOMEDLM_VOCAB", "MamaModel", "build_model", "build_tiny_tokenizer", "count_parameters",
    "encode_texts", "format_table", "load_tokenizer", "save_tokenizer",
]
