"""VAE tiling and batch slicing: decode (or encode) a large image a piece at a time, for
a fraction of the memory.

The VAE decoder's activations grow with the image: at 1024 px the last level holds 128 x 1024 x 1024 floats
per feature map (512 MiB), four times 512 px. Tiled decoding cuts the latent z into overlapping tiles of
``tile`` x ``tile`` latent pixels, decodes each on its own (the peak is one tile's) and blends the decoded
tiles back together with linear ramps across the overlaps, so no seam shows:

    spans along each side:  [0, tile), [tile - overlap, 2 tile - overlap), ...   (stride = tile - overlap)
    weight of a tile:       ramp_y (outer) ramp_x, each 1 inside and rising linearly across an overlap;
                            two neighbours' ramps sum to 1 at every overlapping pixel (a cross-fade)
    image:                  sum_tiles weight * tile / sum_tiles weight

Tiling is not exact: the decoder's GroupNorm statistics and its mid-block attention see one tile instead of
the whole latent, so a tiled image differs from the untiled one by a small amount (chapter 05 measures it);
the overlap hides the seams this would make. Batch slicing (``sliced_decode``) is exact: it decodes the
images of a batch one (or ``batch_size``) at a time.

Tile size and overlap are in latent pixels. diffusers' ``enable_tiling()`` uses tiles of
``sample_size / f`` = 64 latents with overlap 16 at SD's config, and tiles only latents larger than 64 x 64:
a 512 px decode is never tiled there. Here ``tiled_decode`` with its defaults does the same, and any size
can be asked for. The functions call the AutoencoderKL's ``_decode_tile`` / ``_encode_tile`` seams
(post_quant_conv + decoder, encoder + quant_conv).
"""

from __future__ import annotations

import torch

from common.autoencoder import AutoencoderKL, DiagonalGaussian


def tile_spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) spans of length ``tile`` (the last may be shorter) covering 0..n,
    neighbours sharing ``overlap``."""
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (latent pixels), got {tile!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an int in [0, tile={tile}), got {overlap!r}")
    stride = tile - overlap
    starts = range(0, max(n - overlap, 1), stride)
    return [(s, min(s + tile, n)) for s in starts]


def ramp(length: int, before: int, after: int) -> torch.Tensor:
    """Blend weights along one side of a tile: rising over the first ``before`` entries, falling over the last
    ``after``, 1 between. Entry i of a rise is (i + 0.5) / before, so a neighbour's fall over the same pixels,
    (before - i - 0.5) / before, sums with it to exactly 1 and no entry is 0."""
    if before + after > length:
        raise ValueError(f"ramps of {before} + {after} do not fit in a tile of {length}")
    w = torch.ones(length)
    if before:
        w[:before] = (torch.arange(before) + 0.5) / before
    if after:
        w[length - after :] = torch.minimum(w[length - after :], (after - torch.arange(after) - 0.5) / after)
    return w


def _ramps(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """One ramp per span: rising across the overlap with the previous span, falling across the next one's."""
    out = []
    for k, (start, stop) in enumerate(spans):
        before = spans[k - 1][1] - start if k > 0 else 0
        after = stop - spans[k + 1][0] if k + 1 < len(spans) else 0
        out.append(ramp(stop - start, max(before, 0), max(after, 0)))
    return out


def blend_tiles(
    rows: list[list[torch.Tensor]], y_spans: list[tuple[int, int]], x_spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Assemble decoded tiles into one image with linear cross-fades across their overlaps.

    rows[i][j]: the tile covering rows ``y_spans[i]`` and columns ``x_spans[j]`` of the output, each
    (B, C, stop - start, stop - start) in output pixels. Returns (B, C, y_spans[-1][1], x_spans[-1][1]).
    """
    first = rows[0][0]
    B, C = first.shape[:2]
    H, W = y_spans[-1][1], x_spans[-1][1]
    out = torch.zeros(B, C, H, W, dtype=torch.float32, device=first.device)  # weighted sum of tiles
    total = torch.zeros(1, 1, H, W, dtype=torch.float32, device=first.device)  # sum of weights
    for (y0, y1), ry, row in zip(y_spans, _ramps(y_spans), rows):
        for (x0, x1), rx, tile in zip(x_spans, _ramps(x_spans), row):
            w = (ry[:, None] * rx[None, :]).to(first.device)  # (h, w): outer product of the two ramps
            out[:, :, y0:y1, x0:x1] += tile.float() * w
            total[:, :, y0:y1, x0:x1] += w
    return (out / total).to(first.dtype)  # total is 1 wherever ramps are a partition of unity; safe anyway


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, *, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """``vae.decode(z)`` one tile of ``tile`` x ``tile`` latent pixels at a time, blended across ``overlap``.

    z (B, latent_channels, h, w) -> x (B, out_channels, h*f, w*f). Latents no larger than one tile are decoded
    whole (so the result equals ``vae.decode``). Peak memory: one tile's decode instead of the whole image's.
    """
    vae._check(z, vae.config.latent_channels, "latent", "z")
    f = vae.downsample_factor
    h, w = z.shape[-2:]
    y_spans, x_spans = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    if len(y_spans) == 1 and len(x_spans) == 1:
        return vae.decode(z)
    rows = [[vae._decode_tile(z[:, :, y0:y1, x0:x1]) for (x0, x1) in x_spans] for (y0, y1) in y_spans]
    return blend_tiles(rows, [(a * f, b * f) for a, b in y_spans], [(a * f, b * f) for a, b in x_spans])


def tiled_encode(
    vae: AutoencoderKL, x: torch.Tensor, *, tile: int = 64, overlap: int = 16
) -> DiagonalGaussian:
    """``vae.encode(x)`` one tile at a time: image tiles of ``tile * f`` px,
    overlapping by ``overlap * f`` px.

    The posterior's moments (mean and log-variance) are blended in latent space with the same linear ramps.
    """
    vae._check(x, vae.config.in_channels, "image", "x")
    f = vae.downsample_factor
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(
            f"image sides must be multiples of the downsampling factor {f}; got {x.shape[-2]} x {x.shape[-1]}"
        )
    h, w = x.shape[-2] // f, x.shape[-1] // f
    y_spans, x_spans = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    if len(y_spans) == 1 and len(x_spans) == 1:
        return vae.encode(x)
    rows = [
        [vae._encode_tile(x[:, :, y0 * f : y1 * f, x0 * f : x1 * f]) for (x0, x1) in x_spans]
        for (y0, y1) in y_spans
    ]  # each (B, 2 * latent_channels, y1 - y0, x1 - x0)
    return DiagonalGaussian(blend_tiles(rows, y_spans, x_spans))


def sliced_decode(vae: AutoencoderKL, z: torch.Tensor, *, batch_size: int = 1) -> torch.Tensor:
    """``vae.decode(z)`` ``batch_size`` images at a time: the same result, the peak of a smaller batch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return torch.cat([vae.decode(chunk) for chunk in z.split(batch_size)])


def sliced_encode(vae: AutoencoderKL, x: torch.Tensor, *, batch_size: int = 1) -> DiagonalGaussian:
    """``vae.encode(x)`` ``batch_size`` images at a time; returns the posterior of the whole batch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    posteriors = [vae.encode(chunk) for chunk in x.split(batch_size)]
    return DiagonalGaussian(torch.cat([torch.cat([p.mean, p.logvar], dim=1) for p in posteriors]))
