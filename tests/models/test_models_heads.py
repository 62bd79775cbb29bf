"""The heads' BatchNorms under bf16 weights: computed in float32, same maths as nn.BatchNorm1d."""

import torch
from torch import nn

from mama_ray.models.heads import (
    Float32BatchNorm1d,
    LocalTextHead,
    MultiViewHead,
    SentenceBatchNorm,
)


def _pair(affine=True):
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm1d(6, affine=affine), Float32BatchNorm1d(6, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_fp32_batchnorm_equals_torch_in_train_and_eval():
    ref, ours = _pair()
    x = torch.randn(10, 6) * 3 + 1
    for _ in range(3):  # running stats advance identically
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == 3
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_fp32_batchnorm_with_bf16_weights_like_deepspeed():
    # DeepSpeed bf16 casts parameters only; buffers stay float32. Plain BatchNorm then fails.
    ref, ours = _pair()
    ours.weight.data = ours.weight.data.bfloat16()
    ours.bias.data = ours.bias.data.bfloat16()
    x = (torch.randn(10, 6) * 3 + 1).bfloat16()
    y = ours(x)
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    # reference: the same bf16 values, normalised in float32 with the (bf16-rounded) weights
    ref.weight.data = ref.weight.data.bfloat16().float()
    ref.bias.data = ref.bias.data.bfloat16().float()
    expect = ref(x.float())
    torch.testing.assert_close(y.float(), expect, rtol=8e-3, atol=8e-3)  # bf16 output rounding only
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=1e-7)
    plain = nn.BatchNorm1d(6).to(torch.bfloat16)
    plain.running_mean, plain.running_var = plain.running_mean.float(), plain.running_var.float()
    try:
        plain(x)
        raise AssertionError("plain BatchNorm accepted bf16 weights with float32 stats")
    except RuntimeError as e:
        assert "BFloat16" in str(e)


def test_sentence_batchnorm_bf16_matches_float32():
    torch.manual_seed(1)
    bn32 = SentenceBatchNorm(5)
    bn16 = SentenceBatchNorm(5)
    bn16.load_state_dict(bn32.state_dict())
    bn16.weight.data, bn16.bias.data = bn16.weight.data.bfloat16(), bn16.bias.data.bfloat16()
    x = torch.randn(3, 4, 5).bfloat16()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    y16, y32 = bn16(x, mask), bn32(x.float(), mask)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(bn16.running_var, bn32.running_var, rtol=0, atol=1e-7)  # stats in float32


def test_heads_run_with_bf16_parameters():
    torch.manual_seed(2)
    mv, local = MultiViewHead(8, 16, 4), LocalTextHead(8, 16, 4)
    for head in (mv, local):
        for p in head.parameters():
            p.data = p.data.bfloat16()
    z = mv(torch.randn(6, 8).bfloat16())
    s = local(torch.randn(2, 3, 8).bfloat16(), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert z.dtype == s.dtype == torch.bfloat16 and z.shape == (6, 4) and s.shape == (2, 3, 4)
    assert torch.isfinite(z.float()).all() and s[0, 2].abs().sum() == 0  # padded slot stays zero
