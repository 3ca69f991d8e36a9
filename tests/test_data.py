"""Data layer: rotated digits, leave-one-domain-out splits, per-domain batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.datasets import load_digits

from dgprune.data import (
    Domain,
    DomainBatches,
    MultiDomainDataset,
    iterate_batches,
    load_dataset,
    load_rotated_digits,
    make_lodo_split,
    split_domain,
)
from dgprune.data.digits import digit_domain_indices
from dgprune.errors import ConfigError, DataError

ANGLES = (0, 15, 30, 45, 60, 75)


@pytest.fixture(scope="module")
def digits() -> MultiDomainDataset:
    return load_rotated_digits()


@pytest.fixture(scope="module")
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.images, d.target


def indexed_domain(name: str, n: int) -> Domain:
    """A domain whose image i holds the value i, so parts can be traced back to sample indices."""
    return Domain(
        name, torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.zeros(n, dtype=torch.long)
    )


def sample_ids(domain: Domain) -> list[int]:
    return domain.images.view(-1).long().tolist()


# ---------------------------------------------------------------- rotated digits


def test_rotated_digits_shape(digits: MultiDomainDataset) -> None:
    assert digits.name == "rotated_digits"
    assert digits.domain_names == ["0", "15", "30", "45", "60", "75"]
    assert digits.classes == [str(c) for c in range(10)]
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert sum(len(d) for d in digits.domains) == 1797
    assert sorted(len(d) for d in digits.domains) == [299, 299, 299, 300, 300, 300]
    for d in digits.domains:
        assert d.images.dtype == torch.float32 and d.labels.dtype == torch.int64
        assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0 + 1e-6


def test_domain_indices_partition_all_samples() -> None:
    parts = digit_domain_indices(1797, 6, seed=0)
    together = torch.cat(parts)
    assert len(together) == 1797
    assert torch.equal(together.sort().values, torch.arange(1797))  # disjoint and complete


def test_unrotated_domain_is_sklearn_data(digits: MultiDomainDataset, sklearn_digits) -> None:
    images, target = sklearn_digits
    idx = digit_domain_indices(len(images), len(ANGLES), seed=0)[0].numpy()
    d0 = digits.domain("0")
    expected = torch.as_tensor(images[idx], dtype=torch.float32).unsqueeze(1) / 16
    assert torch.equal(d0.images, expected)
    assert torch.equal(d0.labels, torch.as_tensor(target[idx]))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_rotated_domain_matches_independent_rotation(
    digits: MultiDomainDataset, sklearn_digits, k: int
) -> None:
    images, target = sklearn_digits
    idx = digit_domain_indices(len(images), len(ANGLES), seed=0)[k].numpy()
    # scipy's bilinear rotation, zero outside the image: an implementation independent of torchvision.
    expected = np.stack(
        [
            ndimage.rotate(im / 16, ANGLES[k], reshape=False, order=1, mode="grid-constant")
            for im in images[idx]
        ]
    )
    domain = digits.domain(str(ANGLES[k]))
    np.testing.assert_allclose(domain.images[:, 0].numpy(), expected, atol=1e-5)
    assert torch.equal(domain.labels, torch.as_tensor(target[idx]))


def test_rotated_digits_deterministic_per_seed(digits: MultiDomainDataset) -> None:
    again = load_rotated_digits(seed=0)
    for a, b in zip(digits.domains, again.domains, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = load_rotated_digits(seed=1)
    assert not torch.equal(digits.domain("0").images[:50], other.domain("0").images[:50])


def test_custom_angles_names() -> None:
    ds = load_rotated_digits(angles=(0, 7.5, 90))
    assert ds.domain_names == ["0", "7.5", "90"]
    with pytest.raises(ConfigError):
        load_rotated_digits(angles=(15, 15.0))


def test_registry() -> None:
    ds = load_dataset("rotated_digits", angles=(0, 45), seed=3)
    assert ds.domain_names == ["0", "45"]
    with pytest.raises(DataError, match="rotated_digits"):
        load_dataset("pacs_typo")
    with pytest.raises(ConfigError, match="angles"):
        load_dataset("rotated_digits", angle=(0, 45))


# ---------------------------------------------------------------- dataset validation


def test_unknown_domain_lists_valid_names(digits: MultiDomainDataset) -> None:
    with pytest.raises(DataError, match=r"'90'.*0, 15, 30, 45, 60, 75"):
        digits.domain("90")


def test_dataset_validation() -> None:
    a = indexed_domain("a", 4)
    with pytest.raises(DataError, match="no domains"):
        MultiDomainDataset("x", [], ["c"])
    with pytest.raises(DataError, match="duplicate"):
        MultiDomainDataset("x", [a, indexed_domain("a", 3)], ["c"])
    with pytest.raises(DataError, match="shape"):
        MultiDomainDataset(
            "x", [a, Domain("b", torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))], ["c"]
        )
    with pytest.raises(DataError, match="labels"):
        MultiDomainDataset("x", [Domain("b", torch.zeros(2, 1, 1, 1), torch.tensor([0, 2]))], ["c", "d"])
    with pytest.raises(DataError):
        Domain("b", torch.zeros(2, 1, 1, 1), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- splits


def test_split_domain_disjoint_complete_and_fraction() -> None:
    domain = indexed_domain("15", 300)
    train, val = split_domain(domain, 0.1, seed=0)
    assert len(val) == 30 and len(train) == 270
    ids_train, ids_val = set(sample_ids(train)), set(sample_ids(val))
    assert not ids_train & ids_val
    assert ids_train | ids_val == set(range(300))
    assert train.name == val.name == "15"


def test_split_keeps_one_sample_each_side() -> None:
    domain = indexed_domain("tiny", 3)
    assert [len(p) for p in split_domain(domain, 0.01, seed=0)] == [2, 1]
    assert [len(p) for p in split_domain(domain, 0.99, seed=0)] == [1, 2]
    with pytest.raises(DataError):
        split_domain(indexed_domain("one", 1), 0.5, seed=0)


def test_lodo_split(digits: MultiDomainDataset) -> None:
    split = make_lodo_split(digits, "30", val_fraction=0.2, seed=0)
    assert split.target is digits.domain("30")
    assert split.source_names == ["0", "15", "45", "60", "75"]
    assert [d.name for d in split.val] == split.source_names
    for train, val in zip(split.train, split.val, strict=True):
        n = len(digits.domain(train.name))
        assert len(train) + len(val) == n
        assert abs(len(val) - 0.2 * n) <= 1


def test_lodo_split_deterministic_and_seeded(digits: MultiDomainDataset) -> None:
    a = make_lodo_split(digits, "0", seed=0)
    b = make_lodo_split(digits, "0", seed=0)
    c = make_lodo_split(digits, "0", seed=1)
    for x, y in zip(a.val, b.val, strict=True):
        assert torch.equal(x.images, y.images)
    assert not torch.equal(a.val[0].images, c.val[0].images)


def test_domain_split_independent_of_target_and_order() -> None:
    domains = [indexed_domain(name, 50 + 7 * i) for i, name in enumerate(["0", "15", "30", "45"])]
    ds = MultiDomainDataset("toy", domains, ["c"])
    reordered = MultiDomainDataset("toy", domains[::-1], ["c"])

    def part_of(split, name):
        i = split.source_names.index(name)
        return sample_ids(split.train[i]), sample_ids(split.val[i])

    reference = part_of(make_lodo_split(ds, "0", seed=5), "15")
    assert part_of(make_lodo_split(ds, "30", seed=5), "15") == reference
    assert part_of(make_lodo_split(reordered, "45", seed=5), "15") == reference


def test_lodo_split_errors(digits: MultiDomainDataset) -> None:
    with pytest.raises(DataError, match=r"'90'.*0, 15, 30, 45, 60, 75"):
        make_lodo_split(digits, "90")
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="val_fraction"):
            make_lodo_split(digits, "0", val_fraction=bad)
    single = MultiDomainDataset("one", [indexed_domain("a", 10)], ["c"])
    with pytest.raises(DataError, match="at least 2"):
        make_lodo_split(single, "a")


# ---------------------------------------------------------------- batches


def toy_domains() -> list[Domain]:
    return [indexed_domain("a", 10), indexed_domain("b", 3), indexed_domain("c", 25)]


def batch_ids(batches) -> list[list[int]]:
    return [x.view(-1).long().tolist() for x, _ in batches]


def test_domain_batches_shapes() -> None:
    batches = DomainBatches(toy_domains(), batch_size=4, seed=0).next()
    assert [x.shape[0] for x, _ in batches] == [4, 3, 4]
    assert all(y.shape == (x.shape[0],) and y.dtype == torch.long for x, y in batches)
    assert batches[0][0].shape[1:] == (1, 1, 1)


def test_domain_batches_deterministic_per_seed() -> None:
    a = DomainBatches(toy_domains(), 4, seed=0)
    b = DomainBatches(toy_domains(), 4, seed=0)
    c = DomainBatches(toy_domains(), 4, seed=1)
    seq_a = [batch_ids(a.next()) for _ in range(12)]
    assert seq_a == [batch_ids(b.next()) for _ in range(12)]
    assert seq_a != [batch_ids(c.next()) for _ in range(12)]


def test_domain_batches_epochs_without_replacement() -> None:
    it = DomainBatches([indexed_domain("a", 10)], batch_size=5, seed=0)
    for _ in range(3):  # each epoch of 2 batches is a permutation of the domain
        epoch = batch_ids(it.next())[0] + batch_ids(it.next())[0]
        assert sorted(epoch) == list(range(10))
    it = DomainBatches([indexed_domain("a", 10)], batch_size=4, seed=0)
    first, second = batch_ids(it.next())[0], batch_ids(it.next())[0]
    assert not set(first) & set(second)


def test_domain_batches_resume() -> None:
    original = DomainBatches(toy_domains(), 4, seed=7)
    for _ in range(7):
        original.next()
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # resumable from a plain, safe checkpoint
    resumed = DomainBatches(toy_domains(), 4, seed=0)
    resumed.load_state_dict(state)
    for _ in range(10):
        assert batch_ids(original.next()) == batch_ids(resumed.next())
    with pytest.raises(DataError, match="does not match"):
        DomainBatches(toy_domains()[:2], 4, seed=7).load_state_dict(state)


def test_domain_batches_errors() -> None:
    with pytest.raises(ConfigError):
        DomainBatches(toy_domains(), 0, seed=0)
    with pytest.raises(DataError):
        DomainBatches([], 4, seed=0)


def test_iterate_batches_in_order() -> None:
    domain = indexed_domain("a", 10)
    parts = list(iterate_batches(domain, 4))
    assert [len(x) for x, _ in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in parts]), domain.images)
    assert torch.equal(torch.cat([y for _, y in parts]), domain.labels)
