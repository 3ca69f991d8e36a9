"""Image-folder datasets: layout, DomainBed's transforms as batched ops, bad data, cache, streaming, and a
PACS-layout folder run end to end. Every test generates its own small images under tmp_path."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from dgprune.data import (
    DomainBatches,
    SkippedImagesWarning,
    iterate_batches,
    load_dataset,
    make_lodo_split,
    probe_batch,
)
from dgprune.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DomainBedAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    resized_crop,
    sample_resized_crops,
)
from dgprune.errors import ConfigError, DataError

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "giraffe", "house")


def picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour image (a gradient plus a blob), so resizing and JPEG behave like on photos."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c = rng.random((3, 3))
    img = np.stack(
        [
            c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 8)
            for k in range(3)
        ],
        -1,
    )
    return (np.clip(img / img.max(), 0, 1) * 255).astype(np.uint8)


def make_tree(root: Path, domains=DOMAINS, classes=CLASSES, per_class: int = 4, seed: int = 0) -> Path:
    """root/<domain>/<class>/<i>.(png|jpg), sizes varying around 40 px, one grayscale image per domain."""
    rng = np.random.default_rng(seed)
    for d in domains:
        for c in classes:
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(picture(rng, 36 + 3 * i, 44 - 2 * i))
                if i == 1 and c == classes[0]:
                    img = img.convert("L")  # converted to RGB on load, as DomainBed's loader
                img.save(folder / (f"{i}.png" if i % 2 else f"{i}.JPG"))
    return root


@pytest.fixture
def pacs_root(tmp_path: Path) -> Path:
    make_tree(tmp_path / "data" / "PACS")
    return tmp_path / "data"


def load(root: Path, tmp_path: Path, **options):
    return load_dataset("pacs", root=str(root), cache_dir=str(tmp_path / "cache"), image_size=24, **options)


# ---------------------------------------------------------------- transforms vs torchvision


def test_eval_transform_is_domainbed_resize_totensor_normalize(pacs_root: Path, tmp_path: Path) -> None:
    ds = load(pacs_root, tmp_path, workers=0)
    path = pacs_root / "PACS" / "cartoon" / "giraffe" / "2.JPG"
    reference = v2.Compose(  # DomainBed's evaluation transform, on the PIL image
        [
            v2.Resize((24, 24)),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(Image.open(path).convert("RGB"))
    domain = ds.domain("cartoon")
    index = CLASSES.index("giraffe") * 4 + 2  # ImageFolder order: class by class, sorted names
    assert int(domain.labels[index]) == CLASSES.index("giraffe")
    torch.testing.assert_close(domain.eval_batch(torch.tensor([index]))[0], reference, atol=1e-5, rtol=0)


def test_resized_crop_matches_torchvision() -> None:
    x = torch.rand(3, 3, 20, 20)
    boxes = torch.tensor([[0, 0, 20, 20], [2, 3, 14, 16], [5, 1, 15, 12]])
    out = resized_crop(x, boxes, 24)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[i], top, left, h, w, [24, 24], InterpolationMode.BILINEAR, antialias=False)
        # Identical except on the outermost ring, where torchvision clamps to the crop, we to the image.
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5, rtol=0)
    same = resized_crop(x, torch.tensor([[0, 0, 20, 20]] * 3), 20)
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)
    flipped = resized_crop(x, torch.tensor([[0, 0, 20, 20]] * 3), 20, torch.tensor([True, False, True]))
    torch.testing.assert_close(flipped[0], x[0].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped[1], x[1], atol=1e-6, rtol=0)


def test_color_ops_match_torchvision_per_sample() -> None:
    x = torch.rand(5, 3, 9, 9)
    x[0, :, :3] = 0.5  # grey pixels: hue undefined, must stay grey
    factors = torch.tensor([0.7, 1.3, 1.0, 0.85, 1.2])
    hues = torch.tensor([-0.3, 0.3, 0.0, 0.1, -0.05])
    ops = [
        (adjust_brightness, v2.functional.adjust_brightness, factors),
        (adjust_contrast, v2.functional.adjust_contrast, factors),
        (adjust_saturation, v2.functional.adjust_saturation, factors),
        (adjust_hue, v2.functional.adjust_hue, hues),
    ]
    for ours, theirs, f in ops:
        got = ours(x, f)
        for i in range(len(x)):
            torch.testing.assert_close(got[i], theirs(x[i], float(f[i])), atol=2e-5, rtol=0)
    # Per-sample order: sample 0 does hue then brightness, sample 1 brightness then hue.
    params = torch.tensor([[1.2, 1.0, 1.0, 0.2]] * 2)
    order = torch.tensor([[3, 0, 1, 2], [0, 3, 1, 2]])
    got = color_jitter(x[:2], params, order)
    f = v2.functional
    torch.testing.assert_close(got[0], f.adjust_brightness(f.adjust_hue(x[0], 0.2), 1.2), atol=2e-5, rtol=0)
    torch.testing.assert_close(got[1], f.adjust_hue(f.adjust_brightness(x[1], 1.2), 0.2), atol=2e-5, rtol=0)


def test_crop_parameters_follow_randomresizedcrop() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = sample_resized_crops(4000, 32, 32, (0.7, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.T.double()
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all())
    area = h * w / 1024
    assert float(area.min()) >= 0.6 and float(area.max()) <= 1.0  # ~U(0.7, 1) before rounding
    ratio = w / h
    assert float(ratio.min()) >= 0.7 and float(ratio.max()) <= 1.45
    assert abs(float(area.mean()) - 0.83) < 0.03  # fits shrink the mean below 0.85
    assert len({tuple(b) for b in boxes.tolist()}) > 100  # per-sample, not one box per batch


def test_augment_is_per_sample_deterministic_and_domainbed_rates() -> None:
    aug = DomainBedAugment(16)
    params = aug.sample(20000, 16, 16, torch.Generator().manual_seed(1))
    assert abs(float(params["flip"].float().mean()) - 0.5) < 0.02
    assert abs(float(params["gray"].float().mean()) - 0.1) < 0.01
    f = params["factors"]
    assert float(f[:, :3].min()) >= 0.7 and float(f[:, :3].max()) <= 1.3
    assert float(f[:, 3].min()) >= -0.3 and float(f[:, 3].max()) <= 0.3
    assert len({tuple(o) for o in params["order"].tolist()}) == 24  # every order of the 4 ops occurs
    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- layout and loading


def test_pacs_layout_loads(pacs_root: Path, tmp_path: Path) -> None:
    ds = load(pacs_root, tmp_path)
    assert ds.name == "pacs" and ds.data_kind == "image"
    assert ds.domain_names == list(DOMAINS)
    assert ds.classes == list(CLASSES)
    assert ds.input_shape == (3, 24, 24) and ds.skipped_files == []
    for d in ds.domains:
        assert len(d) == 12 and d.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert d.images.dtype == torch.uint8 and d.images.shape == (12, 3, 24, 24)
    # root may also be the dataset folder itself; `folder:` loads any such folder.
    direct = load_dataset(
        "pacs", root=str(pacs_root / "PACS"), cache_dir=str(tmp_path / "cache"), image_size=24
    )
    assert direct.domain_names == list(DOMAINS)
    generic = load_dataset(f"folder:{pacs_root / 'PACS'}", cache_dir=str(tmp_path / "c2"), image_size=24)
    assert generic.name == "PACS" and generic.domain_names == list(DOMAINS)
    assert torch.equal(generic.domains[2].images, ds.domains[2].images)


def test_batches_are_augmented_and_resumable(pacs_root: Path, tmp_path: Path) -> None:
    ds = load(pacs_root, tmp_path)
    split = make_lodo_split(ds, "sketch", seed=0)
    batches = DomainBatches(split.train, 5, seed=0)
    first = batches.next()
    assert [tuple(x.shape) for x, _ in first] == [(5, 3, 24, 24)] * 3
    assert all(x.dtype == torch.float32 for x, _ in first)
    for _ in range(3):
        batches.next()
    buffer = io.BytesIO()
    torch.save(batches.state_dict(), buffer)
    buffer.seek(0)
    resumed = DomainBatches(split.train, 5, seed=0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        for (xa, ya), (xb, yb) in zip(batches.next(), resumed.next(), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Training batches are augmented; evaluation batches are the plain transform of the stored image.
    evals = torch.cat([x for x, _ in iterate_batches(split.val[0], 4)])
    torch.testing.assert_close(evals, split.val[0].eval_batch(slice(None)))
    assert probe_batch(split.val, 2).shape == (sum(min(2, len(v)) for v in split.val), 3, 24, 24)


def test_streaming_equals_in_memory(pacs_root: Path, tmp_path: Path) -> None:
    memory = load(pacs_root, tmp_path, stream=False)
    streamed = load(pacs_root, tmp_path, memory_budget_gb=0, workers=2)  # over budget: streams
    assert streamed.info["streaming"] and not memory.info["streaming"]
    assert streamed.domains[0].streaming
    a, b = make_lodo_split(memory, "photo", seed=1), make_lodo_split(streamed, "photo", seed=1)
    ba, bb = DomainBatches(a.train, 4, seed=2), DomainBatches(b.train, 4, seed=2)
    for _ in range(4):  # several epochs of a 10-sample domain: prefetching crosses epoch boundaries
        for (xa, ya), (xb, yb) in zip(ba.next(), bb.next(), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ea = torch.cat([x for x, _ in iterate_batches(a.target, 5)])
    eb = torch.cat([x for x, _ in iterate_batches(b.target, 5)])
    assert torch.equal(ea, eb)


# ---------------------------------------------------------------- bad data


def test_missing_root_and_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data root not found: .*nowhere.*PACS/<domain>/<class>/<image>"):
        load_dataset("pacs", root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"pacs: no dataset folder found; looked for .*empty/PACS"):
        load_dataset("pacs", root=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"data folder not found: .*nowhere"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="needs `root`"):
        load_dataset("vlcs")


def test_missing_domain_folder(tmp_path: Path) -> None:
    make_tree(tmp_path / "PACS", domains=DOMAINS[:3], per_class=1)
    with pytest.raises(DataError, match=r"pacs: domain folder not found: .*PACS/sketch"):
        load_dataset("pacs", root=str(tmp_path), cache=False)


def test_domain_without_images(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "x", domains=("a", "b"), per_class=1)
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"x/c: domain 'c' has no images"):
        load_dataset(f"folder:{root}", cache=False)
    (root / "c" / "dog").mkdir()
    with pytest.raises(DataError, match=r"x/c: domain 'c' has no images \(class folders are empty\)"):
        load_dataset(f"folder:{root}", cache=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "c" / "loose.png")
    (root / "c" / "dog").rmdir()
    with pytest.raises(DataError, match=r"x/c: images directly in the domain folder"):
        load_dataset(f"folder:{root}", cache=False)


def test_class_missing_in_one_domain(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "x", domains=("a", "b"), per_class=1)
    for f in (root / "b" / "house").iterdir():
        f.unlink()
    with pytest.raises(
        DataError, match=r"class 'house' missing in domain 'b' \(folder .*b/house has no images\)"
    ):
        load_dataset(f"folder:{root}", cache=False)
    (root / "b" / "house").rmdir()
    with pytest.raises(DataError, match=r"class 'house' missing in domain 'b' \(no folder .*b/house\)"):
        load_dataset(f"folder:{root}", cache=False)


def break_images(root: Path) -> list[Path]:
    """One file that is not an image at all, one truncated JPEG."""
    garbage = root / "a" / "dog" / "9.jpg"
    garbage.write_bytes(b"this is not a picture")
    jpeg = root / "b" / "giraffe" / "0.JPG"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    return [garbage, jpeg]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_images_error_then_skip(tmp_path: Path, stream: bool) -> None:
    root = make_tree(tmp_path / "x", domains=("a", "b"), per_class=2)
    bad = break_images(root)
    opts = {"cache_dir": str(tmp_path / "cache"), "image_size": 16, "stream": stream, "workers": 2}
    with pytest.raises(
        DataError, match=r"2 image\(s\) cannot be decoded: .*a/dog/9\.jpg: .*b/giraffe/0\.JPG.*skip"
    ):
        load_dataset(f"folder:{root}", **opts)
    with pytest.warns(SkippedImagesWarning, match=r"skipped 2 image\(s\)") as record:
        ds = load_dataset(f"folder:{root}", skip_bad_images=True, **opts)
    message = str(record[0].message)
    assert all(str(p) in message for p in bad)
    assert sorted(ds.skipped_files) == sorted(str(p) for p in bad)
    # The decoding done by the failed attempt was cached: the rerun with skipping decoded nothing.
    assert set(ds.info["cache"].values()) == {"hit"}
    assert [len(d) for d in ds.domains] == [6, 5]
    split = make_lodo_split(ds, "a", seed=0)
    assert DomainBatches(split.train, 4, seed=0).next()[0][0].shape == (4, 3, 16, 16)


# ---------------------------------------------------------------- cache


def test_cache_reused_and_invalidated(pacs_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load(pacs_root, tmp_path)
    assert set(first.info["cache"].values()) == {"written"}
    assert len(list(cache.glob("*.pt"))) == 4
    again = load(pacs_root, tmp_path)
    assert set(again.info["cache"].values()) == {"hit"}
    for a, b in zip(first.domains, again.domains, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # Change one image of one domain: that domain is decoded again, the others are reused.
    target = pacs_root / "PACS" / "photo" / "dog" / "0.JPG"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(target, format="JPEG")
    changed = load(pacs_root, tmp_path)
    assert changed.info["cache"] == {
        "art_painting": "hit",
        "cartoon": "hit",
        "photo": "written",
        "sketch": "hit",
    }
    assert not torch.equal(changed.domain("photo").images, first.domain("photo").images)
    assert len(list(cache.glob("*.pt"))) == 4  # the stale photo entry was removed
    # A new image, or another working resolution, is another key too.
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(pacs_root / "PACS" / "sketch" / "dog" / "new.png")
    grown = load(pacs_root, tmp_path)
    assert grown.info["cache"]["sketch"] == "written" and len(grown.domain("sketch")) == 13
    resized = load_dataset("pacs", root=str(pacs_root), cache_dir=str(cache), image_size=20)
    assert set(resized.info["cache"].values()) == {"written"} and resized.input_shape == (3, 20, 20)
    off = load_dataset("pacs", root=str(pacs_root), cache=False, image_size=24)
    assert set(off.info["cache"].values()) == {"off"}


def test_registry_options(pacs_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="accepted options"):
        load_dataset("pacs", root=str(pacs_root), imagesize=32)
    with pytest.raises(ConfigError, match="folder:"):
        load_dataset("folder:")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("pacs", root=str(pacs_root), image_size=2)
    no_aug = load_dataset(
        "pacs", root=str(pacs_root), cache_dir=str(tmp_path / "c"), image_size=24, augment=False
    )
    split = make_lodo_split(no_aug, "photo", seed=0)
    d = split.train[0]
    torch.testing.assert_close(d.train_batch(torch.arange(3)), d.eval_batch(torch.arange(3)))


# ---------------------------------------------------------------- end to end


def test_pacs_layout_pretrain_prune_evaluate(tmp_path: Path) -> None:
    from dgprune.experiments.config import build_config
    from dgprune.experiments.pipeline import make_context, run_pretrain, run_prune

    root = make_tree(tmp_path / "PACS", domains=("art_painting", "cartoon", "photo"), per_class=4)
    config = build_config(
        overrides={
            "data": {
                "name": f"folder:{root}",
                "options": {"image_size": 32, "cache_dir": str(tmp_path / "cache"), "workers": 0},
            },
            "target": "photo",
            "model": {"name": "resnet18"},  # ImageNet stem, as the paper (32 px keeps it fast)
            "pretrain": {"steps": 2, "batch_size": 4, "eval_every": 2, "lr": 1e-3},
            "prune": {
                "criterion": "ior",
                "keep_ratio": 0.5,
                "interval": 1,
                "max_per_step": 5000,
                "steps": 2,
                "batch_size": 4,
                "eval_every": 1,
            },
            "device": "cpu",
        }
    )
    ctx = make_context(config)
    assert ctx.dataset.data_kind == "image" and ctx.dataset.input_shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = run_pretrain(ctx, tmp_path / "pre")
        pruned = run_prune(ctx, tmp_path / "pre", tmp_path / "pruned")
    for record in (pre, pruned):
        assert 0.0 <= record.intra_acc <= 1.0 and 0.0 <= record.cross_acc <= 1.0
        assert set(record.per_domain_acc) == {"art_painting", "cartoon", "photo"}
    assert (
        pruned.filters_kept == math.ceil(pruned.filters_total * 0.5) or pruned.filters_kept < pre.filters_kept
    )
    assert pruned.params < pruned.params_dense
    assert pruned.masked_vs_compressed_max_abs_diff is not None
    assert pruned.masked_vs_compressed_max_abs_diff < 1e-3
