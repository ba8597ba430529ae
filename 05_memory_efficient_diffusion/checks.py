"""Checks for chapter 05's exercises: ``python -m common.grade 05`` runs them on your exercises.py."""

from __future__ import annotations

import torch

from common.attention import attention_math
from common.memory import MiB, attention_case, attention_matrix_bytes, measure


def check_sliced_attention(m):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 100, 16, generator=g)
    k, v = (
        torch.randn(2, 3, 37, 16, generator=g),
        torch.randn(2, 3, 37, 16, generator=g),
    )  # cross-attention: N_k != N_q
    ref = attention_math(q, k, v)
    for slice_size in (1, 7, 32, 100, 500):  # 7 and 32 leave a short last slice; 500 > N_q is one slice
        out = m.sliced_attention(q, k, v, slice_size)
        assert torch.is_tensor(out) and out.shape == ref.shape, (
            f"slice_size={slice_size}: expected shape {tuple(ref.shape)}, got {getattr(out, 'shape', out)}"
        )
        err = float((out - ref).abs().max())
        assert err <= 1e-5, (
            f"slice_size={slice_size}: max abs diff from full attention {err:.2e} (expected <= 1e-5)"
        )


def check_attention_memory_bytes(m):
    cases = [
        dict(image_side=512, batch=2, heads=8),
        dict(image_side=768, batch=1, heads=8, level=1),
        dict(image_side=256, batch=4, heads=5, f=4, bytes_per_element=2),
    ]
    for c in cases:
        side = c["image_side"] // c.get("f", 8) // 2 ** c.get("level", 0)
        expected = attention_matrix_bytes(
            c["batch"],
            c["heads"],
            side * side,
            side * side,
            torch.float16 if c.get("bytes_per_element") == 2 else torch.float32,
        )
        got = m.attention_memory_bytes(**c)
        assert got == expected, f"{c}: expected {expected:,} bytes ({expected / MiB:.1f} MiB), got {got}"
    # against a measurement: the math path holds the scores and their softmax, two such matrices
    predicted = m.attention_memory_bytes(image_side=256, batch=1, heads=2)  # 32 x 32 = 1024 tokens
    measured, _ = measure(attention_case(backend="math", batch=1, heads=2, tokens=1024, dim_head=8), warmup=1)
    assert 1.6 * predicted <= measured.peak_bytes <= 2.6 * predicted, (
        f"measured {measured.peak_mib:.1f} MiB for the math path, "
        f"about twice your {predicted / MiB:.1f} MiB expected"
    )


def _tiny_vae_tiles(overlap: int):
    from common.autoencoder import AutoencoderConfig, AutoencoderKL
    from common.tiling import tile_spans

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny()).eval()
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(1))
    f = vae.downsample_factor
    spans = tile_spans(20, 8, overlap)  # (0, 8), (6, 14), (12, 20) with overlap 2
    with torch.no_grad():
        full = vae.decode(z)
        rows = [[vae._decode_tile(z[:, :, y0:y1, x0:x1]) for x0, x1 in spans] for y0, y1 in spans]
    pixel_spans = [(a * f, b * f) for a, b in spans]
    return full, rows, pixel_spans


def check_blend_tiles(m):
    from common.tiling import blend_tiles as reference

    img = torch.randn(2, 3, 40, 40)
    spans = [(0, 16), (12, 28), (24, 40)]
    tiles = [[img[:, :, y0:y1, x0:x1] for x0, x1 in spans] for y0, y1 in spans]
    out = m.blend_tiles(tiles, spans, spans)
    assert torch.is_tensor(out) and out.shape == img.shape, (
        f"expected shape {tuple(img.shape)}, got {getattr(out, 'shape', out)}"
    )
    err = float((out - img).abs().max())
    assert err <= 1e-5, f"tiles cut from one image must blend back to it exactly; max abs diff {err:.2e}"
    full, rows, pixel_spans = _tiny_vae_tiles(overlap=2)
    ours = reference(rows, pixel_spans, pixel_spans)
    theirs = m.blend_tiles(rows, pixel_spans, pixel_spans)
    seam, seam_ref = float((theirs - full).abs().mean()), float((ours - full).abs().mean())
    naive = rows_overwrite(rows, pixel_spans, full.shape)
    seam_naive = float((naive - full).abs().mean())
    assert seam <= 1.05 * seam_ref + 1e-6, (
        f"mean abs error from the untiled decode {seam:.4f}; linear cross-fades reach {seam_ref:.4f} "
        f"(pasting tiles without blending: {seam_naive:.4f})"
    )


def rows_overwrite(rows, spans, shape):
    """Tiles pasted one over the other, no blending: the seams the exercise removes."""
    out = torch.zeros(shape)
    for (y0, y1), row in zip(spans, rows):
        for (x0, x1), tile in zip(spans, row):
            out[:, :, y0:y1, x0:x1] = tile
    return out


def check_largest_side(m):
    def peak(side, batch, heads, f=8):
        n = (side // f) ** 2
        return 2 * batch * heads * n * n * 4

    for budget, batch, heads in ((24 * MiB, 1, 2), (2**30, 2, 8), (6 * 2**30, 2, 8), (1000, 1, 1)):
        side = m.largest_side(budget, batch=batch, heads=heads)
        assert isinstance(side, int) and side % 64 == 0 and side >= 0, (
            f"expected a multiple of 64, got {side!r}"
        )
        assert side == 0 or peak(side, batch, heads) <= budget, (
            f"budget {budget / MiB:.0f} MiB: "
            f"{side} px needs {peak(side, batch, heads) / MiB:.0f} MiB, over budget"
        )
        assert peak(side + 64, batch, heads) > budget, (
            f"budget {budget / MiB:.0f} MiB: {side + 64} px also fits "
            f"({peak(side + 64, batch, heads) / MiB:.0f} MiB)"
        )
    # the measured math path at the answer for 24 MiB stays within it (plus the small output)
    side = m.largest_side(24 * MiB, batch=1, heads=2)
    n = (side // 8) ** 2
    measured, _ = measure(attention_case(backend="math", batch=1, heads=2, tokens=n, dim_head=8), warmup=1)
    assert measured.peak_bytes <= 24 * MiB * 1.15, (
        f"the math path measured {measured.peak_mib:.1f} MiB at {side} px, over the 24 MiB budget"
    )


CHECKS = [
    ("sliced_attention", check_sliced_attention),
    ("attention_memory_bytes", check_attention_memory_bytes),
    ("blend_tiles", check_blend_tiles),
    ("largest_side", check_largest_side),
]
