"""The course's datasets, offline by default: Shapes (captioned scenes), Photos, Digits, torchvision sets.

* ``Shapes`` (in ``common.shapes``, re-exported here): procedural captioned images with ground-truth
  attributes and masks, the course's text-to-image data.
* ``Photos``: random crops (random horizontal flips) of the photographs bundled inside scikit-image
  (no download), with one photograph, ``chelsea`` the cat, held out for ``split="test"``.
* ``Digits``: torchvision MNIST when it is on disk (or when ``source="mnist"`` is asked for, downloaded);
  otherwise digits rendered from the fonts that ship with matplotlib, with a random affine map and an
  elastic distortion (Simard et al. 2003, "Best practices for CNNs applied to visual document analysis":
  a uniform random displacement field smoothed by a Gaussian of width sigma, scaled by alpha).
  Which source is used is printed and kept in ``ds.source``.
* ``torchvision_dataset(name, root)``: MNIST, FashionMNIST or CIFAR-10 for learners with a network;
  a clear error (naming the dataset, the folder and the offline alternatives) when the download fails.
* ``cached`` and ``LatentDataset``: a dataset encoded once by a frozen VAE (posterior mean and std per item,
  with its condition: class labels or token ids), kept in a file and trained on (chapters 03, 04, 06).

Every image is a float32 tensor (C, H, W) in [-1, 1]. Every random choice of item ``i`` comes from
``numpy.random.default_rng([seed, i, ...])``, so items do not depend on the order they are read in, or on
the number of DataLoader workers. ``import common.data`` stays light: torchvision, scipy and matplotlib
are imported only when a dataset needs them.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.cli import atomic_write
from common.shapes import (  # noqa: F401  (re-exported: common.data is where learners look for datasets)
    BACKGROUND,
    COLORS,
    HELD_OUT,
    MAX_OBJECTS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    ShapeObject,
    Shapes,
    caption,
    collate,
    layout,
    parse,
    render,
    vocabulary,
)

DATA_ROOT = Path(os.environ.get("COURSE_DATA", Path.home() / ".cache" / "latent-diffusion-course"))


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")


def _to_unit(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: PIL's arrays are read-only
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# Photos
PHOTOS = {  # name -> (package, file inside its data folder): all bundled with the wheels, never downloaded
    "astronaut": ("skimage", "astronaut.png"),
    "coffee": ("skimage", "coffee.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "motorcycle": ("skimage", "motorcycle_left.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "ihc": ("skimage", "ihc.png"),  # immunohistochemistry stain: colour texture
    "retina": ("skimage", "retina.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),  # a portrait
    # grey photographs, used as grey RGB: textures (grass and gravel are fur-like) and scenes
    "camera": ("skimage", "camera.png"),
    "brick": ("skimage", "brick.png"),
    "grass": ("skimage", "grass.png"),
    "gravel": ("skimage", "gravel.png"),
    "moon": ("skimage", "moon.png"),
    "coins": ("skimage", "coins.png"),
    "chelsea": ("skimage", "chelsea.png"),  # the held-out test photo: a cat
}
TEST_PHOTO = "chelsea"
_PHOTO_CACHE: dict[str, Image.Image] = {}


def _photo_path(name: str):
    package, file = PHOTOS[name]
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / file
    return importlib.resources.files(package) / "data" / file


def load_photo(name: str) -> Image.Image:
    """One of PHOTOS as an RGB PIL image (grey ones as grey RGB), read from its package's
    folder (never downloaded)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; expected one of {', '.join(PHOTOS)}")
    if name not in _PHOTO_CACHE:
        path = _photo_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"photo {name!r} is not at {path}: the {PHOTOS[name][0]} wheel installed here does "
                f"not bundle it (pip install -r requirements.txt installs one that does)"
            )
        with Image.open(str(path)) as f:
            _PHOTO_CACHE[name] = f.convert("RGB")
    return _PHOTO_CACHE[name]


class Photos(torch.utils.data.Dataset):
    """Random square crops of scikit-image's bundled photographs, resized to ``resolution``.

    ``ds[i]`` -> {"image": float32 (3, H, W) in [-1, 1], "photo": its name, "index": i}. A crop covers
    between ``min_scale`` and all of the photo's short side (never fewer pixels than ``resolution``, where
    the photo allows), at a random place, flipped left-right half of the time. ``split="train"`` uses
    every photo but ``TEST_PHOTO``; ``split="test"`` only that one.
    """

    def __init__(
        self,
        resolution: int = 64,
        split: str = "train",
        length: int = 10_000,
        seed: int = 0,
        min_scale: float = 0.25,
    ):
        if not 8 <= resolution <= 512:
            raise ValueError(f"resolution must be between 8 and 512 pixels, got {resolution}")
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        _check_split(split)
        self.resolution, self.split, self.length, self.seed, self.min_scale = (
            resolution,
            split,
            length,
            seed,
            min_scale,
        )
        self.photos = [TEST_PHOTO] if split == "test" else [p for p in PHOTOS if p != TEST_PHOTO]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for Photos of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index, 7 + (self.split == "test")])
        name = self.photos[int(rng.integers(len(self.photos)))]
        photo = load_photo(name)
        W, H = photo.size
        short = min(W, H)
        lo = min(short, max(self.resolution, self.min_scale * short))
        side = float(rng.uniform(lo, short))
        x0, y0 = float(rng.uniform(0, W - side)), float(rng.uniform(0, H - side))
        crop = photo.resize(
            (self.resolution,) * 2, Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0
        )  # box-shrink first, then bicubic: 2x faster, same look
        array = np.asarray(crop)
        if rng.random() < 0.5:
            array = array[:, ::-1]
        return {"image": _to_unit(array).clamp_(-1, 1), "photo": name, "index": index}


# ----------------------------------------------------------------------------------------------------------
# Digits
DIGIT_FONTS = {  # matplotlib's bundled fonts (mpl-data/fonts/ttf); test fonts are never seen in training
    "train": (
        "DejaVuSans.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSans-Oblique.ttf",
        "DejaVuSans-BoldOblique.ttf",
        "DejaVuSerif.ttf",
        "DejaVuSerif-Bold.ttf",
        "DejaVuSansMono.ttf",
        "DejaVuSansMono-Bold.ttf",
        "STIXGeneral.ttf",
        "STIXGeneralBol.ttf",
        "cmr10.ttf",
        "cmss10.ttf",
    ),
    "test": ("DejaVuSerif-Italic.ttf", "STIXGeneralItalic.ttf", "DejaVuSansMono-Oblique.ttf", "cmtt10.ttf"),
}
DIGIT_SOURCES = ("auto", "mnist", "rendered")


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _mnist_on_disk(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / f).is_file() for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))


class Digits(torch.utils.data.Dataset):
    """Handwritten-like digits: ``ds[i]`` -> (image float32 (1, H, W) in [-1, 1], white on black; label int).

    ``source``: "mnist" uses torchvision MNIST under ``root`` (downloading it if missing; an error if that
    fails); "rendered" draws digits from matplotlib's fonts; "auto" uses MNIST if it is on disk under
    ``root`` and renders otherwise. ``root`` defaults to ``DATA_ROOT`` ($COURSE_DATA, else
    ~/.cache/latent-diffusion-course). ``length`` defaults to the MNIST split's size (60,000 / 10,000); with
    MNIST it takes the first ``length`` images.

    Rendered digits: a font of the split (``DIGIT_FONTS``: test fonts are held out), the glyph scaled into a
    box of 20/28 of the side and centred by its centre of mass like MNIST, then a random affine map
    (rotation +-15 deg, scale 0.85-1.05, shear +-0.3, shift +-2/28 of the side) and an elastic distortion.
    """

    def __init__(
        self,
        resolution: int = 32,
        split: str = "train",
        length: int | None = None,
        seed: int = 0,
        source: str = "auto",
        root: str | Path | None = None,
    ):
        if not 16 <= resolution <= 256:
            raise ValueError(f"resolution must be between 16 and 256 pixels, got {resolution}")
        _check_split(split)
        if source not in DIGIT_SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {', '.join(DIGIT_SOURCES)}")
        self.resolution, self.split, self.seed = resolution, split, seed
        self.root = Path(root) if root is not None else DATA_ROOT
        if source == "auto":
            source = "mnist" if _mnist_on_disk(self.root) else "rendered"
            if source == "mnist":
                print(f"Digits: MNIST found under {self.root}; using it")
            else:
                print(
                    f"Digits: MNIST not on disk under {self.root}; using digits rendered from fonts "
                    "(`python -m common.weights fetch mnist` gets MNIST)"
                )
        else:
            print(
                f"Digits: using {'MNIST from ' + str(self.root) if source == 'mnist' else 'rendered digits'}"
            )
        self.source = source
        self.mnist = None
        full = 60_000 if split == "train" else 10_000
        if source == "mnist":
            self.mnist = torchvision_dataset("mnist", self.root, train=split == "train", download=True)
            full = len(self.mnist)
        self.length = full if length is None else length
        if self.mnist is not None and self.length > full:
            raise ValueError(f"length {self.length} is more than the {full} MNIST {split} images")
        self._glyphs: dict[str, np.ndarray] | None = None  # font -> (10, H, W) float glyphs, built lazily

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for Digits of length {self.length}")
        index %= self.length
        if self.mnist is not None:
            image, label = self.mnist.data[index], int(self.mnist.targets[index])
            image = image.float()[None] / 127.5 - 1.0  # (1, 28, 28)
            if self.resolution != 28:
                image = F.interpolate(
                    image[None],
                    size=(self.resolution,) * 2,
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[0]
            return image, label
        rng = np.random.default_rng([self.seed, index, 11 + (self.split == "test")])
        label = int(rng.integers(10))
        fonts = DIGIT_FONTS[self.split]
        glyph = self.glyphs()[fonts[int(rng.integers(len(fonts)))]][label]
        image = distort(glyph, rng)
        return torch.from_numpy(image)[None] * 2.0 - 1.0, label

    def glyphs(self) -> dict[str, np.ndarray]:
        """font file -> (10, H, W) float32 glyphs in [0, 1], drawn once per dataset."""
        if self._glyphs is None:
            self._glyphs = {
                f: np.stack([render_digit(d, f, self.resolution) for d in range(10)])
                for f in DIGIT_FONTS[self.split]
            }
        return self._glyphs


def render_digit(digit: int, font: str, resolution: int) -> np.ndarray:
    """One digit in ``font`` (a file of ``font_dir()``), float32 (H, W) in [0, 1], MNIST-style framing."""
    from PIL import ImageDraw, ImageFont

    big = 4 * resolution  # draw large, then shrink: anti-aliased strokes
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(canvas).text(
        (big, big), str(digit), fill=255, anchor="mm", font=ImageFont.truetype(str(font_dir() / font), big)
    )
    canvas = canvas.crop(canvas.getbbox())
    box = 20 / 28 * resolution  # MNIST: the digit fits a 20 x 20 box of the 28 x 28 image
    scale = box / max(canvas.size)
    w, h = max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale))
    glyph = np.asarray(canvas.resize((w, h), Image.LANCZOS), np.float32) / 255.0
    ys, xs = np.mgrid[0:h, 0:w]
    mass = glyph.sum()
    cy, cx = (ys * glyph).sum() / mass, (xs * glyph).sum() / mass  # centre of mass, as MNIST does
    out = np.zeros((resolution, resolution), np.float32)
    top, left = int(round(resolution / 2 - cy)), int(round(resolution / 2 - cx))
    top, left = min(max(top, 0), resolution - h), min(max(left, 0), resolution - w)
    out[top : top + h, left : left + w] = glyph
    return out.clip(0, 1)


def distort(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random affine map plus an elastic distortion of a (H, W) image; float32 in [0, 1]."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    H, W = glyph.shape
    unit = H / 28  # distortions are specified for 28 px MNIST and scaled to this resolution
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale, shear = rng.uniform(0.85, 1.05), rng.uniform(-0.3, 0.3)
    shift = rng.uniform(-2, 2, size=2) * unit
    forward = (
        np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        @ np.array([[1.0, shear], [0.0, 1.0]])
        * scale
    )  # acts on (x, y)
    inverse = np.linalg.inv(forward)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    c = np.array([(W - 1) / 2, (H - 1) / 2])
    px, py = xs - c[0] - shift[0], ys - c[1] - shift[1]
    src_x = inverse[0, 0] * px + inverse[0, 1] * py + c[0]
    src_y = inverse[1, 0] * px + inverse[1, 1] * py + c[1]
    sigma, alpha = 4.0 * unit, rng.uniform(0, 36) * unit  # Simard et al.: sigma = 4, alpha = 34 at 28 px
    dx = gaussian_filter(rng.uniform(-1, 1, (H, W)), sigma, mode="constant") * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, (H, W)), sigma, mode="constant") * alpha
    out = map_coordinates(glyph, [src_y + dy, src_x + dx], order=1, mode="constant", cval=0.0)
    return out.astype(np.float32).clip(0, 1)


# ----------------------------------------------------------------------------------------------------------
# torchvision datasets (need a network the first time)
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10"}


class DatasetUnavailable(RuntimeError):
    """A dataset that must be downloaded could not be."""


class ToCourseTensor:
    """PIL image -> float32 (C, H, W) in [-1, 1], resized to ``resolution`` (a class:
    DataLoader workers pickle it)."""

    def __init__(self, resolution: int | None = None):
        self.resolution = resolution

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = _to_unit(np.asarray(image))
        if self.resolution is not None and x.shape[-1] != self.resolution:
            x = F.interpolate(
                x[None], size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False
            )[0]
        return x


def torchvision_dataset(
    name: str,
    root: str | Path | None = None,
    train: bool = True,
    resolution: int | None = None,
    download: bool = True,
):
    """MNIST, FashionMNIST or CIFAR-10 from torchvision: items (image (C, H, W) in [-1, 1], label int).

    ``name``: "mnist", "fashionmnist" or "cifar10" (case, "-" and "_" ignored). Downloads into ``root``
    (default ``DATA_ROOT``) when missing; raises ``DatasetUnavailable`` naming the dataset, the folder and
    the offline alternatives when it cannot.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(TORCHVISION_DATASETS)}")
    import torchvision

    root = Path(root) if root is not None else DATA_ROOT
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[key])
    try:
        return cls(str(root), train=train, download=download, transform=ToCourseTensor(resolution))
    except Exception as err:  # URLError, OSError, RuntimeError("Dataset not found"), a bad checksum, ...
        raise DatasetUnavailable(
            f"{TORCHVISION_DATASETS[key]} is not in {root} and could not be downloaded there "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}). "
            "Without a network, use the course's offline datasets: common.data.Digits(source='rendered') "
            "for digits, Photos for natural images, Shapes for captioned images."
        ) from err


# ----------------------------------------------------------------------------------------------------------
# Latents, encoded once
def cached(path: str | Path, build) -> tuple[dict, bool]:
    """(the dict of tensors in ``path``, True), or (``build()``, False) after writing it there atomically (a
    killed run, or processes racing under ``accelerate``, never leave half a file). An unreadable file is
    rebuilt.
    """
    path = Path(path)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True), True
        except Exception as e:  # a truncated file: rebuild it
            print(f"cache {path} unreadable ({e}); rebuilding")
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    return data, False


class LatentDataset(torch.utils.data.Dataset):
    """Cached latents with their condition: item i is {"z0_mean", "z0_std" (C, h, w), ``condition``: its class
    label () or token ids (N_k,)}; z_0 is drawn from N(mean, std^2) at each step by the training loss."""

    def __init__(self, cache: dict, condition: str = "input_ids"):
        self.mean, self.std, self.condition = cache["mean"], cache["std"], cache[condition]
        self.key = condition
        if not len(self.mean) == len(self.std) == len(self.condition):
            raise ValueError(f"the cache's mean, std and {condition} must have one row per item")

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict:
        return {"z0_mean": self.mean[i], "z0_std": self.std[i], self.key: self.condition[i]}

    def get_batch(self, indices: list[int]) -> dict:
        """The collated batch of ``indices`` in one gather per tensor (what ``Trainer`` uses: stacking 256
        items one by one costs more than a GPU step of the course model)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"z0_mean": self.mean[idx], "z0_std": self.std[idx], self.key: self.condition[idx]}
