"""Text tower: a GPT-2-family causal LM (BioMedLM) or a BERT-family encoder, with LoRA (method.md §2.2–2.3).

The trunk's final hidden states (after GPT-2's ``ln_f``; BioMedLM's LM head is dropped) give:
* the global feature — the **unmasked** mean over all ``max_len`` positions (training, method.md §2.2) or
  the state at the first pad position (zero-shot, method.md §5.1; position 0 if the text fills the window);
* sentence features — the states at the separator-token positions, padded to the batch's
  largest sentence count with a validity mask.

Everything in the trunk is frozen (embeddings, including the rows of the added special tokens,
and LayerNorms); only the LoRA matrices train. LoRA targets are module names of the trunk:
GPT-2 ``c_attn`` (fused QKV, the PEFT default the method used; also ``c_proj``, ``c_fc``), BERT
``query``, ``key``, ``value`` (attention) or ``dense``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedModel

from mama_ray.config import LoraConfig, TextTowerConfig

LORA_TARGET_HINTS = {"gpt2": "c_attn (the method), c_proj, c_fc", "bert": "query, key, value, dense"}


def _random_trunk(tcfg: TextTowerConfig, vocab: int) -> PreTrainedModel:
    if tcfg.arch == "gpt2":
        return GPT2Model(GPT2Config(vocab_size=vocab, n_positions=tcfg.max_positions,
                                    n_embd=tcfg.hidden_size, n_layer=tcfg.num_layers,
                                    n_head=tcfg.num_heads, use_cache=False,
                                    bos_token_id=None, eos_token_id=None))
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=tcfg.hidden_size,
                                num_hidden_layers=tcfg.num_layers, num_attention_heads=tcfg.num_heads,
                                intermediate_size=4 * tcfg.hidden_size,
                                max_position_embeddings=tcfg.max_positions), add_pooling_layer=False)


def _pretrained_trunk(tcfg: TextTowerConfig, weights_dir: Path) -> PreTrainedModel:
    cls = GPT2Model if tcfg.arch == "gpt2" else BertModel
    kwargs = {"add_pooling_layer": False} if tcfg.arch == "bert" else {"use_cache": False}
    trunk = cls.from_pretrained(str(weights_dir), local_files_only=True, **kwargs)
    if trunk.config.hidden_size != tcfg.hidden_size:
        raise ValueError(f"model.text.weights {weights_dir}: hidden size {trunk.config.hidden_size}, "
                         f"but model.text.hidden_size is {tcfg.hidden_size}; set it to match")
    return trunk


def build_trunk(tcfg: TextTowerConfig, vocab_len: int, weights_dir: Path | None) -> PreTrainedModel:
    """The bare trunk with an embedding row for every token of the tokenizer (``vocab_len``)."""
    if weights_dir is None:
        return _random_trunk(tcfg, max(tcfg.vocab_size, vocab_len))
    trunk = _pretrained_trunk(tcfg, weights_dir)
    if trunk.get_input_embeddings().num_embeddings < vocab_len:
        # New rows get the normal(0, 0.02) init of transformers 4.35 (the method), not mean-resizing.
        trunk.resize_token_embeddings(vocab_len, mean_resizing=False)
    return trunk


def _check_targets(trunk: nn.Module, arch: str, targets: list[str]) -> None:
    names = {n.rsplit(".", 1)[-1] for n, m in trunk.named_modules() if not list(m.children())}
    missing = [t for t in targets if t not in names]
    if missing or not targets:
        raise ValueError(f"model.lora.targets {targets}: {missing or 'empty'} not a module of the "
                         f"{arch} trunk; use e.g. {LORA_TARGET_HINTS[arch]}")


def add_lora(trunk: PreTrainedModel, arch: str, lcfg: LoraConfig) -> nn.Module:
    """Wrap ``trunk`` with LoRA (PEFT); PEFT freezes every non-LoRA weight."""
    _check_targets(trunk, arch, lcfg.targets)
    peft_cfg = PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                              target_modules=list(lcfg.targets), bias="none",
                              fan_in_fan_out=arch == "gpt2")  # GPT-2's Conv1D stores W as in×out
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(trunk, peft_cfg)


class TextTower(nn.Module):
    """Frozen trunk (+ LoRA); returns final hidden states and the pooled/sentence features.

    ``train_trunk`` makes every trunk weight trainable as well (``model.text.train_trunk``): the
    method freezes a *pretrained* trunk and lets LoRA adapt it, but a randomly initialised trunk
    (the tiny preset, with no weights to load) has nothing to adapt — frozen, its random token
    embeddings barely separate the words a prompt differs in.
    """

    def __init__(self, trunk: PreTrainedModel, arch: str, lcfg: LoraConfig, grad_ckpt: bool = False,
                 train_trunk: bool = False):
        super().__init__()
        self.hidden_size = trunk.config.hidden_size
        if grad_ckpt:
            # Non-reentrant checkpointing needs no input that requires grad (pitfalls.md).
            trunk.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if lcfg.enabled:
            self.lm = add_lora(trunk, arch, lcfg)
        else:
            self.lm = trunk.requires_grad_(False)
        if train_trunk:
            self.lm.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states B×L×C."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Global text feature B×C: ``mean`` over all positions, or the ``first_pad`` position's state."""
    if pooling == "mean":
        return hidden.mean(dim=1)  # unmasked on purpose (method.md §2.2): padding positions count too
    if pooling == "first_pad":
        first_pad = (attention_mask == 0).to(torch.int8).argmax(dim=1)  # 0 when there is no pad
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_pad]
    raise ValueError(f"text pooling {pooling!r} is not one of ['mean', 'first_pad']")


def gather_sentences(hidden: torch.Tensor, sep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States at separator positions, in order: (sent B×M×C, sent_mask B×M), M = max count (≥ 1)."""
    b, length, c = hidden.shape
    sep_mask = sep_mask.bool()
    counts = sep_mask.sum(dim=1)  # B
    m = max(int(counts.max()), 1)
    pos = torch.arange(length, device=hidden.device).expand(b, length)
    order = torch.where(sep_mask, pos, pos + length).argsort(dim=1)[:, :m]  # separators first
    sent = hidden.gather(1, order.unsqueeze(-1).expand(b, m, c))  # B×M×C
    sent_mask = torch.arange(m, device=hidden.device) < counts.unsqueeze(1)  # B×M
    return sent, sent_mask
