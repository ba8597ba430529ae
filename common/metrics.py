"""Image-quality metrics: PSNR and SSIM (scikit-image's maintained implementations), LPIPS (the `lpips`
package, when its backbone weights are on disk), and a small-scale Frechet distance on any feature extractor.

Conventions: images are tensors (B, C, H, W) or (C, H, W) with values in ``value_range`` (the course's
default is [-1, 1], what the autoencoder and the diffusion models produce). Every metric returns the mean
over the batch as a Python float (``per_image=True`` gives the list).

* PSNR = 10 log10(MAX^2 / MSE), MAX the data range (Gonzalez & Woods); higher is better, in dB.
* SSIM (Wang et al. 2004), gaussian-weighted as in the paper; 1 is identical.
* LPIPS (Zhang et al. 2018): distance between deep features; 0 is identical, lower is better.
* FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between feature Gaussians.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.losses import LPIPS, lpips_backbone_available


def _to_numpy01(x: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = value_range
    x = x.detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, *, value_range=(-1.0, 1.0), per_image: bool = False):
    """Peak signal-to-noise ratio in dB (skimage.metrics.peak_signal_noise_ratio, data
    range 1 after rescaling)."""
    from skimage.metrics import peak_signal_noise_ratio

    _check_pair(pred, target)
    p, t = _to_numpy01(pred, value_range), _to_numpy01(target, value_range)
    vals = [float(peak_signal_noise_ratio(ti, pi, data_range=1.0)) for pi, ti in zip(p, t)]
    return vals if per_image else float(np.mean(vals))


def ssim(pred: torch.Tensor, target: torch.Tensor, *, value_range=(-1.0, 1.0), per_image: bool = False):
    """Structural similarity (skimage.metrics.structural_similarity, gaussian window as Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    _check_pair(pred, target)
    p, t = _to_numpy01(pred, value_range), _to_numpy01(target, value_range)
    vals = [
        float(
            structural_similarity(
                ti,
                pi,
                data_range=1.0,
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
        )
        for pi, ti in zip(p, t)
    ]
    return vals if per_image else float(np.mean(vals))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|: how the course reports that two implementations agree (fp32 parity is <= 1e-4)."""
    return (a - b).abs().max().item()


def lpips_available(net: str = "alex") -> bool:
    """Whether the LPIPS backbone weights for ``net`` are on disk (the `lpips` package
    fetches them otherwise)."""
    return lpips_backbone_available(net)


def lpips_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    value_range=(-1.0, 1.0),
    net: str = "alex",
    per_image: bool = False,
):
    """LPIPS through the `lpips` package; raises a clear error saying how to get the
    backbone when it is missing."""
    _check_pair(pred, target)
    lo, hi = value_range
    scale = lambda x: (x.float() - lo) / (hi - lo) * 2 - 1  # noqa: E731  lpips expects [-1, 1]
    model = LPIPS(net=net).to(pred.device).eval()
    with torch.no_grad():
        d = model(scale(pred), scale(target)).flatten()
    vals = [float(v) for v in d]
    return vals if per_image else float(np.mean(vals))


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D): the formula behind FID.

    With the course's small feature extractors (D of a few hundred) a few hundred samples per side give a
    stable number; it is comparable only between runs that use the same extractor and sample counts.
    """
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature arrays with the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)  # (no `disp=`: SciPy >= 1.16 dropped that flag)
    if not np.isfinite(covmean).all():  # near-singular product: nudge both covariances, as pytorch-fid does
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion successes / n (Wilson 1927): it stays inside
    [0, 1] and is not empty at 0 or n successes, unlike the normal approximation. NaN for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p_hat = successes / n
    centre = (p_hat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
