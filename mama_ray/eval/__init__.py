"""Evaluation of a pretrained MaMA checkpoint (method §5): zero-shot, probes, retrieval, pictures."""
