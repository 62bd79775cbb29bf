"""MaMA model: vision tower, text tower (+ LoRA), heads, presets, tokenizer (method §2)."""
