"""Shapes: procedural captioned images, the course's text-to-image data (it stands in for LAION on a CPU).

A scene holds one or two objects on a plain light-grey background (``BACKGROUND``). Each object has a
shape (``SHAPES``), a colour (``COLORS``, named RGB values far apart) and a size (``SIZES``). A
one-object scene places its object in one cell of a 3 x 3 grid (``POSITIONS``); a two-object scene
states a relation between them (``RELATIONS``), ``objects[0] <relation> objects[1]``, which is true of
the two masks' centroids by construction, with a clear margin: the objects never overlap, and the gap
along the relation's axis is always larger than the offset across it.

Captions come from a small grammar with paraphrases::

    a small red circle at the top left          a red circle, small, in the top left corner
    at the top left, a small red circle         a small circle in red at the top left
    a large blue square to the left of a small green triangle
    a small green triangle right of a large blue square

``Scene.caption(paraphrase)`` renders any paraphrase, ``parse(caption)`` reads a caption back into a
``Scene`` (the ground truth of a prompt, for prompt-adherence metrics), ``render(scene, resolution)``
draws a scene, and ``vocabulary()`` lists every word the grammar can produce (for the tokenizer).

Held-out combinations: the (colour, shape) pairs in ``HELD_OUT`` never appear in ``split="train"``;
every ``split="test"`` item holds at least one of them, so a test score measures compositional
generalisation (one pair per colour and per shape: every colour and every shape is still seen in training).

Rendering draws each object's coverage on a 4x (2x above 64 px) supersampled canvas with PIL and
box-filters it down (anti-aliased edges); a pixel belongs to an object's mask when its coverage is >= 0.5.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------
# The vocabulary of scenes
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = {  # sRGB 0..255, chosen far apart (the closest pair, orange/yellow, is ~95 apart in RGB)
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 20),
    "purple": (150, 40, 180),
    "orange": (250, 125, 0),
}
SIZES = {"small": 0.12, "large": 0.20}  # the object's scale as a fraction of the image side (areas ~1 : 2.8)
POSITIONS = {  # name -> (x, y) of the cell's centre, as fractions of the image side (y grows downwards)
    "top left": (0.27, 0.27),
    "top": (0.5, 0.27),
    "top right": (0.73, 0.27),
    "left": (0.27, 0.5),
    "center": (0.5, 0.5),
    "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom": (0.5, 0.73),
    "bottom right": (0.73, 0.73),
}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELD_OUT = frozenset(
    {
        ("red", "star"),
        ("green", "triangle"),
        ("blue", "cross"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("orange", "diamond"),
    }
)
BACKGROUND = (235, 235, 235)  # plain light grey: every colour in COLORS stands out against it
SPLITS = ("train", "test", "all")
MAX_OBJECTS = 2

_MARGIN = 0.03  # objects stay this far (fraction of the side) from the image border
_GAP = 0.06  # minimum gap between the two objects' bounding boxes along the relation's axis
_JITTER = 0.03  # random shift of a one-object scene around its grid cell
_CROSS_JITTER = 0.08  # random offset across the relation's axis in two-object scenes


def _star(n: int, outer: float, inner: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n  # first point straight up
    radii = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
    return [(float(r * np.cos(a)), float(r * np.sin(a))) for r, a in zip(radii, angles)]


# Each shape in unit coordinates, its area centroid at the origin (so the object's centre is its mask's
# centroid), y pointing down. A circle is (radius,); the others are polygons.
_S3 = float(np.sqrt(3) / 2)
OUTLINES: dict[str, tuple] = {
    "circle": (0.85,),
    "square": ((-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)),
    "triangle": ((0.0, -1.1), (1.1 * _S3, 0.55), (-1.1 * _S3, 0.55)),  # equilateral, pointing up
    "diamond": ((0.0, -1.05), (0.75, 0.0), (0.0, 1.05), (-0.75, 0.0)),
    "star": tuple(_star(5, 1.1, 0.45)),
    "cross": (
        (-0.3, -0.9),
        (0.3, -0.9),
        (0.3, -0.3),
        (0.9, -0.3),
        (0.9, 0.3),
        (0.3, 0.3),
        (0.3, 0.9),
        (-0.3, 0.9),
        (-0.3, 0.3),
        (-0.9, 0.3),
        (-0.9, -0.3),
        (-0.3, -0.3),
    ),
}


def extent(shape: str) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) of a shape's outline in unit coordinates around its centroid."""
    outline = OUTLINES[shape]
    if len(outline) == 1:
        r = outline[0]
        return (-r, r, -r, r)
    xs, ys = zip(*outline)
    return (min(xs), max(xs), min(ys), max(ys))


# ----------------------------------------------------------------------------------------------------------
# Scenes
@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. ``center`` is (x, y) in fractions of the image side;
    None: the canonical spot."""

    shape: str
    color: str
    size: str
    position: str | None = None  # the grid cell, one-object scenes only
    center: tuple[float, float] | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, tuple(COLORS)),
            ("size", self.size, tuple(SIZES)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {', '.join(POSITIONS)}")
        if self.center is not None and not all(0.0 <= v <= 1.0 for v in self.center):
            raise ValueError(
                f"center must be (x, y) in fractions of the image side, in [0, 1]; got {self.center}"
            )


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, ``relation`` holds between them: ``objects[0] <relation> objects[1]``."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        n = len(self.objects)
        if n not in (1, 2):
            raise ValueError(f"a scene holds 1 or 2 objects, got {n}")
        if n == 1 and (self.relation is not None or self.objects[0].position is None):
            raise ValueError("a one-object scene needs a position (one of POSITIONS) and no relation")
        if n == 2 and self.relation not in RELATIONS:
            raise ValueError(
                f"a two-object scene needs a relation, one of {', '.join(RELATIONS)}; got {self.relation!r}"
            )

    def caption(self, paraphrase: int = 0) -> str:
        """The caption of this scene in paraphrase number ``paraphrase`` (any int;
        taken modulo their count)."""
        return caption(self, paraphrase)

    def key(self) -> tuple:
        """What a caption says, as a hashable value: equal keys mean the same prompt whatever the paraphrase.

        Positions within a cell are ignored, and a relation is normalised to "left of" / "above" (so
        "B right of A" has the key of "A left of B").
        """
        attrs = tuple((o.shape, o.color, o.size, o.position) for o in self.objects)
        if self.relation in ("right of", "below"):
            return (attrs[1], INVERSE[self.relation], attrs[0])
        return (attrs[0], self.relation, attrs[1]) if self.relation else (attrs[0],)

    def has_held_out(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT for o in self.objects)


def layout(scene: Scene, rng: np.random.Generator | None = None) -> Scene:
    """Fill in each object's centre: random within the rules if ``rng`` is given, else the canonical spot.

    A scene whose objects all have centres comes back unchanged. The rules: a one-object scene sits near its
    grid cell; two objects sit on either side of a gap of at least ``_GAP`` along the
    relation's axis, inside the image.
    """
    if all(o.center is not None for o in scene.objects):
        return scene

    def u(lo, hi, mid):
        return float(rng.uniform(lo, hi)) if rng is not None else mid

    if len(scene.objects) == 1:
        (o,) = scene.objects
        x_min, x_max, y_min, y_max = (v * SIZES[o.size] for v in extent(o.shape))
        cx, cy = POSITIONS[o.position]
        x = float(np.clip(cx + u(-_JITTER, _JITTER, 0.0), _MARGIN - x_min, 1 - _MARGIN - x_max))
        y = float(np.clip(cy + u(-_JITTER, _JITTER, 0.0), _MARGIN - y_min, 1 - _MARGIN - y_max))
        return replace(scene, objects=(replace(o, center=(x, y)),))

    first, second = scene.objects
    if scene.relation in ("right of", "below"):  # lay out as "second left of / above first"
        first, second = second, first
    axis = 0 if scene.relation in ("left of", "right of") else 1  # 0: along x, 1: along y
    e0 = [v * SIZES[first.size] for v in extent(first.shape)]
    e1 = [v * SIZES[second.size] for v in extent(second.shape)]
    lo0, hi0 = e0[2 * axis], e0[2 * axis + 1]
    lo1, hi1 = e1[2 * axis], e1[2 * axis + 1]
    span = (hi0 - lo0) + _GAP + (hi1 - lo1)
    slack = 1 - 2 * _MARGIN - span
    start = _MARGIN + u(0.0, slack, slack / 2)
    extra_gap = u(0.0, slack - (start - _MARGIN), 0.0)  # the rest of the slack may widen the gap
    along0 = start - lo0
    along1 = start + (hi0 - lo0) + _GAP + extra_gap - lo1
    across = []
    for e in (e0, e1):  # across the axis: near the middle, inside the image
        lo, hi = e[2 * (1 - axis)], e[2 * (1 - axis) + 1]
        across.append(
            float(np.clip(0.5 + u(-_CROSS_JITTER, _CROSS_JITTER, 0.0), _MARGIN - lo, 1 - _MARGIN - hi))
        )
    c0 = (along0, across[0]) if axis == 0 else (across[0], along0)
    c1 = (along1, across[1]) if axis == 0 else (across[1], along1)
    first, second = replace(first, center=c0), replace(second, center=c1)
    if scene.relation in ("right of", "below"):
        first, second = second, first
    return replace(scene, objects=(first, second))


_ALL_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_TRAIN_PAIRS = [p for p in _ALL_PAIRS if p not in HELD_OUT]
_HELD_PAIRS = sorted(HELD_OUT)


def sample_scene(rng: np.random.Generator, split: str = "all", n_objects: tuple[int, ...] = (1, 2)) -> Scene:
    """A random scene (with its layout) of ``split``: train never holds a HELD_OUT pair, test always does."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    n = int(n_objects[int(rng.integers(len(n_objects)))])
    pools = [_TRAIN_PAIRS if split == "train" else _ALL_PAIRS] * n
    if split == "test":  # one object (chosen at random) carries a held-out pair
        pools[int(rng.integers(n))] = _HELD_PAIRS
    objects = []
    for pool in pools:
        color, shape = pool[int(rng.integers(len(pool)))]
        size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
        position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))] if n == 1 else None
        objects.append(ShapeObject(shape, color, size, position))
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if n == 2 else None
    return layout(Scene(tuple(objects), relation), rng)


# ----------------------------------------------------------------------------------------------------------
# Rendering
def render(scene: Scene, resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a scene:
    ``(image (3, H, W) float32 in [-1, 1], masks (n_objects, H, W) bool)``, H = W = resolution.

    Objects without a centre are drawn at their canonical spot (``layout(scene)``).
    """
    image, masks = render_numpy(layout(scene), resolution)
    return torch.from_numpy(image), torch.from_numpy(masks)


def render_numpy(scene: Scene, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """``render`` in numpy, for a scene whose objects all have centres: (3, H, W) float32, (n, H, W) bool."""
    ss = 4 if resolution <= 64 else 2  # supersampling factor for anti-aliased edges
    rgb = np.empty((3, resolution, resolution), np.float32)
    rgb[:] = np.asarray(BACKGROUND, np.float32)[:, None, None]
    masks = np.zeros((len(scene.objects), resolution, resolution), bool)
    for k, o in enumerate(scene.objects):
        # draw on a small supersampled canvas around the object only: most of the image is background
        scale = SIZES[o.size] * resolution
        cx, cy = o.center[0] * resolution, o.center[1] * resolution
        x_min, x_max, y_min, y_max = extent(o.shape)
        x0, x1 = max(0, int(cx + x_min * scale) - 1), min(resolution, int(cx + x_max * scale) + 2)
        y0, y1 = max(0, int(cy + y_min * scale) - 1), min(resolution, int(cy + y_max * scale) + 2)
        canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        draw = ImageDraw.Draw(canvas)
        ox, oy, s = (cx - x0) * ss, (cy - y0) * ss, scale * ss  # the centre and scale on the canvas
        outline = OUTLINES[o.shape]
        if len(outline) == 1:
            r = outline[0] * s
            draw.ellipse((ox - r, oy - r, ox + r, oy + r), fill=255)
        else:
            draw.polygon([(ox + x * s, oy + y * s) for x, y in outline], fill=255)
        alpha = np.asarray(canvas.reduce(ss), np.float32) / 255.0  # box filter: coverage per pixel
        color = np.asarray(COLORS[o.color], np.float32)[:, None, None]
        patch = rgb[:, y0:y1, x0:x1]
        patch += alpha * (color - patch)  # "over" compositing, in place
        masks[k, y0:y1, x0:x1] = alpha >= 0.5
    return rgb / 127.5 - 1.0, masks


# ----------------------------------------------------------------------------------------------------------
# The caption grammar
WHERE = {  # position -> its phrases; a paraphrase picks one
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "at the left side", "in the middle left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right side", "in the middle right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "{a} {color} {shape}, {size}, {where}",
    "{where}, a {size} {color} {shape}",
    "a {size} {shape} in {color} {where}",
)
PAIR_TEMPLATES = (  # {A} and {B} are "size colour shape" of objects[0] and objects[1]
    "a {A} {rel} a {B}",
    "a {B} {inverse} a {A}",
)
N_PARAPHRASES = len(SINGLE_TEMPLATES) * 3  # 12 for one object, 6 for two (taken modulo)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, paraphrase: int = 0) -> str:
    """Scene -> caption; ``paraphrase`` picks the template and the phrase variant (modulo their count)."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        template = SINGLE_TEMPLATES[paraphrase % len(SINGLE_TEMPLATES)]
        where = WHERE[o.position][(paraphrase // len(SINGLE_TEMPLATES)) % len(WHERE[o.position])]
        return template.format(a=_article(o.color), size=o.size, color=o.color, shape=o.shape, where=where)
    a, b = (f"{o.size} {o.color} {o.shape}" for o in scene.objects)
    template = PAIR_TEMPLATES[paraphrase % len(PAIR_TEMPLATES)]
    variant = (paraphrase // len(PAIR_TEMPLATES)) % 3
    return template.format(
        A=a,
        B=b,
        rel=RELATION_PHRASES[scene.relation][variant],
        inverse=RELATION_PHRASES[INVERSE[scene.relation]][variant],
    )


_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def words(text: str) -> list[str]:
    """Split a caption into the grammar's tokens: lower-case words and punctuation marks (",")."""
    return _WORD.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word and punctuation mark a caption can hold, sorted (the tokenizer's word list)."""
    pieces = [
        *SHAPES,
        *COLORS,
        *SIZES,
        "a",
        "an",
        *itertools.chain(*WHERE.values()),
        *itertools.chain(*RELATION_PHRASES.values()),
        *SINGLE_TEMPLATES,
        *PAIR_TEMPLATES,
    ]
    return sorted({w for p in pieces for w in words(re.sub(r"\{\w+\}", " ", p))})


def _find_phrase(text: str, phrases: dict[str, tuple[str, ...]]) -> tuple[str, str] | None:
    """The longest phrase of ``phrases`` found in ``text`` (on word boundaries): (its key, the phrase)."""
    found = [(len(p), key, p) for key, ps in phrases.items() for p in ps if re.search(rf"\b{p}\b", text)]
    return max(found)[1:] if found else None


def _parse_object(chunk: str, where: str | None, text: str) -> ShapeObject:
    tokens = words(chunk)
    picked = {}
    for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", tuple(SIZES))):
        hits = [t for t in tokens if t in allowed]
        if len(hits) != 1:
            raise ValueError(
                f"cannot parse {text!r}: expected one {name} word (one of {', '.join(allowed)}) "
                f"per object, found {hits or 'none'} in {chunk.strip()!r}"
            )
        picked[name] = hits[0]
    return ShapeObject(picked["shape"], picked["color"], picked["size"], where)


def parse(text: str) -> Scene:
    """Caption -> Scene with the canonical layout (the ground truth of a prompt); ValueError if it cannot.

    Reads every caption the grammar writes, and free text in the same words ("a big ..." is not one).
    """
    lowered = " ".join(words(text))
    rel = _find_phrase(lowered, RELATION_PHRASES)
    if rel is not None:
        relation, phrase = rel
        left, right = re.split(rf"\b{phrase}\b", lowered, maxsplit=1)
        scene = Scene((_parse_object(left, None, text), _parse_object(right, None, text)), relation)
    else:
        where = _find_phrase(lowered, WHERE)
        if where is None:
            raise ValueError(
                f"cannot parse {text!r}: no position phrase (e.g. 'at the top left') and no "
                f"relation (one of {', '.join(RELATIONS)})"
            )
        position, phrase = where
        scene = Scene((_parse_object(lowered.replace(phrase, " "), position, text),))
    return layout(scene)


# ----------------------------------------------------------------------------------------------------------
# The dataset
class Shapes(torch.utils.data.Dataset):
    """Captioned shape scenes, generated on the fly: item ``i`` is a pure function of ``(seed, i, split)``.

    ``ds[i]`` is a dict:

    ========== ========================================================================================
    "image"    float32 tensor (3, H, W) in [-1, 1], H = W = ``resolution``
    "caption"  str, one paraphrase of the scene (chosen per item)
    "objects"  list of 1 or 2 dicts {"shape", "color", "size", "position" (grid cell; None with two
               objects), "center": (x, y) in pixels, the mask's centroid}
    "relation" str or None: ``objects[0] <relation> objects[1]`` in two-object scenes
    "masks"    bool tensor (n_objects, H, W), the pixels each object covers
    "index"    int, ``i``
    ========== ========================================================================================

    Batch them with ``Shapes.collate`` (masks padded to ``MAX_OBJECTS``).

    Args:
        resolution: side in pixels, 32 to 256 and a multiple of ``multiple_of``.
        split: "train" (no HELD_OUT colour-shape pair), "test" (each item holds one), or "all".
        length: the number of items (any; they are generated, not stored).
        seed: picks the whole sequence of scenes.
        n_objects: the object counts to draw from, each 1 or 2.
        multiple_of: the resolution must be divisible by it (8 suits a VAE that downsamples 8x).
    """

    def __init__(
        self,
        resolution: int = 64,
        split: str = "train",
        length: int = 10_000,
        seed: int = 0,
        n_objects: int | tuple[int, ...] = (1, 2),
        multiple_of: int = 8,
    ):
        if not 32 <= resolution <= 256:
            raise ValueError(f"resolution must be between 32 and 256 pixels, got {resolution}")
        if multiple_of < 1 or resolution % multiple_of:
            raise ValueError(f"resolution {resolution} must be a multiple of {multiple_of} (multiple_of)")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        n_objects = (n_objects,) if isinstance(n_objects, int) else tuple(n_objects)
        if not n_objects or any(n not in (1, 2) for n in n_objects):
            raise ValueError(f"n_objects must be 1, 2 or a tuple of them, got {n_objects!r}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.resolution, self.split, self.length, self.seed = resolution, split, length, seed
        self.n_objects = n_objects

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a Shapes dataset of length {self.length}")
        index = index % self.length
        return np.random.default_rng([self.seed, index, SPLITS.index(self.split)])

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (with its layout), without drawing it."""
        return sample_scene(self._rng(index), self.split, self.n_objects)

    def paraphrase(self, index: int) -> int:
        rng = self._rng(index)
        sample_scene(rng, self.split, self.n_objects)
        return int(rng.integers(N_PARAPHRASES))

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        scene = sample_scene(rng, self.split, self.n_objects)
        text = caption(scene, int(rng.integers(N_PARAPHRASES)))
        image, masks = render_numpy(scene, self.resolution)
        r = self.resolution
        objects = [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "position": o.position,
                "center": (o.center[0] * r, o.center[1] * r),
            }
            for o in scene.objects
        ]
        return {
            "image": torch.from_numpy(image),
            "caption": text,
            "objects": objects,
            "relation": scene.relation,
            "masks": torch.from_numpy(masks),
            "index": index % self.length,
        }

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Batch items: images (B, 3, H, W), masks padded to (B, MAX_OBJECTS, H, W), lists for the rest."""
        return collate(items)

    @staticmethod
    def scenes(split: str = "test", n: int = 64, seed: int = 1234, n_objects=(1, 2)) -> list[Scene]:
        """A fixed list of ``n`` scenes of ``split`` (the held-out prompts by default), for evaluation."""
        ds = Shapes(64, split, n, seed, n_objects)
        return [ds.scene(i) for i in range(n)]

    @staticmethod
    def prompts(split: str = "test", n: int = 64, seed: int = 1234, n_objects=(1, 2)) -> list[str]:
        """The captions (paraphrase 0) of ``Shapes.scenes(split, n, seed)``: fixed evaluation prompts."""
        return [s.caption(0) for s in Shapes.scenes(split, n, seed, n_objects)]

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word and punctuation mark a caption can hold, sorted."""
        return vocabulary()


def collate(items: list[dict]) -> dict:
    """Batch Shapes items (for a DataLoader's ``collate_fn``).

    Returns {"image" (B, 3, H, W), "masks" (B, MAX_OBJECTS, H, W) bool, zero-padded, "n_objects" (B,) long,
    "index" (B,) long, "caption" list[str], "objects" list[list[dict]], "relation" list[str | None]}.
    """
    B = len(items)
    H, W = items[0]["image"].shape[-2:]
    masks = torch.zeros(B, MAX_OBJECTS, H, W, dtype=torch.bool)
    for b, item in enumerate(items):
        masks[b, : len(item["masks"])] = item["masks"]
    return {
        "image": torch.stack([item["image"] for item in items]),
        "masks": masks,
        "n_objects": torch.tensor([len(item["objects"]) for item in items]),
        "index": torch.tensor([item["index"] for item in items]),
        "caption": [item["caption"] for item in items],
        "objects": [item["objects"] for item in items],
        "relation": [item["relation"] for item in items],
    }
