"""FLOP model of one MaMA training pair — forward, backward and recompute per component — for MFU.

A *pair* is one sample of the micro-batch: a primary image, its caption and, once the late terms
are on (``loss.late_loss_step``), the second view. Counting rules (those of the PaLM and Megatron
MFU papers), everything per pair:

* a matmul (m×k)·(k×n) is 2·m·n·k FLOPs, so a Linear over T tokens is 2·T·in·out; biases, norms,
  activations, softmax, dropout and other elementwise work are not counted (< 1 % here);
* attention per layer and sequence: QKᵀ and A·V, 2·L²·d each (d = width over all heads) — the
  full square also for causal GPT-2, which is what eager and SDPA attention compute;
* backward of a matmul: one matmul for the input gradient, when the input needs one, and one for
  the weight gradient, when the weight trains — 2× forward for a trainable layer, 1× for a frozen
  layer a gradient passes through (the frozen text trunk under LoRA), 0 when neither;
* attention has no weights: its backward (dP, dQ, dK, dV) is 4 matmuls, 2× forward, whenever
  its inputs need gradients — frozen trunk or not;
* activation checkpointing (Hugging Face, per block) runs every checkpointed block's forward once
  more during the backward: the ``recompute`` column.

MFU = model FLOPs (forward + backward, no recompute) × pairs/s ÷ the device's peak; HFU adds the
recompute. Formulas per component and the ``base`` numbers: docs/training.md "FLOP model and MFU".
Free of Ray and DeepSpeed, so the training metrics and a dashboard can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mama_ray.config import Config, TextTowerConfig, VisionTowerConfig

DEFAULT_SENTENCES = 10  # padded sentence slots per caption (max separators in a micro-batch), method.md §2.2
ATTENTION = ("attention", 0, 0)  # marks QKᵀ and A·V in a block's op list

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendor data sheets; matched as
# substrings of torch.cuda.get_device_name(), first match wins (so the longer names come first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3); GH200 and H200 share its tensor cores
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


@dataclass(frozen=True)
class Flops:
    """FLOPs of one component for one training pair."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0  # forward run again in the backward (activation checkpointing)

    @property
    def model(self) -> float:
        """Forward + backward: what MFU counts."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        """Model FLOPs + recompute: what the device executes (HFU)."""
        return self.model + self.recompute

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward, self.recompute + other.recompute)


@dataclass(frozen=True)
class PairFlops:
    """Per-component FLOPs of one pair in one phase (``early``: CLIP only; ``late``: every term)."""

    phase: str
    components: dict[str, Flops] = field(default_factory=dict)

    @property
    def total(self) -> Flops:
        return sum(self.components.values(), Flops())


# ---- building blocks --------------------------------------------------------------------------


def linear(tokens: float, fan_in: int, fan_out: int) -> float:
    """Forward FLOPs of a Linear (or 1×1 conv) over ``tokens`` rows: 2·T·in·out."""
    return 2.0 * tokens * fan_in * fan_out


def attention(seq: int, width: int) -> float:
    """Forward FLOPs of one layer's attention on one sequence: QKᵀ + A·V = 2 · 2·L²·d."""
    return 4.0 * seq * seq * width


def block_ops(arch: str, width: int, mlp_ratio: int) -> list[tuple[str, int, int]]:
    """One transformer block's matmuls in forward order: (module name, fan-in, fan-out), ATTENTION.

    Ops before ATTENTION read the block's input (GPT-2 ``c_attn``; BERT/ViT query, key, value);
    names are the Hugging Face module names LoRA targets match.
    """
    d, h = width, mlp_ratio * width
    if arch == "gpt2":
        return [("c_attn", d, 3 * d), ATTENTION, ("c_proj", d, d), ("c_fc", d, h), ("c_proj", h, d)]
    if arch in ("bert", "vit"):
        return [("query", d, d), ("key", d, d), ("value", d, d), ATTENTION,
                ("dense", d, d), ("dense", d, h), ("dense", h, d)]
    raise ValueError(f"no FLOP model for architecture {arch!r} (gpt2, bert, vit)")


def block_forward(ops: list[tuple[str, int, int]], seq: int, width: int) -> tuple[float, float]:
    """(matmul, attention) forward FLOPs of one block on one sequence of ``seq`` tokens."""
    mm = sum(linear(seq, i, o) for name, i, o in ops if (name, i, o) != ATTENTION)
    return mm, attention(seq, width)


# ---- towers -----------------------------------------------------------------------------------


def vit_tokens(vcfg: VisionTowerConfig) -> tuple[int, int]:
    """(patches P, tokens T = 1 + registers + P) of the ViT at its image size."""
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    return patches, 1 + vcfg.num_registers + patches


def vit_flops(vcfg: VisionTowerConfig) -> Flops:
    """One image through the trainable ViT: patch embedding + blocks, forward/backward/recompute.

    Backward: every block 2× (weights train, inputs need gradients); the patch embedding only its
    weight gradient (1×: pixels need none). Recompute: the blocks' forward once more with
    ``grad_ckpt`` (HF checkpoints each block, not the embedding).
    """
    patches, tokens = vit_tokens(vcfg)
    embed = linear(patches, 3 * vcfg.patch_size ** 2, vcfg.hidden_size)
    mm, att = block_forward(block_ops("vit", vcfg.hidden_size, vcfg.mlp_ratio), tokens, vcfg.hidden_size)
    blocks = vcfg.num_layers * (mm + att)
    return Flops(embed + blocks, embed + 2 * blocks, blocks if vcfg.grad_ckpt else 0.0)


def _needs_input_grad(ops: list[tuple[str, int, int]], k: int, trainable_before: set[int]) -> bool:
    """Layer 0 of a frozen trunk: op ``k``'s input depends on a trainable op of an earlier stage."""
    attn = ops.index(ATTENTION)
    stage = 0 if k < attn else k - attn + 1  # ops before attention run in parallel on the input
    return any((0 if j < attn else j - attn + 1) < stage for j in trainable_before)


def text_flops(tcfg: TextTowerConfig, lora_r: int, lora_targets: list[str], lora_on: bool,
               max_len: int) -> tuple[Flops, Flops]:
    """(trunk, LoRA) FLOPs of one caption (``max_len`` positions, padding included).

    Backward, per case:
    * ``train_trunk``: every weight trains → every matmul 2×, attention 2×;
    * frozen trunk + LoRA: activation gradients only → each matmul 1× (input gradient), attention
      2×; in layer 0 the ops that run before any LoRA module, and the bases of the LoRA modules
      themselves, read the frozen embeddings' output and need no input gradient. LoRA adapters:
      2r(in+out) forward; backward dA, dB and the rank-r gradient always, the input gradient
      through A only where the module's input needs one;
    * frozen trunk, no LoRA: no gradient enters the trunk → no backward, no recompute;
    * ``grad_ckpt``: Hugging Face's ``activation_checkpointing_enable`` calls
      ``enable_input_require_grads`` on a text model, so the embedding output requires grad and
      every block computes its input gradient — layer 0 too, and even with no LoRA at all (a
      whole activation backward that updates nothing); plus each block's forward (adapters
      included) once more: the recompute.
    """
    ops = block_ops(tcfg.arch, tcfg.hidden_size, 4)
    mm, att = block_forward(ops, max_len, tcfg.hidden_size)
    targets = set(lora_targets) if lora_on else set()
    lora_ops = [op for op in ops if op[0] in targets and op != ATTENTION]
    layers = tcfg.num_layers
    lora_layer = sum(linear(max_len, i, lora_r) + linear(max_len, lora_r, o) for _, i, o in lora_ops)
    fwd, lora_fwd = layers * (mm + att), layers * lora_layer
    if tcfg.train_trunk:
        bwd, lora_bwd = 2 * fwd, 2 * lora_fwd
    elif tcfg.grad_ckpt:  # HF made the embedding output require grad: every block's input gradient
        bwd, lora_bwd = layers * (mm + 2 * att), 2 * lora_fwd
    elif lora_ops:
        bwd_0, lora_bwd_0 = _first_frozen_block_backward(ops, targets, lora_r, max_len, tcfg.hidden_size)
        bwd, lora_bwd = (layers - 1) * (mm + 2 * att) + bwd_0, (layers - 1) * 2 * lora_layer + lora_bwd_0
    else:
        bwd, lora_bwd = 0.0, 0.0
    again = tcfg.grad_ckpt and bwd > 0
    return (Flops(fwd, bwd, fwd if again else 0.0),
            Flops(lora_fwd, lora_bwd, lora_fwd if again else 0.0))


def _first_frozen_block_backward(ops, targets: set[str], r: int, seq: int, width: int) -> tuple[float, float]:
    """Backward of layer 0 of a frozen trunk with LoRA: (trunk, LoRA) FLOPs."""
    trainable = {k for k, (n, _, _) in enumerate(ops) if n in targets and ops[k] != ATTENTION}
    trunk = lora = 0.0
    for k, op in enumerate(ops):
        needs = _needs_input_grad(ops, k, trainable)
        if op == ATTENTION:
            trunk += 2 * attention(seq, width) if needs else 0.0
            continue
        _, i, o = op
        trunk += linear(seq, i, o) if needs else 0.0
        if k in trainable:  # dB, dA and the gradient at the rank-r activation; dX through A if needed
            lora += linear(seq, r, o) + linear(seq, i, r) + linear(seq, o, r) + (linear(seq, i, r) if needs else 0.0)
    return trunk, lora


# ---- the whole pair ----------------------------------------------------------------------------


def _linear_flops(tokens: float, fan_in: int, fan_out: int, fwd_copies: float, weight_grad: float,
                  input_grad: float) -> Flops:
    """A head layer run ``fwd_copies`` times, with ``weight_grad``/``input_grad`` backward copies."""
    f = linear(tokens, fan_in, fan_out)
    return Flops(fwd_copies * f, (weight_grad + input_grad) * f)


def _mlp(tokens: float, dims: tuple[int, ...], copies: float, wgrad: float, igrad: float) -> Flops:
    out = Flops()
    for k, (i, o) in enumerate(zip(dims, dims[1:], strict=False)):
        # the first layer's input gradient goes to the tower (igrad); later layers always need one
        out = out + _linear_flops(tokens, i, o, copies, wgrad, igrad if k == 0 else wgrad)
    return out


def pair_flops(cfg: Config, late: bool, sentences: float = DEFAULT_SENTENCES, world_size: int = 1) -> PairFlops:
    """FLOPs of one training pair per component, as ``train/loop.py`` computes it.

    Early (``late=False``): the primary image and its caption, CLIP only; the multi-view head runs
    forward (``encode_image`` always computes it) but nothing uses it, so no backward. Late: both
    views (the second is encoded without patch features), the local heads, NT-Xent and SLA.
    A term whose ``loss.*_weight`` is 0 is not computed and sends no gradient.

    Args:
        cfg: the run config (model sizes, ``text.max_len``, ``train.micro_batch_size``, loss weights).
        late: the phase.
        sentences: padded sentence slots M per caption (the largest separator count of the
            micro-batch: the local text head and SLA run over all M slots).
        world_size: ranks whose features the NT-Xent gathers (its negatives scale with them).
    Returns:
        A :class:`PairFlops` with components vision, text, lora, projections, mv_head,
        local_image_head, local_text_head, clip, ntxent, sla.
    """
    m, lw = cfg.model, cfg.loss
    v, t = m.vision, m.text
    b, n = cfg.train.micro_batch_size, cfg.train.micro_batch_size * world_size
    patches, _ = vit_tokens(v)
    # 1.0 where a term runs (and sends gradients), else 0.0
    on = float(late)
    clip2, mv, sla = (on * (w != 0) for w in (lw.clip2_weight, lw.mv_weight, lw.sla_weight))
    views, views_bwd = 1 + on, 1 + max(clip2, mv)
    vit = vit_flops(v)
    trunk, lora = text_flops(t, m.lora.r, m.lora.targets, m.lora.enabled, cfg.text.max_len)
    text_grad = 1.0 if trunk.backward > 0 else 0.0
    c = {
        "vision": Flops(views * vit.forward, views_bwd * vit.backward, views_bwd * vit.recompute),
        "text": trunk,
        "lora": lora,
        "projections": _linear_flops(1, v.hidden_size, m.emb_dim, views, 1 + clip2, 1 + clip2)
        + _linear_flops(1, t.hidden_size, m.emb_dim, 1, 1, text_grad),
        "mv_head": _mlp(1, (v.hidden_size, m.mv_hidden, m.emb_dim), views, 2 * mv, 2 * mv),
        "local_image_head": _mlp(patches, (v.hidden_size, m.local_hidden, m.local_dim), on, sla, sla),
        "local_text_head": _mlp(sentences, (t.hidden_size, m.local_hidden, m.local_dim), on, sla, sla * text_grad),
        # B×B similarities per micro-batch → 2·B·E per pair; backward: both inputs' gradients
        "clip": Flops((1 + clip2) * linear(b, m.emb_dim, 1), (1 + clip2) * 2 * linear(b, m.emb_dim, 1)),
        # four B×N×D products (z1·z1ᵀ, z2·z2ᵀ, z1·z2ᵀ, z2·z1ᵀ over the gathered batch)
        "ntxent": Flops(mv * 4 * linear(n, m.emb_dim, 1), mv * 8 * linear(n, m.emb_dim, 1)),
        # einsum npe,ime→inpm: B×B×P×M dot products of E′ per micro-batch → 2·B·P·M·E′ per pair
        "sla": Flops(sla * linear(b * patches * sentences, m.local_dim, 1),
                     sla * 2 * linear(b * patches * sentences, m.local_dim, 1)),
    }
    return PairFlops("late" if late else "early", c)


# ---- utilisation -------------------------------------------------------------------------------


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by its CUDA name (``torch.cuda.get_device_name()``), None if unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(pairs_per_s: float, flops_per_pair: float, peak_tflops_: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (pairs/s × FLOPs per pair) over the peak."""
    return pairs_per_s * flops_per_pair / (peak_tflops_ * 1e12)
