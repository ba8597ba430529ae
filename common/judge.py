"""The Shapes judge: does a generated image show what its prompt asked for? (prompt adherence, measured)

A text-to-image model is graded the way GenEval (Ghosh et al. 2023) grades real ones: find the objects in the
image, read off their attributes, and compare with what the prompt says. On Shapes the prompt's ground truth
is exact (``common.shapes.parse``), and so is most of the reading:

1. segment: the background is the plain ``BACKGROUND`` grey, so an object is an 8-connected component of the
   pixels whose RGB distance from it exceeds ``FOREGROUND``; components under ``MIN_AREA`` pixels are specks;
2. colour: the nearest named colour (``COLORS``) to the median of the component's core pixels;
3. shape: a small CNN (``ShapeNet``) trained on ground-truth crops of real renders; it sees only the
   component's mask cropped to a square around it, so it cannot use colour (held-out colour/shape pairs are
   then no harder than the others);
4. size: the area against a per-shape threshold, the geometric mean of the small and large areas of a
   canonical render; position: the grid cell whose centre is nearest to the centroid; relation: the sign of
   the centroid offset along the relation's axis, which must also be the larger of the two offsets.

Scores: for one-object prompts, per-attribute accuracy and "all" (exactly one object, every attribute right);
for two-object prompts, "objects" (exactly two objects, matching the prompt's two in shape, colour and size)
and "all" (that, and the relation right). A small-scale FID (Heusel et al. 2017) uses the CNN's 64-d pooled
features of each object crop (``features``): a Frechet distance over objects, not over whole images.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from common.shapes import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    Shapes,
    layout,
    parse,
    render,
)

JUDGE_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes_judge"
FOREGROUND = 70.0  # RGB distance (0..255 units) from BACKGROUND above which a pixel belongs to an object
MIN_AREA = 15  # pixels at 64 px; the smallest real object (a small star) covers ~85
CROP = 24  # the CNN's input side
_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = np.asarray([COLORS[c] for c in _COLOR_NAMES], np.float32)  # (6, 3)


class ShapeNet(nn.Module):
    """(B, 1, 24, 24) object mask in [0, 1] -> (logits (B, 6), features (B, 64)): three
    conv levels, GroupNorm."""

    def __init__(self, *, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = len(SHAPES)):
        super().__init__()
        layers, c_in = [], 1
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))  # 24 -> 12 -> 6
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x).mean(dim=(2, 3))  # (B, C_last): global average pool
        return self.head(feats), feats


@dataclass
class Detection:
    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) in pixels, the component's centroid
    area: int


# ----------------------------------------------------------------------------------------------------------
# Segmentation and crops
def to_uint8(images: torch.Tensor, value_range=(0.0, 1.0)) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in ``value_range`` -> (B, H, W, 3) float32 in 0..255."""
    lo, hi = value_range
    x = images.detach().float().cpu()
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    return ((x - lo) / (hi - lo)).clamp(0, 1).mul(255).permute(0, 2, 3, 1).numpy()


def segment(rgb: np.ndarray) -> list[np.ndarray]:
    """(H, W, 3) in 0..255 -> the objects' boolean masks (H, W), largest first."""
    dist = np.linalg.norm(rgb - np.asarray(BACKGROUND, np.float32), axis=-1)  # (H, W)
    labels, n = ndimage.label(dist > FOREGROUND, structure=np.ones((3, 3)))
    scale = (rgb.shape[0] / 64) ** 2
    masks = [labels == k for k in range(1, n + 1)]
    masks = [m for m in masks if m.sum() >= MIN_AREA * scale]
    return sorted(masks, key=lambda m: -int(m.sum()))


def crop(mask: np.ndarray, jitter: np.random.Generator | None = None) -> torch.Tensor:
    """A square crop around the mask, 1.25 x its larger side, resized to (1, CROP, CROP): scale-free shape."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = 1.25 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) + 2
    if jitter is not None:
        side *= float(jitter.uniform(0.9, 1.1))
        cy, cx = cy + float(jitter.uniform(-1, 1)), cx + float(jitter.uniform(-1, 1))
    H, W = mask.shape
    # sample the mask on a CROP x CROP grid over the square (bilinear), via grid_sample's [-1, 1] coordinates
    lin = torch.linspace(-0.5, 0.5, CROP) * side
    gy = (cy + lin[:, None].expand(CROP, CROP)) / (H - 1) * 2 - 1
    gx = (cx + lin[None, :].expand(CROP, CROP)) / (W - 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None].float()  # (1, CROP, CROP, 2)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    return F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[
        0
    ]  # (1, CROP, CROP)


def object_color(rgb: np.ndarray, mask: np.ndarray) -> str:
    dist = np.linalg.norm(rgb - np.asarray(BACKGROUND, np.float32), axis=-1)
    core = mask & (dist >= 0.75 * dist[mask].max())  # away from the anti-aliased edge
    median = np.median(rgb[core], axis=0)  # (3,)
    return _COLOR_NAMES[int(np.linalg.norm(_COLOR_RGB - median, axis=1).argmin())]


@functools.lru_cache(maxsize=8)
def size_thresholds(resolution: int = 64) -> dict[str, float]:
    """Per shape, the area (pixels) between small and large: the geometric mean of
    canonical renders' areas."""
    out = {}
    for shape in SHAPES:
        areas = [
            int(render(Scene((ShapeObject(shape, "red", size, "center"),)), resolution)[1].sum())
            for size in SIZES
        ]
        out[shape] = float(np.sqrt(np.prod(areas)))
    return out


def nearest_position(center: tuple[float, float], resolution: int) -> str:
    x, y = center[0] / resolution, center[1] / resolution
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def relation_holds(relation: str, c0: tuple[float, float], c1: tuple[float, float]) -> bool:
    """``objects[0] <relation> objects[1]`` for centroids c0, c1 (x, y; y down): the right sign along the
    axis, and the offset along it larger than the offset across it."""
    dx, dy = c1[0] - c0[0], c1[1] - c0[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
        relation
    ]
    return along > 0 and abs(along) > abs(across)


# ----------------------------------------------------------------------------------------------------------
# The judge
class Judge:
    """Reads Shapes images back into objects (``detect``) and grades them against prompts (``score``)."""

    def __init__(self, net: ShapeNet, device=None):
        self.net = net.to(device or "cpu").eval()
        self.device = next(net.parameters()).device

    # --- loading and saving ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path = JUDGE_DIR, device=None) -> Judge:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no judge at {path} (expected model.safetensors and config.json): train it with "
                f"`python 06_stable_diffusion_architecture/evaluate.py --train-judge --judge {path}`"
            )
        config = json.loads((path / "config.json").read_text())
        net = ShapeNet(widths=tuple(config["widths"]))
        net.load_state_dict(load_file(path / "model.safetensors"))
        return cls(net, device)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()},
            str(path / "model.safetensors"),
        )
        (path / "config.json").write_text(
            json.dumps(
                {
                    "widths": list(self.net.widths),
                    "classes": list(SHAPES),
                    "crop": CROP,
                    "foreground": FOREGROUND,
                    "min_area": MIN_AREA,
                },
                indent=2,
            )
            + "\n"
        )
        return path

    # --- reading images -------------------------------------------------------------------------------
    @torch.no_grad()
    def _classify(self, crops: list[torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        if not crops:
            return [], torch.zeros(0, self.net.head.in_features)
        logits, feats = self.net(torch.stack(crops).to(self.device))
        return [SHAPES[i] for i in logits.argmax(1).tolist()], feats.float().cpu()

    def detect(self, images: torch.Tensor, value_range=(0.0, 1.0)) -> list[list[Detection]]:
        """(B, 3, H, W) images -> per image, its objects (largest first)."""
        rgbs = to_uint8(images, value_range)
        per_image, crops = [], []
        for rgb in rgbs:
            masks = segment(rgb)
            per_image.append((rgb, masks))
            crops += [crop(m) for m in masks]
        shapes, _ = self._classify(crops)
        out, k = [], 0
        for rgb, masks in per_image:
            res = rgb.shape[0]
            dets = []
            for m in masks:
                ys, xs = np.nonzero(m)
                center, area, shape = (float(xs.mean()), float(ys.mean())), int(m.sum()), shapes[k]
                size = "large" if area > size_thresholds(res)[shape] else "small"
                dets.append(
                    Detection(shape, object_color(rgb, m), size, nearest_position(center, res), center, area)
                )
                k += 1
            out.append(dets)
        return out

    def features(self, images: torch.Tensor, value_range=(0.0, 1.0)) -> torch.Tensor:
        """(N_objects, 64): the CNN's pooled features of every object crop of every image (for the FID)."""
        crops = [crop(m) for rgb in to_uint8(images, value_range) for m in segment(rgb)]
        return self._classify(crops)[1]

    # --- grading --------------------------------------------------------------------------------------
    def grade(self, dets: list[Detection], prompt: str) -> dict:
        """One image's detections against one prompt: a dict of booleans (see ``score``)."""
        scene = parse(prompt)
        if len(scene.objects) == 1:
            want = scene.objects[0]
            if not dets:
                return {
                    "objects": 1,
                    "count": False,
                    "color": False,
                    "shape": False,
                    "size": False,
                    "position": False,
                    "all": False,
                }
            d = dets[0]
            r = {
                "objects": 1,
                "count": len(dets) == 1,
                "color": d.color == want.color,
                "shape": d.shape == want.shape,
                "size": d.size == want.size,
                "position": d.position == want.position,
            }
            r["all"] = all(r[k] for k in ("count", "color", "shape", "size", "position"))
            return r
        r = {"objects": 2, "count": len(dets) == 2, "pair_objects": False, "relation": False, "all": False}
        if len(dets) == 2:
            for order in itertools.permutations(range(2)):
                match = all(
                    (dets[i].shape, dets[i].color, dets[i].size) == (o.shape, o.color, o.size)
                    for i, o in zip(order, scene.objects)
                )
                if match:  # two identical objects match both ways round: either may satisfy the relation
                    r["pair_objects"] = True
                    r["relation"] |= relation_holds(
                        scene.relation, dets[order[0]].center, dets[order[1]].center
                    )
                    r["all"] = r["relation"]
        return r

    def score(self, images: torch.Tensor, prompts: list[str], value_range=(0.0, 1.0)) -> dict:
        """Prompt adherence of ``images`` (B, 3, H, W) to ``prompts`` (B); returns {"single": {...}, "pair":
        {...}, "records": per-image dicts}. single: n, color, shape, size, position, count, all (fractions);
        pair: n, count, objects (both objects right), all (both objects and the relation right)."""
        if len(prompts) != len(images):
            raise ValueError(
                f"got {len(images)} images for {len(prompts)} prompts; expected one image per prompt"
            )
        records = [
            self.grade(d, p) | {"prompt": p, "detections": [asdict(x) for x in d]}
            for d, p in zip(self.detect(images, value_range), prompts)
        ]
        single = [r for r in records if r["objects"] == 1]
        pair = [r for r in records if r["objects"] == 2]

        def mean(rs, key):
            return float(np.mean([r[key] for r in rs])) if rs else float("nan")

        return {
            "single": {
                "n": len(single),
                **{k: mean(single, k) for k in ("color", "shape", "size", "position", "count", "all")},
            },
            "pair": {
                "n": len(pair),
                "count": mean(pair, "count"),
                "objects": mean(pair, "pair_objects"),
                "all": mean(pair, "all"),
            },
            "records": records,
        }


# ----------------------------------------------------------------------------------------------------------
# Training the shape CNN on ground-truth crops of real renders
def _degrade(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur and noise a render (3, H, W) in [-1, 1] a little: generated images have softer, noisier edges."""
    sigma = float(rng.uniform(0.0, 1.0))
    x = image.numpy()
    if sigma > 0.2:
        x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma))
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.06), x.shape).astype(np.float32)
    return torch.from_numpy(x.astype(np.float32)).clamp(-1, 1)


def judge_dataset(
    n_images: int, split: str = "train", seed: int = 0, degrade: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops (N, 1, CROP, CROP) and shape labels (N,) from ``n_images`` Shapes renders, segmented as
    ``detect`` segments; each component is labelled with the ground-truth object it overlaps most."""
    ds = Shapes(64, split, n_images, seed)
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for i in range(n_images):
        item = ds[i]
        image = _degrade(item["image"], rng) if degrade else item["image"]
        rgb = to_uint8(image, (-1.0, 1.0))[0]
        for m in segment(rgb):
            overlaps = [(m & gt.numpy()).sum() for gt in item["masks"]]
            k = int(np.argmax(overlaps))
            if overlaps[k] == 0:
                continue
            crops.append(crop(m, rng if degrade else None))
            labels.append(SHAPES.index(item["objects"][k]["shape"]))
    return torch.stack(crops), torch.tensor(labels)


def train_judge(
    n_images: int = 3000,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device=None,
    verbose: bool = True,
) -> Judge:
    """Train ``ShapeNet`` on crops of ``n_images`` training renders
    (blurred and noised); returns the Judge."""
    torch.manual_seed(seed)
    x, y = judge_dataset(n_images, "train", seed)
    net = ShapeNet().to(device or "cpu")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5  # every shape is left-right symmetric
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        logits, _ = net(xb.to(net.head.weight.device))
        loss = F.cross_entropy(logits, yb.to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            acc = (logits.argmax(1).cpu() == yb).float().mean().item()
            print(f"judge step {step:4d}  loss {loss.item():.4f}  batch accuracy {acc:.3f}", flush=True)
    return Judge(net.eval(), device)


def real_renders(prompts: list[str], resolution: int = 64, seed: int = 0) -> torch.Tensor:
    """Renders of the prompts' scenes with a random layout within the rules: (B, 3, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = []
    for p in prompts:
        scene = parse(p)
        scene = layout(
            Scene(
                tuple(o.__class__(o.shape, o.color, o.size, o.position) for o in scene.objects),
                scene.relation,
            ),
            rng,
        )
        images.append(render(scene, resolution)[0])
    return (torch.stack(images) + 1) / 2
