"""Figures for the course: image grids, denoising trajectories, loss curves, latents and attention maps.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot: nothing opens a window,
nothing piles up in pyplot's global figure list, and it works headless (Agg). In a notebook a figure shows
when it is the cell's last value (or with ``display(fig)``); in a script, ``fig.savefig(path)`` or
``save_grid``.

Images may be torch tensors or numpy arrays, (C, H, W) with C = 1 or 3 (or (H, W)), or a batch
(B, C, H, W), or PIL images. ``value_range`` says what they span: (-1, 1), the course's convention for
model inputs and outputs, or (0, 1).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

ValueRange = tuple[float, float]


def to_numpy(image, value_range: ValueRange = (-1.0, 1.0)) -> np.ndarray:
    """One image -> float array (H, W, 3) or (H, W) in [0, 1], ready for ``imshow``."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0
    x = image.detach().float().cpu().numpy() if torch.is_tensor(image) else np.asarray(image, np.float32)
    lo, hi = value_range
    x = (x - lo) / (hi - lo)
    if x.ndim == 3:
        if x.shape[0] not in (1, 3):
            raise ValueError(f"an image must have 1 or 3 channels (C, H, W), got shape {tuple(x.shape)}")
        x = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
    elif x.ndim != 2:
        raise ValueError(f"expected one image (C, H, W) or (H, W), got shape {tuple(x.shape)}")
    return np.clip(x, 0.0, 1.0)


def to_pil(image, value_range: ValueRange = (-1.0, 1.0)) -> Image.Image:
    """One image (C, H, W) tensor or array in ``value_range`` -> PIL image ("L" for 1 channel, else "RGB")."""
    return Image.fromarray(np.round(to_numpy(image, value_range) * 255).astype(np.uint8))


def _as_list(images) -> list:
    """A batch (B, C, H, W), a single image or a list of images -> a list of single images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, Image.Image):
        return [images]
    if images.ndim == 4:
        return list(images)
    return [images]


def _imshow(ax, image, value_range: ValueRange, title: str | None = None, fontsize: float = 8) -> None:
    x = to_numpy(image, value_range)
    ax.imshow(x, cmap="gray" if x.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize, wrap=True)


def _wrap(text: str, width: int = 22) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def image_grid(
    images,
    captions: list[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    size: float = 1.6,
) -> Figure:
    """A grid of images, one axes each (``ncols`` per row), with an optional caption above each."""
    images = _as_list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(captions)} captions for {len(images)} images")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    extra = 0.45 if captions else 0.0  # room for two lines of caption
    fig = Figure(figsize=(size * ncols, (size + extra) * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= len(images):
            fig.delaxes(ax)
            continue
        _imshow(ax, images[k], value_range, _wrap(captions[k]) if captions else None, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pil_grid(images: list, ncols: int | None = None) -> Image.Image:
    """PIL images of one size pasted edge to edge, ``ncols`` per row (default: all in one row), white behind a
    short last row: ``torchvision.utils.make_grid`` without padding, as one picture to save."""
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import make_grid

    if not images:
        raise ValueError("pil_grid needs at least one image")
    x = torch.stack([pil_to_tensor(im.convert("RGB")) for im in images])  # (B, 3, H, W) uint8
    return to_pil_image(make_grid(x, nrow=ncols or len(images), padding=0, pad_value=255))


def save_grid(
    images,
    path: str | Path,
    captions: list[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    dpi: int = 100,
) -> Path:
    """``image_grid(...)`` written to ``path`` (png, pdf, ...); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions, ncols, title, value_range).savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def side_by_side(
    rows: dict[str, object],
    value_range: ValueRange = (-1.0, 1.0),
    size: float = 1.6,
    title: str | None = None,
) -> Figure:
    """One row per entry of ``rows`` (label -> images), e.g. {"input": x, "reconstruction": x_hat}."""
    if not rows:
        raise ValueError("side_by_side needs at least one row")
    lists = {label: _as_list(images) for label, images in rows.items()}
    ncols = max(len(v) for v in lists.values())
    fig = Figure(figsize=(size * ncols + 1.0, size * len(lists) + (0.4 if title else 0)))
    axes = fig.subplots(len(lists), ncols, squeeze=False)
    for r, (label, images) in enumerate(lists.items()):
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(images):
                fig.delaxes(ax)
                continue
            _imshow(ax, images[c], value_range)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_trajectory(
    images_per_step: list,
    steps: list | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    size: float = 1.4,
    title: str | None = None,
) -> Figure:
    """A denoising trajectory: one column per step (x_T ... x_0), one row per sample in the batch.

    ``images_per_step[k]`` is the batch (B, C, H, W) (or one image) at step ``k``; ``steps[k]`` labels it
    (a timestep t, say).
    """
    columns = [_as_list(x) for x in images_per_step]
    if not columns:
        raise ValueError("plot_trajectory needs at least one step")
    if steps is not None and len(steps) != len(columns):
        raise ValueError(f"got {len(steps)} step labels for {len(columns)} steps")
    nrows = len(columns[0])
    fig = Figure(figsize=(size * len(columns), size * nrows + 0.3 + (0.4 if title else 0)))
    axes = fig.subplots(nrows, len(columns), squeeze=False)
    for c, column in enumerate(columns):
        if len(column) != nrows:
            raise ValueError(
                f"every step needs the same number of images: step 0 has {nrows}, step {c} has {len(column)}"
            )
        for r, image in enumerate(column):
            _imshow(
                axes[r, c], image, value_range, f"t = {steps[c]}" if steps is not None and r == 0 else None
            )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


_NOT_LOSSES = {"step", "lr", "seconds", "grad_norm", "epoch"}


def _read_log(log) -> dict[str, list[float]]:
    if isinstance(log, dict):
        return {k: [float(v) for v in vs] for k, vs in log.items()}
    with open(log) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log} holds no rows")
    columns: dict[str, list[float]] = {}
    for key in rows[0]:
        values = [r.get(key, "") for r in rows]
        try:  # empty cells (a value not logged at that step) become NaN; text columns are skipped
            columns[key] = [float(v) if v not in ("", None) else math.nan for v in values]
        except ValueError:
            continue
    return columns


def _smooth(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing); NaNs are skipped."""
    out, avg, weight = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isnan(v):
            avg, weight = smoothing * avg + (1 - smoothing) * v, smoothing * weight + (1 - smoothing)
        out[i] = avg / weight if weight > 0 else math.nan
    return out


def plot_loss_curves(
    log,
    keys: list[str] | None = None,
    smoothing: float = 0.0,
    logy: bool | None = None,
    title: str | None = None,
) -> Figure:
    """Loss curves from the training loop's CSV log (columns step, loss, ..., lr) or a dict of lists.

    ``keys``: the columns to plot (default: every numeric column but step, lr, seconds, grad_norm).
    ``smoothing`` in [0, 1): exponential moving average (the raw curve stays, faint). ``logy``: a log
    y axis (default: when every value is positive). A second axes shows the learning rate when logged.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    columns = _read_log(log)
    if "step" not in columns:
        raise ValueError(f"the log needs a 'step' column; it has {', '.join(columns)}")
    step = np.asarray(columns["step"])
    keys = keys or [k for k in columns if k not in _NOT_LOSSES]
    missing = [k for k in keys if k not in columns]
    if missing or not keys:
        raise ValueError(f"no column {missing or keys}; the log has {', '.join(columns)}")
    has_lr = "lr" in columns and not all(math.isnan(v) for v in columns["lr"])
    fig = Figure(figsize=(9 if has_lr else 5.5, 3.5))
    axes = fig.subplots(1, 2 if has_lr else 1, squeeze=False).ravel()
    ax = axes[0]
    for k in keys:
        values = np.asarray(columns[k], dtype=float)
        if smoothing > 0:
            (line,) = ax.plot(step, values, alpha=0.25)
            ax.plot(step, _smooth(values, smoothing), color=line.get_color(), label=k)
        else:
            ax.plot(step, values, label=k)
    all_values = np.concatenate([np.asarray(columns[k], float) for k in keys])
    if logy if logy is not None else bool(np.nanmin(all_values) > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if has_lr:
        axes[1].plot(step, columns["lr"])
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("learning rate")
        axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_latent_channels(z, size: float = 1.4, title: str | None = None) -> Figure:
    """Each channel of latents z, (C, h, w) or (B, C, h, w), as its own heatmap: one row per sample.

    Channels are scaled together per sample (one colour scale across a row) so their magnitudes compare.
    """
    z = (
        z.detach().float().cpu()
        if torch.is_tensor(z)
        else torch.as_tensor(np.asarray(z), dtype=torch.float32)
    )
    if z.ndim == 3:
        z = z[None]
    if z.ndim != 4:
        raise ValueError(f"expected latents (C, h, w) or (B, C, h, w), got shape {tuple(z.shape)}")
    B, C, h, w = z.shape
    fig = Figure(figsize=(size * C, size * B + 0.3 + (0.4 if title else 0)))
    axes = fig.subplots(B, C, squeeze=False)
    for b in range(B):
        limit = float(z[b].abs().max()) or 1.0
        for c in range(C):
            ax = axes[b, c]
            ax.imshow(z[b, c].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(f"channel {c}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def overlay_attention(
    image,
    maps,
    tokens: list[str],
    value_range: ValueRange = (-1.0, 1.0),
    alpha: float = 0.55,
    size: float = 1.8,
    title: str | None = None,
) -> Figure:
    """Cross-attention heatmaps over an image: the image, then one panel per token with its map on top.

    ``maps``: (n_tokens, h, w) attention of each image position to each token (any h, w: upsampled
    bilinearly to the image); each map is scaled to its own [0, 1] so the spatial pattern shows.
    """
    maps = (
        maps.detach().float().cpu()
        if torch.is_tensor(maps)
        else torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    )
    if maps.ndim != 3:
        raise ValueError(f"maps must be (n_tokens, h, w), got shape {tuple(maps.shape)}")
    if len(tokens) != maps.shape[0]:
        raise ValueError(f"got {len(tokens)} tokens for {maps.shape[0]} maps")
    base = to_numpy(image, value_range)
    H, W = base.shape[:2]
    up = torch.nn.functional.interpolate(maps[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    up = ((up - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    gray = base if base.ndim == 2 else base.mean(-1)  # a grey copy of the image under the heatmap
    fig = Figure(figsize=(size * (len(tokens) + 1), size + 0.4 + (0.4 if title else 0)))
    axes = fig.subplots(1, len(tokens) + 1, squeeze=False).ravel()
    _imshow(axes[0], image, value_range, "image")
    for k, token in enumerate(tokens):
        ax = axes[k + 1]
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax.imshow(up[k], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(token, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show(fig: Figure, dpi: int = 72) -> None:
    """Display a Figure in a notebook as a PNG at ``dpi`` (the stored notebook stays small);
    outside IPython, nothing."""
    import io

    try:
        from IPython.display import Image as IPyImage
        from IPython.display import display
    except ImportError:  # plain Python: the caller saves the figure itself
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    display(IPyImage(buffer.getvalue()))
