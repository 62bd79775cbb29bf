"""Projection heads (method.md §2.4): global projections, local (SLA) MLPs, multi-view SimCLR head.

The local MLPs are the original's 1×1 ``Conv1d`` layers written as ``Linear`` over the feature
axis (same maths, same parameter count). The text local head normalises with BatchNorm over
**one caption's sentences** at a time; :class:`SentenceBatchNorm` does that for a whole batch at
once, ignoring padded sentence slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Float32BatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` computed in the dtype of its running statistics, whatever the weights' dtype.

    Under DeepSpeed bf16 the parameters become bf16 while buffers keep float32, which plain
    BatchNorm refuses ("expected scalar type BFloat16 but found Float"). Normalising in float32
    also keeps the batch statistics and the running averages exact; the output returns in the
    input's dtype for the next (bf16) layer. Same maths as ``nn.BatchNorm1d`` otherwise.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm1d
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        weight = self.weight.to(dtype) if self.affine else None
        bias = self.bias.to(dtype) if self.affine else None
        y = F.batch_norm(x.to(dtype), self.running_mean, self.running_var, weight, bias,
                         use_batch_stats, momentum, self.eps)
        return y.to(x.dtype)


class SentenceBatchNorm(nn.BatchNorm1d):
    """BatchNorm whose statistics come from each caption's valid sentences separately.

    Training: caption ``i`` is normalised with the mean/variance of its ``m_i`` valid sentence
    vectors, exactly as applying ``BatchNorm1d`` to that caption alone (the original's loop). A
    caption with a single sentence — where the original crashes ("expected more than 1 value per
    channel") — is normalised with the running statistics instead. Running statistics advance
    once per caption with ≥ 2 sentences, in batch order, as the loop would (closed form below).
    Eval: running statistics. Padded slots come out as zeros. Computed in the running statistics'
    dtype (float32 under bf16 training, see :class:`Float32BatchNorm1d`), returned in ``x``'s.
    """

    def forward(self, x_in: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x B×M×C, mask B×M
        x = x_in.to(self.running_mean.dtype)
        valid = mask.unsqueeze(-1).to(x.dtype)  # B×M×1
        n = mask.sum(dim=1, keepdim=True).unsqueeze(-1)  # B×1×1
        run_mean = self.running_mean.clone()  # stats before this batch
        run_var = self.running_var.clone()
        if self.training:
            own = (n >= 2).to(x.dtype)  # captions using their own statistics
            mean = (x * valid).sum(1, keepdim=True) / n.clamp(min=1)  # B×1×C
            var = ((x - mean) ** 2 * valid).sum(1, keepdim=True) / n.clamp(min=1)  # biased
            self._update_running(mean.squeeze(1), var.squeeze(1), n.view(-1))
            mean = own * mean + (1 - own) * run_mean
            var = own * var + (1 - own) * run_var
        else:
            mean, var = run_mean, run_var
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.to(x.dtype) + self.bias.to(x.dtype)
        return (y * valid).to(x_in.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """Sequential EMA over the K captions with ≥ 2 sentences, in closed form.

        After K updates r ← (1−μ)r + μ·s_k: r = (1−μ)^K r + Σ_k μ(1−μ)^(K−1−k) s_k.
        """
        keep = n >= 2
        k = int(keep.sum())
        if not self.track_running_stats or k == 0:
            return
        mu = self.momentum
        assert mu is not None, "cumulative-average BatchNorm (momentum=None) is not supported"
        w = mu * (1 - mu) ** torch.arange(k - 1, -1, -1, device=mean.device, dtype=torch.float32)
        unbiased = var[keep] * (n[keep] / (n[keep] - 1)).unsqueeze(-1)  # PyTorch tracks unbiased
        decay = (1 - mu) ** k
        self.running_mean.mul_(decay).add_((w.unsqueeze(-1) * mean[keep].float()).sum(0).to(self.running_mean.dtype))
        self.running_var.mul_(decay).add_((w.unsqueeze(-1) * unbiased.float()).sum(0).to(self.running_var.dtype))
        self.num_batches_tracked.add_(k)


class _LocalMLP(nn.Module):
    """The layers both local heads share: Linear C→H, BatchNorm, Linear H→E′, BatchNorm without affine.

    Built in this order (fc1, bn1, fc2, bn2), which fixes the parameter names and the order the
    random initialisation draws them in.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, norm: type[nn.Module]):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn1 = norm(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.bn2 = norm(out_dim, affine=False)


class LocalImageHead(_LocalMLP):
    """Per-patch MLP C→H→E′ with BatchNorm over all patches of the batch; L2-normalised output."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(in_dim, hidden, out_dim, Float32BatchNorm1d)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # B×P×C → B×P×E′
        b, p, _ = patches.shape
        x = F.relu(self.bn1(self.fc1(patches).flatten(0, 1)))  # (B·P)×H
        x = self.bn2(self.fc2(x)).view(b, p, -1)
        return F.normalize(x, dim=-1)


class LocalTextHead(_LocalMLP):
    """Per-sentence MLP C→H→E′ with per-caption BatchNorm; L2-normalised, padded slots zero."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(in_dim, hidden, out_dim, SentenceBatchNorm)

    def forward(self, sent: torch.Tensor, sent_mask: torch.Tensor) -> torch.Tensor:  # B×M×C → B×M×E′
        x = F.relu(self.bn1(self.fc1(sent), sent_mask))
        x = self.bn2(self.fc2(x), sent_mask)
        return F.normalize(x, dim=-1)  # zero rows stay zero


class MultiViewHead(nn.Module):
    """SimCLR projection head (lightly's): Linear(no bias)–BN–ReLU–Linear(no bias)–BN. Not normalised."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), Float32BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, out_dim, bias=False), Float32BatchNorm1d(out_dim),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # B×C → B×E
        return self.net(pooled)
