"""MaMA model: vision tower, text tower (+ LoRA), heads, presets (method.md §2).

Public API: :func:`build_model`, :class:`MamaModel`, :func:`count_parameters`. The tokenizer is
:mod:`mama_ray.data.tokenizer` (the data pipeline tokenises captions with it); presets (``tiny``,
``base``) live in ``mama_ray.config.MODEL_PRESETS``.
"""

from mama_ray.models.mama import MamaModel, build_model
from mama_ray.models.params import BIOMEDLM_VOCAB, count_parameters, format_param_table

__all__ = ["BIOMEDLM_VOCAB", "MamaModel", "build_model", "count_parameters", "format_param_table"]
