"""Chapter 05's switches leave the output within a stated tolerance of the baseline, and the meter is right.

Tolerances (fp32, tiny random models):
* attention backends math / sdpa / sliced, chunked feed-forward, batch slicing: <= 1e-5 (rounding only);
* gradient checkpointing: gradients <= 1e-5 relative (the same computation, recomputed);
* tiled decode with overlap: not exact (GroupNorm statistics and mid-block attention see one tile); the test
  bounds it below the error of tiles without overlap and below 0.5 x max |x| on a random tiny VAE;
* bf16 autocast: <= 5e-2 x max |ref| (8 bits of mantissa).
"""

from __future__ import annotations

import pytest
import torch

from common.attention import attention, attention_backend, set_chunk_feed_forward
from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.memory import (
    FP16_MAX,
    RSS_METHOD,
    MiB,
    allocation_case,
    attention_case,
    attention_matrix_bytes,
    autocast,
    decode_fp32,
    format_table,
    max_activations,
    measure,
    measure_isolated,
    to_channels_last,
    write_table,
)
from common.offload import enable_model_cpu_offload, offload_for_test, offload_units
from common.tiling import (
    blend_tiles,
    ramp,
    sliced_decode,
    sliced_encode,
    tile_spans,
    tiled_decode,
    tiled_encode,
)
from common.unet import UNet, UNetConfig


def _unet_inputs(batch=2, side=16, seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, 7, 32, generator=g)
    return unet, z, torch.tensor([10] * batch), context


def _close(a, b, tol):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max abs diff {err:.3g} > {tol}"


# ---- the meter ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_measure_detects_a_known_allocation_in_a_fresh_process():
    m, _ = measure_isolated(allocation_case, dict(n_bytes=200 * MiB))
    assert m.method == RSS_METHOD
    assert abs(m.peak_bytes - 200 * MiB) <= 0.10 * 200 * MiB, f"measured {m.peak_mib:.1f} MiB for 200 MiB"


def test_measure_in_process_resets_between_calls():
    big, _ = measure(allocation_case(120 * MiB))
    small, _ = measure(allocation_case(40 * MiB))  # an earlier, larger peak must not hide this one
    assert abs(big.peak_mib - 120) <= 12 and abs(small.peak_mib - 40) <= 6, (big.peak_mib, small.peak_mib)


def test_attention_matrix_prediction_matches_the_math_path():
    B, h, N, d = 1, 2, 1024, 8
    m, out = measure(attention_case(backend="math", batch=B, heads=h, tokens=N, dim_head=d), warmup=1)
    predicted = attention_matrix_bytes(B, h, N, N)  # scores and their softmax are alive at once: 2x
    assert 1.8 * predicted <= m.peak_bytes <= 2.4 * predicted, (m.peak_mib, predicted / MiB)
    sliced, _ = measure(
        attention_case(backend="sliced", batch=B, heads=h, tokens=N, dim_head=d, slice_size=128), warmup=1
    )
    assert sliced.peak_bytes < 0.3 * m.peak_bytes


def test_errors_and_tables(tmp_path):
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="bf16"):
        with autocast("cpu", "fp8"):
            pass
    rows = [{"row": "a", "s": 1.5}, {"row": "b", "s": 0.001}]
    assert format_table(rows).splitlines()[0] == "| row | s |"
    md, csv = write_table(rows, tmp_path)
    assert md.read_text().startswith("| row") and csv.read_text().startswith("row,s")


# ---- attention backends and chunked feed-forward ------------------------------------------------------


def test_attention_backends_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 100, 16, generator=g) for _ in range(3))
    ref = attention(q, k, v, backend="math")
    _close(attention(q, k, v, backend="sdpa"), ref, 1e-5)
    with attention_backend("sliced", slice_size=7):  # 7 does not divide 100: the last slice is short
        _close(attention(q, k, v), ref, 1e-5)


def test_unet_backends_and_chunked_feed_forward_agree():
    unet, z, t, context = _unet_inputs()
    with torch.no_grad():
        with attention_backend("math"):
            ref = unet(z, t, context)
        for backend in ("sdpa", "sliced"):
            with attention_backend(backend, slice_size=32):
                _close(unet(z, t, context), ref, 1e-5)
        assert set_chunk_feed_forward(unet, 16, dim=1) > 0
        with attention_backend("math"):
            _close(unet(z, t, context), ref, 1e-5)
        to_channels_last(unet)
        with attention_backend("math"):
            _close(unet(z.to(memory_format=torch.channels_last), t, context), ref, 1e-5)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    unet, z, t, context = _unet_inputs()
    unet.train()

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(z, t, context).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters()])

    ref = grads()
    unet.enable_gradient_checkpointing()
    _close(grads(), ref, 1e-5)


def test_bf16_autocast_is_close():
    unet, z, t, context = _unet_inputs()
    with torch.no_grad():
        ref = unet(z, t, context)
        with autocast("cpu", "bf16"):
            out = unet(z, t, context)
    assert out.dtype == torch.bfloat16
    _close(out.float(), ref, 5e-2)


# ---- VAE: tiling, slicing, fp32 decode -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig.tiny()).eval()


def test_tile_spans_and_ramps():
    assert tile_spans(128, 64, 16) == [(0, 64), (48, 112), (96, 128)]  # diffusers' grid at 1024 px
    assert tile_spans(64, 64, 16) == [(0, 64)]  # one tile: a 512 px decode is not tiled
    r = ramp(10, 4, 4)
    assert torch.allclose(r[6:] + ramp(10, 4, 0)[:4], torch.ones(4))  # a fall and a rise sum to 1
    with pytest.raises(ValueError, match="overlap"):
        tile_spans(100, 16, 16)


def test_tiled_decode_is_close_and_overlap_helps(vae):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 40, 40, generator=g)
    with torch.no_grad():
        full = vae.decode(z)
        small = vae.decode(z[:, :, :16, :16])
        _close(tiled_decode(vae, z[:, :, :16, :16], tile=16, overlap=4), small, 1e-6)  # one tile: exact
        tiled = tiled_decode(vae, z, tile=16, overlap=4)
        hard = tiled_decode(vae, z, tile=16, overlap=0)
    assert tiled.shape == full.shape
    err, err_hard = float((tiled - full).abs().mean()), float((hard - full).abs().mean())
    assert err < err_hard, f"blending across the overlap should help: {err:.3g} vs {err_hard:.3g} without"
    assert float((tiled - full).abs().max()) < 0.5 * float(full.abs().max())


def test_blend_tiles_reassembles_an_image_exactly():
    img = torch.randn(1, 3, 40, 40)
    spans = tile_spans(40, 16, 6)
    rows = [[img[:, :, y0:y1, x0:x1] for x0, x1 in spans] for y0, y1 in spans]
    _close(
        blend_tiles(rows, spans, spans), img, 1e-6
    )  # weights sum to 1 everywhere: consistent tiles come back


@pytest.mark.slow
def test_tiled_encode_and_slicing(vae):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
    z = torch.randn(3, 4, 12, 12, generator=g)
    with torch.no_grad():
        post = vae.encode(x)
        tiled = tiled_encode(vae, x, tile=12, overlap=4)
        assert tiled.mean.shape == post.mean.shape
        assert float((tiled.mean - post.mean).abs().max()) < 0.5 * float(post.mean.abs().max())
        _close(sliced_decode(vae, z), vae.decode(z), 1e-5)  # batch slicing is exact
        _close(sliced_encode(vae, x, batch_size=2).mean, post.mean, 1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        sliced_decode(vae, z, batch_size=0)


def test_decode_fp32_and_max_activations(vae):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), autocast("cpu", "bf16"):
        out = decode_fp32(vae, z)
    assert out.dtype == torch.float32
    _close(out, vae.decode(z), 1e-5)
    peaks = max_activations(vae.decoder, lambda: vae.decode(z))
    assert "up_blocks.0" in peaks and all(v < FP16_MAX for v in peaks.values())
    scaled = max_activations(vae.decoder, lambda: vae.decode(z * 1e6))  # a blown-up latent overflows fp16
    assert max(scaled.values()) > FP16_MAX


# ---- model CPU offload --------------------------------------------------------------------------------


@pytest.mark.slow
def test_offload_hooks_move_each_block_around_its_call(capsys):
    unet, z, t, context = _unet_inputs()
    with torch.no_grad():
        ref = unet(z, t, context)
    assert enable_model_cpu_offload(unet, "cpu") is None  # CPU only: a no-op, with a message
    assert "nothing to offload" in capsys.readouterr().out
    hooks = offload_for_test(unet)
    with torch.no_grad():
        out = unet(z, t, context)
    _close(out, ref, 1e-6)
    names = [n for n, _ in offload_units(unet)]
    assert "down_blocks.0" in names and "mid_block" in names and "down_blocks" not in names
    # every block went to the device right before it ran and back right after: to, back, to, back, ...
    assert [kind for kind, _ in hooks.log] == ["to", "back"] * (len(hooks.log) // 2)
    assert all(a[1] == b[1] for a, b in zip(hooks.log[::2], hooks.log[1::2]))
    assert {n for _, n in hooks.log} == set(names)
    hooks.remove()
    with torch.no_grad():
        unet(z, t, context)
    assert len(hooks.log) == 2 * len(names)  # removed hooks record nothing
