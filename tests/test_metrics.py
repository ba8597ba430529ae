"""common.metrics: PSNR/SSIM conventions and the Frechet distance against closed forms."""

import numpy as np
import pytest
import torch

from common.metrics import frechet_distance, psnr, ssim


def test_psnr_matches_the_formula_in_the_course_value_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1  # [-1, 1]
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mse01 = (((x + 1) / 2 - (y + 1) / 2) ** 2).mean(dim=(1, 2, 3))
    expected = (10 * torch.log10(1 / mse01)).mean().item()
    assert psnr(y, x) == pytest.approx(expected, rel=1e-4)
    assert psnr(x, x, per_image=True)[0] == float("inf")


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g)
    assert ssim(x, x, value_range=(0, 1)) == pytest.approx(1.0)
    assert ssim(x + 0.2 * torch.randn(x.shape, generator=g), x, value_range=(0, 1)) < 0.9
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[..., :16])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, means 2 apart along one axis: the distance is |mu_a - mu_b|^2 = 4
    b = a + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=1e-6)
    # isotropic Gaussians with stds 1 and 2 in d dims: d (1 - 2)^2 = 3 (sampling error aside)
    assert frechet_distance(rng.normal(size=(20000, 3)), 2 * rng.normal(size=(20000, 3))) == pytest.approx(
        3.0, rel=0.05
    )
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :2])
