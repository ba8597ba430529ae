"""Tests for common.viz: every figure has the axes it promises, and nothing reaches pyplot or a window."""

from __future__ import annotations

import csv

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from common import viz


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """No function may register a figure with pyplot (the only way one could open a window)."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def images(n=5, c=3, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g) * 2 - 1


def visible_axes(fig: Figure) -> int:
    return len(fig.axes)


def test_to_pil_and_value_ranges():
    x = images(1)[0]
    rgb = viz.to_pil(x)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    assert viz.to_pil((x + 1) / 2, value_range=(0, 1)).tobytes() == rgb.tobytes()
    gray = viz.to_pil(images(1, c=1)[0])
    assert gray.mode == "L"
    assert np.asarray(viz.to_pil(torch.full((3, 2, 2), -1.0))).max() == 0
    assert np.asarray(viz.to_pil(torch.full((3, 2, 2), 5.0))).min() == 255  # clipped
    with pytest.raises(ValueError, match="1 or 3 channels"):
        viz.to_pil(torch.zeros(2, 4, 4))


@pytest.mark.parametrize("c", [1, 3])
def test_image_grid_axes_and_captions(c):
    fig = viz.image_grid(images(5, c=c), captions=[f"a caption {i}" for i in range(5)], ncols=3, title="t")
    assert isinstance(fig, Figure) and visible_axes(fig) == 5
    assert [ax.get_title() for ax in fig.axes][0] == "a caption 0"
    assert visible_axes(viz.image_grid([Image.new("RGB", (8, 8)), np.zeros((3, 8, 8))])) == 2
    with pytest.raises(ValueError, match="captions"):
        viz.image_grid(images(3), captions=["one"])


def test_save_grid_writes_a_png(tmp_path):
    path = viz.save_grid(images(4), tmp_path / "sub" / "grid.png", captions=list("abcd"), ncols=2)
    with Image.open(path) as im:
        assert im.size[0] > 50 and im.size[1] > 50


def test_side_by_side_and_trajectory():
    fig = viz.side_by_side({"input": images(4), "reconstruction": images(3, seed=1)})
    assert visible_axes(fig) == 7
    assert fig.axes[0].get_ylabel() == "input"
    steps = [1000, 750, 500, 250, 0]
    fig = viz.plot_trajectory([images(2, seed=s) for s in range(5)], steps=steps)
    assert visible_axes(fig) == 10 and fig.axes[0].get_title() == "t = 1000"
    with pytest.raises(ValueError, match="step labels"):
        viz.plot_trajectory([images(2)], steps=[1, 2])


def test_loss_curves_from_the_training_csv_and_a_dict(tmp_path):
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as f:  # the training loop's columns, with empty grad_norm cells
        w = csv.DictWriter(f, ["step", "loss", "kl", "lr", "grad_norm", "seconds"])
        w.writeheader()
        for s in range(1, 41):
            w.writerow(
                {"step": s, "loss": 1 / s + 0.01, "kl": 0.1, "lr": 1e-4, "grad_norm": "", "seconds": s}
            )
    fig = viz.plot_loss_curves(path, smoothing=0.6)
    assert visible_axes(fig) == 2  # losses, learning rate
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["loss", "kl"] and fig.axes[0].get_yscale() == "log"
    fig = viz.plot_loss_curves({"step": [0, 1, 2], "loss": [1.0, -0.5, 0.2]})
    assert visible_axes(fig) == 1 and fig.axes[0].get_yscale() == "linear"
    with pytest.raises(ValueError, match="step"):
        viz.plot_loss_curves({"loss": [1.0]})
    with pytest.raises(ValueError, match="smoothing"):
        viz.plot_loss_curves(path, smoothing=1.0)


def test_latent_channels_and_attention_overlay():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert visible_axes(viz.show_latent_channels(z)) == 8
    assert visible_axes(viz.show_latent_channels(z[0])) == 4
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    fig = viz.overlay_attention(images(1, side=32)[0], maps, ["red", "circle", "left"])
    assert visible_axes(fig) == 4 and [ax.get_title() for ax in fig.axes] == [
        "image",
        "red",
        "circle",
        "left",
    ]
    with pytest.raises(ValueError, match="tokens"):
        viz.overlay_attention(images(1)[0], maps, ["red"])


def test_backend_untouched_and_figures_render(tmp_path):
    backend = matplotlib.get_backend()
    fig = viz.image_grid(images(2))
    fig.savefig(tmp_path / "x.png")
    assert matplotlib.get_backend() == backend


def test_pil_grid_pastes_edge_to_edge():
    from PIL import Image

    images = [Image.new("RGB", (4, 3), (50 * i, 0, 0)) for i in range(5)]
    grid = viz.pil_grid(images, ncols=2)  # 3 rows of 2; the last row has one image and white beside it
    assert grid.size == (8, 9)
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((4, 0)) == (50, 0, 0)
    assert grid.getpixel((0, 6)) == (200, 0, 0) and grid.getpixel((4, 6)) == (255, 255, 255)
    assert viz.pil_grid(images).size == (20, 3)
