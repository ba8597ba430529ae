"""Chapter 05's half-precision claims, checked: fp16 attention logits overflow to inf and the softmax to NaN,
diffusers' upcast fixes it; an fp16 decode of a VAE whose stream crosses 65,504 is NaN, decode_fp32 is not."""

import copy
import math

import pytest
import torch

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.memory import FP16_MAX, autocast, decode_fp32, max_activations

D, N = 40, 64


def _q_k(offset: float, d: int = D):
    """q, k (1, N, d) with one channel equal to ``offset`` in every token: every logit gains offset^2.

    The other entries are half-integers, exact in fp16 and bf16, so a rounded input is the input itself and
    the only rounding left is in the arithmetic the test is about."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, N, d, generator=g), torch.randn(1, N, d, generator=g)
    q, k = torch.round(q * 2) / 2, torch.round(k * 2) / 2
    q[..., 0], k[..., 0] = offset, offset
    return q, k


def _weights(q, k, how):
    d = q.shape[-1]
    if how == "product, then scale":
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    elif how == "scale, then product":
        s = (q / math.sqrt(d)) @ k.transpose(-1, -2)
    elif how == "in float64":  # the exact answer, to the precision anyone can check
        s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    else:  # in float32
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    return s.softmax(-1)


def test_fp16_logits_overflow_to_nan_and_fp32_logits_fix_it():
    q, k = _q_k(300.0)  # q . k ~ 90,000 > 65,504; divided by sqrt(40): ~14,200
    ref = _weights(q, k, "in float32")
    assert torch.isfinite(ref).all()
    plain = _weights(q.half(), k.half(), "product, then scale")
    assert plain.isnan().all(), "every logit overflows, so every softmax row is inf - inf"
    scaled = _weights(q.half(), k.half(), "scale, then product")
    assert torch.isfinite(scaled).all()
    assert (scaled.float() - ref).abs().max() > 0.05, (
        "in range, but fp16's spacing near 14,000 loses the logits"
    )
    upcast = _weights(q.half(), k.half(), "in float32")
    torch.testing.assert_close(upcast.float(), ref, atol=2e-3, rtol=0)  # only the inputs rounded
    bf16 = _weights(q.bfloat16(), k.bfloat16(), "product, then scale")
    assert torch.isfinite(bf16).all() and (bf16.float() - ref).abs().max() > 0.05  # range, not precision


@pytest.mark.parametrize("offset, nan_without_upcast", [(300.0, False), (1000.0, True)])
def test_diffusers_upcast_attention_is_the_fix(offset, nan_without_upcast):
    """diffusers scales inside one fp16 baddbmm: no inf at ~11,000 but a precision loss; NaN once the scaled
    logits pass 65,504; with upcast_attention and upcast_softmax it matches the exact answer, as our
    "in float32" does.

    Head dim 64 here, not SD's 40: its scale 1/8 is a power of two, so with half-integer inputs every fp32
    logit is exact whatever order a kernel sums in. With 40 the logits near 158,000 carry fp32's spacing of
    1/64, and baddbmm and matmul, summing in different orders, disagree by up to 1e-2 in a weight: fp32's
    limit, not the upcast's."""
    from diffusers.models.attention_processor import Attention

    d = 64
    q, k = _q_k(offset, d)
    ref = _weights(q, k, "in float64")
    plain = Attention(query_dim=d, heads=1, dim_head=d).get_attention_scores(q.half(), k.half())
    assert bool(plain.isnan().any()) == nan_without_upcast
    if not nan_without_upcast:
        assert (plain.double() - ref).abs().max() > 0.05
    fixed = Attention(query_dim=d, heads=1, dim_head=d, upcast_attention=True, upcast_softmax=True)
    theirs = fixed.get_attention_scores(q.half(), k.half())
    ours = _weights(q.half(), k.half(), "in float32")
    # diffusers returns the weights in fp16: within fp16's spacing at the largest weight
    torch.testing.assert_close(theirs.double(), ref, atol=2e-4, rtol=0)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)


def test_fp16_decode_overflows_where_the_stream_passes_fp16_max_and_decode_fp32_does_not():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny()).eval()
    z = torch.randn(1, 4, 8, 8)
    for s, overflows in ((1.0, False), (50_000.0, True)):
        big = copy.deepcopy(vae)
        with torch.no_grad():
            big.decoder.conv_in.weight.mul_(s)
            big.decoder.conv_in.bias.mul_(s)
        kinds = (type(big.decoder.mid_block),)
        peaks = max_activations(big.decoder, lambda: big.decode(z), kinds=kinds)  # noqa: B023  runs now
        assert (max(peaks.values()) > FP16_MAX) == overflows
        with torch.no_grad():
            with autocast("cpu", "bf16"):
                x32 = decode_fp32(big, z)
            x16 = copy.deepcopy(big).half().decode(z.half())
            xbf16 = copy.deepcopy(big).bfloat16().decode(z.bfloat16())
        assert x32.dtype == torch.float32 and torch.isfinite(x32).all()
        assert (
            bool((~x16.isfinite()).all()) == overflows
        )  # one inf reaches every pixel through the GroupNorms
        if not overflows:
            assert (x16.float() - x32).abs().max() < 0.02
        assert (xbf16.float() - x32).abs().max() < 0.1  # bf16 has fp32's range: it never overflows here
