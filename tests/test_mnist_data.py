"""MNIST-type data: IDX files, RotatedMNIST and ColoredMNIST as DomainBed builds them, caching, errors.

Every test writes its own small IDX files under tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from dgprune.data import DomainBatches, iterate_batches, load_dataset, make_lodo_split, read_idx, write_idx
from dgprune.data import mnist as mnist_module
from dgprune.data.mnist import load_colored_mnist, load_rotated_mnist
from dgprune.errors import ConfigError, DataError

N_TRAIN, N_TEST = 90, 30


def smooth_digits(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 28, 28]: a blurred random blob per image (smooth, so interpolations agree)."""
    rng = np.random.default_rng(seed)
    raw = rng.random((n, 28, 28)) * (rng.random((n, 1, 1)) + 0.5)
    raw[:, :4] = raw[:, -4:] = raw[:, :, :4] = raw[:, :, -4:] = 0  # empty border, as MNIST
    blurred = ndimage.gaussian_filter(raw, sigma=(0, 1.5, 1.5))
    return np.clip(blurred / blurred.max() * 255, 0, 255).astype(np.uint8)


def write_mnist(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = False, seed: int = 0):
    """The four standard files (plain or gzipped) of a small MNIST-format dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    ext = ".gz" if gz else ""
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = smooth_digits(n, seed + n)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        parts[prefix] = (images, labels)
    return parts


@pytest.fixture
def mnist_dir(tmp_path: Path) -> tuple[Path, dict]:
    parts = write_mnist(tmp_path / "raw", gz=True)
    return tmp_path / "raw", parts


def all_source(parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.concatenate([parts["train"][0], parts["t10k"][0]])
    labels = np.concatenate([parts["train"][1], parts["t10k"][1]])
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def domainbed_deal(images: torch.Tensor, labels: torch.Tensor, num_envs: int, seed: int):
    """DomainBed's MultipleEnvironmentMNIST after `torch.manual_seed(seed)` (global RNG)."""
    torch.manual_seed(seed)
    shuffle = torch.randperm(len(images))
    images, labels = images[shuffle], labels[shuffle]
    return [(images[i::num_envs], labels[i::num_envs]) for i in range(num_envs)]


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, data)
    back = read_idx(tmp_path / name)
    assert back.dtype == torch.uint8 and back.shape == (2, 3, 4)
    assert torch.equal(back, torch.from_numpy(data))
    ints = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "i.idx", ints)
    assert read_idx(tmp_path / "i.idx").tolist() == [1, -2, 70000]


def test_truncated_idx_names_file_and_problem(tmp_path: Path) -> None:
    write_idx(tmp_path / "x-idx3-ubyte", np.zeros((10, 28, 28), dtype=np.uint8))
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"cut-idx3-ubyte: truncated IDX file.*\(10, 28, 28\)"):
        read_idx(tmp_path / "cut-idx3-ubyte")
    (tmp_path / "header-idx3-ubyte").write_bytes(raw[:9])
    with pytest.raises(DataError, match="header-idx3-ubyte: truncated IDX file"):
        read_idx(tmp_path / "header-idx3-ubyte")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-40])
    with pytest.raises(DataError, match=r"cut\.gz: truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "text-idx3-ubyte").write_bytes(b"hello world, not idx")
    with pytest.raises(DataError, match="text-idx3-ubyte: not an IDX file"):
        read_idx(tmp_path / "text-idx3-ubyte")
    (tmp_path / "long-idx3-ubyte").write_bytes(raw + b"\0\0")
    with pytest.raises(DataError, match="long-idx3-ubyte: corrupt IDX file: 2 bytes after"):
        read_idx(tmp_path / "long-idx3-ubyte")


def test_truncated_file_in_dataset_is_reported(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: truncated IDX file"):
        load_rotated_mnist(root=str(tmp_path), cache=False)


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, dtype=np.uint8))
    with pytest.raises(DataError, match=f"train-labels-idx1-ubyte: expected {N_TRAIN} labels"):
        load_rotated_mnist(root=str(tmp_path), cache=False)


# ---------------------------------------------------------------- finding files, never downloading


def test_missing_files_error_names_places_and_download(tmp_path: Path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("must not download unless asked")

    monkeypatch.setattr(mnist_module, "_download", no_network)
    with pytest.raises(DataError, match=r"data root not found: .*nowhere.*download=True"):
        load_rotated_mnist(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"IDX files not found.*train-images-idx3-ubyte.*MNIST/raw"):
        load_rotated_mnist(root=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="root"):
        load_rotated_mnist()


def test_download_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_download(root: Path, variant: str) -> None:  # what torchvision would leave behind
        calls.append(variant)
        write_mnist(root / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(mnist_module, "_download", fake_download)
    ds = load_rotated_mnist(root=str(tmp_path), download=True, cache=False)
    assert calls == ["mnist"] and sum(len(d) for d in ds.domains) == N_TRAIN + N_TEST
    load_rotated_mnist(root=str(tmp_path), download=True, cache=False)
    assert calls == ["mnist"]  # files present: no second download


def test_torchvision_layout_and_variants(tmp_path: Path) -> None:
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = load_rotated_mnist(root=str(tmp_path), variant="fashion_mnist", cache=False)
    assert ds.name == "rotated_fashion_mnist"
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    with pytest.raises(DataError, match="IDX files not found"):
        load_rotated_mnist(root=str(tmp_path), variant="kmnist", cache=False)
    with pytest.raises(ConfigError, match="unknown MNIST variant"):
        load_rotated_mnist(root=str(tmp_path), variant="emnist")


def test_explicit_files(tmp_path: Path) -> None:
    write_mnist(tmp_path / "a")
    files = {
        "train_images": str(tmp_path / "a" / "train-images-idx3-ubyte"),
        "train_labels": str(tmp_path / "a" / "train-labels-idx1-ubyte"),
        "test_images": str(tmp_path / "a" / "t10k-images-idx3-ubyte"),
        "test_labels": str(tmp_path / "a" / "t10k-labels-idx1-ubyte"),
    }
    ds = load_colored_mnist(files=files, cache=False)
    assert sum(len(d) for d in ds.domains) == N_TRAIN + N_TEST
    with pytest.raises(ConfigError, match="missing"):
        load_colored_mnist(files={"train_images": files["train_images"]}, cache=False)
    with pytest.raises(DataError, match="test_labels file not found"):
        load_colored_mnist(files={**files, "test_labels": str(tmp_path / "none")}, cache=False)


# ---------------------------------------------------------------- RotatedMNIST


def test_rotated_mnist_structure_matches_domainbed(mnist_dir) -> None:
    folder, parts = mnist_dir
    ds = load_rotated_mnist(root=str(folder), seed=3, cache=False)
    assert ds.name == "rotated_mnist" and ds.data_kind == "mnist"
    assert ds.domain_names == ["0", "15", "30", "45", "60", "75"]
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    images, labels = all_source(parts)
    expected = domainbed_deal(images, labels, 6, seed=3)
    for domain, (_x, y) in zip(ds.domains, expected, strict=True):
        assert torch.equal(domain.labels, y)
        assert domain.images.dtype == torch.uint8 and domain.images.shape == (len(y), 1, 28, 28)
    assert torch.equal(ds.domain("0").images[:, 0], expected[0][0])  # 0 degrees: untouched


@pytest.mark.parametrize("k", [1, 3, 5])
def test_rotated_image_equals_independent_rotation(mnist_dir, k: int) -> None:
    folder, parts = mnist_dir
    ds = load_rotated_mnist(root=str(folder), seed=0, cache=False)
    images, labels = all_source(parts)
    source, _ = domainbed_deal(images, labels, 6, seed=0)[k]
    angle = (0, 15, 30, 45, 60, 75)[k]
    got = ds.domains[k].images[:, 0].numpy()
    # PIL directly (what DomainBed's ToPILImage + rotate amounts to): bit-exact.
    pil = np.stack(
        [
            np.asarray(Image.fromarray(im).rotate(angle, Image.Resampling.BILINEAR, fillcolor=0))
            for im in source.numpy()
        ]
    )
    np.testing.assert_array_equal(got, pil)
    # scipy's bilinear rotation, a different implementation: equal up to 8-bit rounding and edges.
    ref = np.stack(
        [
            ndimage.rotate(im.astype(float), angle, reshape=False, order=1, mode="constant")
            for im in source.numpy()
        ]
    )
    assert np.abs(got.astype(float) - ref).mean() < 1.5  # grey levels out of 255


def test_rotation_by_90_is_exact(mnist_dir) -> None:
    folder, parts = mnist_dir
    ds = load_rotated_mnist(root=str(folder), angles=(0, 90), cache=False)
    images, labels = all_source(parts)
    source, _ = domainbed_deal(images, labels, 2, seed=0)[1]
    assert torch.equal(ds.domain("90").images[:, 0], torch.rot90(source, 1, dims=(1, 2)))


def test_batches_are_scaled_like_domainbed(mnist_dir) -> None:
    folder, _ = mnist_dir
    ds = load_rotated_mnist(root=str(folder), cache=False)
    split = make_lodo_split(ds, "75", seed=0)
    (x, _y), *_ = DomainBatches(split.train, 8, seed=0).next()
    assert x.dtype == torch.float32 and x.shape == (8, 1, 28, 28)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    first = next(iterate_batches(split.target, 5))[0]
    assert torch.equal(first, split.target.images[:5].float() / 255)  # ToTensor's x / 255


# ---------------------------------------------------------------- ColoredMNIST


def domainbed_colored(images: torch.Tensor, digits: torch.Tensor, seed: int):
    """DomainBed's ColoredMNIST.color_dataset per environment, after torch.manual_seed(seed)."""
    envs = domainbed_deal(images, digits, 3, seed)  # consumes the global RNG first, as DomainBed
    out = []
    for (x, d), e in zip(envs, (0.1, 0.2, 0.9), strict=True):
        labels = (d < 5).float()
        labels = (labels - (torch.rand(len(labels)) < 0.25).float()).abs()
        colors = (labels - (torch.rand(len(labels)) < e).float()).abs()
        x = torch.stack([x, x], dim=1)
        x[torch.tensor(range(len(x))), (1 - colors).long(), :, :] *= 0
        out.append((x.float().div_(255.0), labels.long()))
    return out


def test_colored_mnist_equals_domainbed_recipe(mnist_dir) -> None:
    folder, parts = mnist_dir
    ds = load_colored_mnist(root=str(folder), seed=5, cache=False)
    assert ds.domain_names == ["+90%", "+80%", "-90%"]
    assert ds.input_shape == (2, 28, 28) and ds.num_classes == 2
    images, digits = all_source(parts)
    for domain, (x, y) in zip(ds.domains, domainbed_colored(images, digits, 5), strict=True):
        assert torch.equal(domain.labels, y)
        assert torch.equal(domain.eval_batch(slice(None)), x)


def test_colored_mnist_rates(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=24000, n_test=6000)  # 10,000 per environment
    ds = load_colored_mnist(root=str(tmp_path), seed=0, cache=False)
    images, digits = all_source(
        {
            p: (
                read_idx(tmp_path / f"{p}-images-idx3-ubyte").numpy(),
                read_idx(tmp_path / f"{p}-labels-idx1-ubyte").numpy(),
            )
            for p in ("train", "t10k")
        }
    )
    shuffle = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    digits = digits[shuffle]
    for i, (domain, flip) in enumerate(zip(ds.domains, (0.1, 0.2, 0.9), strict=True)):
        x = domain.images.float()
        color = (x[:, 1].sum(dim=(1, 2)) > 0).long()  # the channel that holds the digit
        assert torch.all(x[torch.arange(len(x)), 1 - color] == 0)
        true_label = (digits[i::3] < 5).long()
        label_noise = float((domain.labels != true_label).float().mean())
        color_flip = float((color != domain.labels).float().mean())
        assert abs(label_noise - 0.25) < 0.02, label_noise
        # So the colour predicts the label 90% / 80% of the time in the first two, 10% in the last.
        assert abs(color_flip - flip) < 0.02, (domain.name, color_flip)


def test_colored_subsample_is_irm_14px(mnist_dir) -> None:
    folder, parts = mnist_dir
    ds = load_colored_mnist(root=str(folder), subsample=True, cache=False)
    assert ds.input_shape == (2, 14, 14)
    images, digits = all_source(parts)
    source, _ = domainbed_deal(images, digits, 3, seed=0)[0]
    x = ds.domains[0].images
    kept = x.amax(dim=1)  # one channel is zero: the max over channels is the grey image
    assert torch.equal(kept, source[:, ::2, ::2])


# ---------------------------------------------------------------- data seed and cache


def test_data_seed_fixes_domains_whatever_the_training_seed(mnist_dir) -> None:
    folder, _ = mnist_dir
    torch.manual_seed(1)
    a = load_colored_mnist(root=str(folder), seed=0, cache=False)
    torch.manual_seed(999)  # a different training seed must not change the domains
    b = load_colored_mnist(root=str(folder), seed=0, cache=False)
    c = load_colored_mnist(root=str(folder), seed=1, cache=False)
    for x, y in zip(a.domains, b.domains, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert not torch.equal(a.domains[0].labels, c.domains[0].labels)


def test_cache_reused_and_invalidated(mnist_dir, tmp_path: Path) -> None:
    folder, _ = mnist_dir
    cache = tmp_path / "cache"
    first = load_rotated_mnist(root=str(folder), cache_dir=str(cache))
    assert first.info["cache"] == "written" and len(list(cache.glob("*.pt"))) == 1
    again = load_rotated_mnist(root=str(folder), cache_dir=str(cache))
    assert again.info["cache"] == "hit" and again.info["cache_file"] == first.info["cache_file"]
    for x, y in zip(first.domains, again.domains, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    other_seed = load_rotated_mnist(root=str(folder), seed=1, cache_dir=str(cache))
    assert other_seed.info["cache"] == "written" and len(list(cache.glob("*.pt"))) == 2
    # A changed source file: a new entry replaces the stale one of the same settings.
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(N_TEST, dtype=np.uint8))
    changed = load_rotated_mnist(root=str(folder), cache_dir=str(cache))
    assert changed.info["cache"] == "written" and changed.info["cache_file"] != first.info["cache_file"]
    assert not Path(first.info["cache_file"]).exists()
    assert int(sum((d.labels == 0).sum() for d in changed.domains)) >= N_TEST
    # A damaged cache file is rebuilt, not fatal.
    Path(changed.info["cache_file"]).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        rebuilt = load_rotated_mnist(root=str(folder), cache_dir=str(cache))
    assert rebuilt.info["cache"] == "written"


def test_registry_and_env_cache_dir(mnist_dir, tmp_path: Path, monkeypatch) -> None:
    folder, _ = mnist_dir
    monkeypatch.setenv("DGPRUNE_CACHE_DIR", str(tmp_path / "envcache"))
    ds = load_dataset("colored_mnist", root=str(folder), seed=0, download=False)
    assert ds.name == "colored_mnist" and ds.info["cache"] == "written"
    assert os.path.dirname(ds.info["cache_file"]) == str(tmp_path / "envcache")
    with pytest.raises(ConfigError, match="accepted options"):
        load_dataset("rotated_mnist", root=str(folder), image_size=32)
