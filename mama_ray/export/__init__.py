"""Export of a training checkpoint: a consolidated Hugging Face folder with a model card.

:func:`export_checkpoint` (``jobs/export.py``) writes it; :func:`load_heads` and
:func:`link_adapter` are for whoever loads an export (the model card's snippets use them).
"""

from mama_ray.export.hf import export_checkpoint, link_adapter, load_heads

__all__ = ["export_checkpoint", "link_adapter", "load_heads"]
