"""Tests for common.shapes / common.data: the attributes are in the pixels, items are deterministic, splits
hold out what they claim, and nothing touches the network."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from itertools import combinations
from urllib.error import URLError

import numpy as np
import pytest
import torch

from common import data, shapes
from common.data import Digits, Photos, Scene, ShapeObject, Shapes, parse, render


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly: the datasets must work offline."""

    connect = socket.socket.connect

    def refuse(sock, address, *args):
        if sock.family in (
            socket.AF_INET,
            socket.AF_INET6,
        ):  # local (Unix) sockets stay: DataLoader workers use them
            raise OSError("network access is disabled in the tests")
        return connect(sock, address, *args)

    monkeypatch.setattr(socket.socket, "connect", refuse)


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def shoelace(points) -> float:
    x, y = np.asarray(points, float).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# ---------------------------------------------------------------------------------------------------------
# Shapes: bad input
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(resolution=24),
        dict(resolution=264),
        dict(resolution=60),
        dict(resolution=40, multiple_of=16),
        dict(n_objects=0),
        dict(n_objects=3),
        dict(n_objects=(1, 3)),
        dict(split="val"),
        dict(length=-1),
    ],
)
def test_shapes_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        Shapes(**kwargs)


def test_scene_rejects_bad_attributes():
    with pytest.raises(ValueError, match="unknown color 'pink'.*red"):
        ShapeObject("circle", "pink", "small", "center")
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("hexagram", "red", "small", "center")
    with pytest.raises(ValueError, match="1 or 2 objects"):
        Scene(())
    obj = ShapeObject("circle", "red", "small")
    with pytest.raises(ValueError, match="1 or 2 objects"):
        Scene((obj, obj, obj), "left of")
    with pytest.raises(ValueError, match="relation"):
        Scene((obj, obj), "near")


# ---------------------------------------------------------------------------------------------------------
# Shapes: the item format
def test_item_format_and_collate():
    ds = Shapes(resolution=64, length=40, seed=3)
    counts = set()
    for i in range(len(ds)):
        item = ds[i]
        image, masks, objects = item["image"], item["masks"], item["objects"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert masks.dtype == torch.bool and masks.shape == (len(objects), 64, 64)
        assert isinstance(item["caption"], str) and item["index"] == i
        assert (item["relation"] is None) == (len(objects) == 1)
        for o in objects:
            assert set(o) == {"shape", "color", "size", "position", "center"}
            assert (o["position"] is None) == (len(objects) == 2)
        counts.add(len(objects))
    assert counts == {1, 2}
    with pytest.raises(IndexError):
        ds[len(ds)]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=Shapes.collate)))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert batch["masks"].shape == (8, shapes.MAX_OBJECTS, 64, 64)
    assert batch["n_objects"].tolist() == [len(o) for o in batch["objects"]]
    for b in range(8):  # padding masks are empty
        assert not batch["masks"][b, batch["n_objects"][b] :].any()


def test_deterministic_per_seed_and_index_whatever_the_order_or_workers():
    ds = Shapes(resolution=32, length=16, seed=5)
    forward = [ds[i] for i in range(16)]
    backward = [ds[i] for i in reversed(range(16))][::-1]
    again = Shapes(resolution=32, length=16, seed=5)
    for a, b in zip(forward, backward):
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert torch.equal(forward[7]["image"], again[7]["image"])
    other = Shapes(resolution=32, length=16, seed=6)
    assert any(not torch.equal(forward[i]["image"], other[i]["image"]) for i in range(16))
    # a DataLoader with 2 workers yields the same batch as reading in the main process
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=Shapes.collate)
    batch = next(iter(loader))
    assert torch.equal(batch["image"], torch.stack([x["image"] for x in forward]))


# ---------------------------------------------------------------------------------------------------------
# Shapes: the attributes are in the pixels
def test_colour_relation_position_and_centre_are_in_the_pixels():
    from scipy.ndimage import binary_erosion

    res = 64
    ds = Shapes(resolution=res, split="all", length=300, seed=1)
    named = {c: np.asarray(v, float) for c, v in shapes.COLORS.items()}
    background = np.asarray(shapes.BACKGROUND, float)
    n_pairs = 0
    for i in range(len(ds)):
        item = ds[i]
        rgb = (item["image"].numpy() + 1) * 127.5  # (3, H, W) in 0..255
        all_masks = item["masks"].numpy()
        centroids = []
        for o, mask in zip(item["objects"], all_masks):
            assert mask.sum() > 20
            mean = rgb[:, mask].mean(1)
            assert np.abs(mean - named[o["color"]]).max() < 40, (
                item["caption"],
                mean,
            )  # edges mix with the background
            assert min(named, key=lambda c: np.linalg.norm(mean - named[c])) == o["color"]
            inner = binary_erosion(mask, iterations=2)
            if inner.any():  # away from the anti-aliased edges the colour is exact
                assert np.abs(rgb[:, inner].mean(1) - named[o["color"]]).max() < 0.5
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean(), ys.mean()
            assert abs(cx - o["center"][0]) < 1.0 and abs(cy - o["center"][1]) < 1.0, (
                item["caption"],
                (cx, cy),
                o,
            )
            centroids.append((cx, cy))
        outside = rgb[:, ~all_masks.any(0)]  # plain background, but for anti-aliased edges
        assert np.allclose(np.median(outside, 1), background, atol=0.01)
        assert (np.abs(outside - background[:, None]).max(0) > 0.5).mean() < 0.1
        if item["relation"] is None:
            (cx, cy), position = centroids[0], item["objects"][0]["position"]
            col = "left" if cx < res / 3 else "right" if cx > 2 * res / 3 else "center"
            row = "top" if cy < res / 3 else "bottom" if cy > 2 * res / 3 else "middle"
            expected = {
                ("middle", "center"): "center",
                ("middle", "left"): "left",
                ("middle", "right"): "right",
                ("top", "center"): "top",
                ("bottom", "center"): "bottom",
            }.get((row, col), f"{row} {col}")
            assert position == expected, (item["caption"], centroids)
        else:
            n_pairs += 1
            assert not (all_masks[0] & all_masks[1]).any()  # never overlap
            (x0, y0), (x1, y1) = centroids
            along = {"left of": x1 - x0, "right of": x0 - x1, "above": y1 - y0, "below": y0 - y1}[
                item["relation"]
            ]
            across = abs(y1 - y0) if item["relation"] in ("left of", "right of") else abs(x1 - x0)
            assert along > 0.15 * res and along > across + 0.05 * res, (item["caption"], centroids)
    assert n_pairs > 100


def test_sizes_differ_clearly_in_area():
    for shape in shapes.SHAPES:
        areas = {}
        for size in shapes.SIZES:
            _, masks = render(Scene((ShapeObject(shape, "red", size, "center"),)), 64)
            areas[size] = int(masks.sum())
        assert areas["large"] > 2.3 * areas["small"], (shape, areas)
    # and across shapes: every large object is bigger than every small one
    small = [
        int(render(Scene((ShapeObject(s, "red", "small", "center"),)), 64)[1].sum()) for s in shapes.SHAPES
    ]
    large = [
        int(render(Scene((ShapeObject(s, "red", "large", "center"),)), 64)[1].sum()) for s in shapes.SHAPES
    ]
    assert min(large) > 1.5 * max(small)


def test_shapes_fill_their_expected_fraction_and_are_distinct():
    res = 128
    masks, fill = {}, {}
    for shape in shapes.SHAPES:
        _, mask = render(Scene((ShapeObject(shape, "blue", "large", "center"),)), res)
        mask = mask[0]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        bbox = (int(xs.max() - xs.min()) + 1) * (int(ys.max() - ys.min()) + 1)
        outline = shapes.OUTLINES[shape]
        if len(outline) == 1:
            expected = np.pi / 4
        else:  # polygon area over its bounding box, from the outline's vertices (shoelace formula)
            x, y = np.asarray(outline).T
            expected = shoelace(outline) / ((x.max() - x.min()) * (y.max() - y.min()))
        assert abs(int(mask.sum()) / bbox - expected) < 0.04, (shape, int(mask.sum()) / bbox, expected)
        masks[shape], fill[shape] = mask, int(mask.sum()) / bbox
    for a, b in combinations(shapes.SHAPES, 2):  # drawn at the same place and size, no two look alike:
        iou = float((masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum())  # they overlap little,
        assert iou < 0.7 or abs(fill[a] - fill[b]) > 0.15, (a, b, iou)  # or fill their boxes differently


# ---------------------------------------------------------------------------------------------------------
# Shapes: splits, captions, vocabulary
def test_held_out_combinations_never_in_train_and_always_in_test():
    train = Shapes(32, "train", length=3000, seed=0)
    test = Shapes(32, "test", length=500, seed=0)
    seen = set()
    for i in range(len(train)):
        scene = train.scene(i)
        assert not scene.has_held_out()
        seen |= {(o.color, o.shape) for o in scene.objects}
    assert seen == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES} - shapes.HELD_OUT
    assert all(test.scene(i).has_held_out() for i in range(len(test)))
    # every held-out pair, every colour and every shape shows up somewhere
    assert shapes.HELD_OUT <= {(o.color, o.shape) for i in range(len(test)) for o in test.scene(i).objects}
    assert {c for c, _ in seen} == set(shapes.COLORS) and {s for _, s in seen} == set(shapes.SHAPES)
    # the scene a dataset reports is the one it draws
    item = train[11]
    assert [o["shape"] for o in item["objects"]] == [o.shape for o in train.scene(11).objects]


def test_captions_parse_back_to_their_scene_and_use_the_vocabulary():
    vocab = set(Shapes.vocabulary())
    assert {"circle", "square", "triangle", "red", "blue", "small", "large", "left", "above"} <= vocab
    ds = Shapes(32, "all", length=300, seed=2)
    for i in range(len(ds)):
        scene = ds.scene(i)
        texts = {scene.caption(p) for p in range(shapes.N_PARAPHRASES)}
        assert len(texts) == (12 if len(scene.objects) == 1 else 6)
        for text in texts:
            assert set(shapes.words(text)) <= vocab, text
            assert parse(text).key() == scene.key(), text
        assert ds[i]["caption"] in texts


def test_caption_examples_and_swapped_relations():
    one = Scene((ShapeObject("circle", "red", "small", "top left"),))
    assert one.caption(0) == "a small red circle at the top left"
    assert one.caption(5) == "a red circle, small, in the top left corner"
    assert Scene((ShapeObject("cross", "orange", "large", "left"),)).caption(1).startswith("an orange cross")
    two = Scene(
        (ShapeObject("square", "blue", "large"), ShapeObject("triangle", "green", "small")), "left of"
    )
    assert two.caption(0) == "a large blue square to the left of a small green triangle"
    assert two.caption(3) == "a small green triangle right of a large blue square"
    swapped = parse(two.caption(3))
    assert swapped.relation == "right of" and swapped.objects[0].shape == "triangle"
    assert swapped.key() == two.key()
    for bad in ("a purple elephant", "a small red circle", "a small red circle left of a blue square"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse(bad)


def test_render_any_prompt_ground_truth():
    for text in (
        "a large yellow star below a small purple diamond",
        "an orange cross, small, at the bottom right",
    ):
        scene = parse(text)
        image, masks = render(scene, 96)
        assert image.shape == (3, 96, 96) and masks.shape[0] == len(scene.objects)
        if scene.relation == "below":
            assert centroid(masks[0])[1] > centroid(masks[1])[1] + 15
        else:
            cx, cy = centroid(masks[0])
            assert cx > 64 and cy > 64
    prompts = Shapes.prompts("test", n=16)
    assert prompts == Shapes.prompts("test", n=16) and len(set(prompts)) > 10
    assert all(parse(p).has_held_out() for p in prompts)


def test_shapes_speed(capsys):
    ds = Shapes(resolution=64, length=10_000, seed=0)
    ds[0]
    t0 = time.process_time()  # CPU time of this process: the machine may be shared
    n = 1000
    for i in range(n):
        ds[i]
    rate = n / (time.process_time() - t0)
    with capsys.disabled():
        print(f"\nShapes at 64 px: {rate:,.0f} images per CPU second (one core)")
    assert rate > 1000


# ---------------------------------------------------------------------------------------------------------
# Photos
def test_photos_offline_crops_and_held_out_photo():
    train = Photos(resolution=48, split="train", length=64, seed=0)
    test = Photos(resolution=48, split="test", length=8, seed=0)
    names = set()
    for i in range(len(train)):
        item = train[i]
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        assert -1 <= float(item["image"].min()) and float(item["image"].max()) <= 1
        names.add(item["photo"])
    assert data.TEST_PHOTO not in names and len(names) >= 4
    assert {test[i]["photo"] for i in range(len(test))} == {data.TEST_PHOTO}
    assert torch.equal(train[3]["image"], Photos(48, "train", 64, 0)[3]["image"])
    assert not torch.equal(train[3]["image"], Photos(48, "train", 64, 1)[3]["image"])
    assert float(train[0]["image"].std()) > 0.02  # a photo, not a flat colour
    with pytest.raises(ValueError, match="split"):
        Photos(split="val")


def test_every_photo_is_bundled_with_a_wheel_and_loads_as_rgb():
    for name in data.PHOTOS:  # never downloaded: a missing file here means the requirements changed
        photo = data.load_photo(name)
        assert photo.mode == "RGB" and min(photo.size) >= 256, name
    with pytest.raises(ValueError, match="unknown photo"):
        data.load_photo("lena")


# ---------------------------------------------------------------------------------------------------------
# Digits
def write_fake_mnist(root, n=12):
    """A tiny MNIST in the idx format torchvision reads (random strokes), under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * 255
    labels = (np.arange(n) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):  # the same images in both splits
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([2049, n], ">i4").tobytes() + labels.tobytes()
        )
    return images, labels


def test_rendered_digits_look_like_mnist(tmp_path, capsys):
    ds = Digits(resolution=32, split="train", length=200, seed=0, root=tmp_path)  # auto, nothing on disk
    assert ds.source == "rendered" and "rendered" in capsys.readouterr().out
    labels, border = [], []
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert -1 <= float(image.min()) and float(image.max()) <= 1
        assert float(image.max()) > 0.5 and float((image > 0).float().mean()) < 0.35  # white digit on black
        labels.append(label)
        border.append(torch.cat([image[0, :2].flatten(), image[0, -2:].flatten(), image[0, :, :2].flatten()]))
    assert float(torch.cat(border).gt(0).float().mean()) < 0.01  # an (almost always) empty border, like MNIST
    assert set(labels) == set(range(10))
    image, label = ds[17]
    again = Digits(32, "train", 200, 0, source="rendered")[17]
    assert torch.equal(image, again[0]) and label == again[1]
    # the same glyph, distorted differently from item to item
    same = [ds[i][0] for i in range(len(ds)) if labels[i] == labels[0]]
    assert not torch.equal(same[0], same[1])
    with pytest.raises(ValueError, match="source"):
        Digits(source="emnist")


@pytest.mark.slow  # imports torchvision (seconds)
def test_digits_use_mnist_when_on_disk(tmp_path, capsys):
    images, labels = write_fake_mnist(tmp_path)
    ds = Digits(resolution=28, split="train", root=tmp_path)
    assert ds.source == "mnist" and "MNIST found" in capsys.readouterr().out
    assert len(ds) == 12
    image, label = ds[3]
    assert label == labels[3] and torch.equal((image[0] + 1) * 127.5, torch.from_numpy(images[3]).float())
    assert Digits(resolution=32, split="test", root=tmp_path)[0][0].shape == (1, 32, 32)


def test_torchvision_dataset_clear_error_without_network(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist

    def no_download(*args, **kwargs):
        raise URLError("no network in this test")

    monkeypatch.setattr(mnist, "download_and_extract_archive", no_download)
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_download)
    for name, label in (("mnist", "MNIST"), ("FashionMNIST", "FashionMNIST"), ("cifar-10", "CIFAR10")):
        with pytest.raises(data.DatasetUnavailable) as err:
            data.torchvision_dataset(name, root=tmp_path / "downloads")
        message = str(err.value)
        assert label in message and str(tmp_path / "downloads") in message and "offline" in message
    with pytest.raises(ValueError, match="mnist"):
        data.torchvision_dataset("imagenet", root=tmp_path)
    with pytest.raises(data.DatasetUnavailable):
        Digits(source="mnist", root=tmp_path / "downloads")


def test_torchvision_dataset_on_disk(tmp_path):
    write_fake_mnist(tmp_path)
    ds = data.torchvision_dataset("mnist", root=tmp_path, train=False, resolution=32, download=False)
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and -1 <= float(image.min()) and float(image.max()) <= 1 and label == 0


@pytest.mark.slow  # a fresh interpreter imports torch
def test_import_is_light():
    code = (
        "import sys, common.data; "
        "print(sorted(m for m in ('torchvision', 'scipy', 'skimage') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cached_builds_once_and_rebuilds_a_truncated_file(tmp_path):
    from common.data import LatentDataset, cached

    calls = []

    def build():
        calls.append(1)
        return {"mean": torch.zeros(3, 4, 2, 2), "std": torch.ones(3, 4, 2, 2), "labels": torch.arange(3)}

    data, hit = cached(tmp_path / "c.pt", build)
    assert not hit and len(calls) == 1
    again, hit = cached(tmp_path / "c.pt", build)
    assert hit and len(calls) == 1 and torch.equal(again["labels"], data["labels"])
    (tmp_path / "c.pt").write_bytes(b"truncated")
    _, hit = cached(tmp_path / "c.pt", build)
    assert not hit and len(calls) == 2
    ds = LatentDataset(data, "labels")
    assert len(ds) == 3 and set(ds[1]) == {"z0_mean", "z0_std", "labels"}
    assert torch.equal(ds.get_batch([2, 0])["labels"], torch.tensor([2, 0]))
