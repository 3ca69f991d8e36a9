"""Training algorithms: each objective against an independent computation of its formula, training on an
easy task, exact resume, and the VREx/IRM penalty annealing with its Adam reset."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from dgprune.algorithms import (
    ALGORITHMS,
    DomainOutput,
    Mixup,
    default_hparams,
    make_algorithm,
)
from dgprune.errors import ConfigError
from dgprune.models import find_classifier, forward_with_features

NAMES = ["erm", "coral", "mixup", "vrex", "groupdro", "irm"]


class Net(nn.Module):
    def __init__(self, d_in: int = 4, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.Tanh())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _batches(sizes=(4, 6, 5), d_in=4, classes=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def _outputs(model, minibatches):
    return [DomainOutput(*forward_with_features(model, x), y) for x, y in minibatches]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written out: logsumexp - logit of the true class."""
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).mean()


def _setup(name, hparams=None, sizes=(4, 6, 5)):
    model = Net().double()
    minibatches = _batches(sizes)
    algorithm = make_algorithm(name, model, len(minibatches), hparams)
    return model, algorithm, minibatches


def _forward(model):
    return lambda x: forward_with_features(model, x)


# ---------------------------------------------------------------------------------------- features
def test_forward_with_features_returns_the_classifier_input_and_removes_its_hook():
    model = Net()
    x = torch.randn(5, 4)
    logits, features = forward_with_features(model, x)
    torch.testing.assert_close(features, model.body(x))
    torch.testing.assert_close(logits, model(x))
    assert find_classifier(model) is model.fc and not model.fc._forward_pre_hooks


def test_forward_with_features_flattens_and_cleans_up_on_error():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(x.reshape(len(x), -1)).reshape(len(x), -1)

    logits, features = forward_with_features(Flat(), torch.randn(3, 2, 3))
    assert features.shape == (3, 6) and logits.shape == (3, 2)

    class Broken(Net):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    broken = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        forward_with_features(broken, torch.randn(2, 4))
    assert not broken.fc._forward_pre_hooks
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        find_classifier(nn.Sequential(nn.Conv2d(1, 2, 3)))


# ---------------------------------------------------------------------------------------- hparams
def test_default_hparams_are_domainbeds():
    assert default_hparams("erm", "image") == {"lr": 5e-5, "weight_decay": 0.0, "batch_size": 32, "seed": 0}
    assert (
        default_hparams("erm", "mnist")["lr"] == 1e-3 and default_hparams("erm", "mnist")["batch_size"] == 64
    )
    assert default_hparams("coral")["mmd_gamma"] == 1.0
    assert default_hparams("mixup")["mixup_alpha"] == 0.2
    assert (
        default_hparams("vrex")["vrex_lambda"] == 10
        and default_hparams("vrex")["vrex_penalty_anneal_iters"] == 500
    )
    assert default_hparams("groupdro")["groupdro_eta"] == 0.01
    assert (
        default_hparams("irm")["irm_lambda"] == 100
        and default_hparams("irm")["irm_penalty_anneal_iters"] == 500
    )
    assert set(ALGORITHMS) == set(NAMES)


def test_unknown_names_and_keys_are_config_errors():
    model = Net()
    with pytest.raises(ConfigError, match=r"'mmd_gamma'.*valid: batch_size, lr, seed, weight_decay"):
        make_algorithm("erm", model, 3, {"mmd_gamma": 1.0})
    with pytest.raises(ConfigError, match="valid: erm, coral, mixup, vrex, groupdro, irm"):
        make_algorithm("dann", model, 3)
    with pytest.raises(ConfigError, match="num_domains"):
        make_algorithm("erm", model, 1e-3, 0.0)  # the old (model, lr, weight_decay) call
    algorithm = make_algorithm("irm", model, 3, {"lr": 0.5}, data_kind="mnist")
    assert algorithm.hparams["lr"] == 0.5 and algorithm.hparams["batch_size"] == 64
    assert algorithm.optimizer.param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------------------------------- objectives
def test_erm_objective_is_the_cross_entropy_of_all_samples():
    model, algorithm, minibatches = _setup("erm")
    loss, stats = algorithm.objective(_outputs(model, minibatches), minibatches, _forward(model))
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    torch.testing.assert_close(loss, _ce(model(x), y))
    assert stats["loss"] == pytest.approx(float(loss.detach()))
    assert algorithm.objective_is_mean_risk
    assert not any(cls.objective_is_mean_risk for name, cls in ALGORITHMS.items() if name != "erm")
    assert all(p.grad is None for p in model.parameters())  # objective never runs backward


def test_coral_objective_matches_numpy_means_and_covariances():
    model, algorithm, minibatches = _setup("coral", {"mmd_gamma": 0.7})
    loss, stats = algorithm.objective(_outputs(model, minibatches), minibatches, _forward(model))
    feats = [model.body(x).detach().numpy() for x, _ in minibatches]
    penalties = [
        np.mean((a.mean(0) - b.mean(0)) ** 2)
        + np.mean((np.cov(a, rowvar=False) - np.cov(b, rowvar=False)) ** 2)
        for a, b in itertools.combinations(feats, 2)
    ]
    nll = np.mean([float(_ce(model(x), y).detach()) for x, y in minibatches])
    assert stats["penalty"] == pytest.approx(np.mean(penalties), rel=1e-10)
    assert loss.item() == pytest.approx(nll + 0.7 * np.mean(penalties), rel=1e-10)


class FixedPairsMixup(Mixup):
    def pairs(self, num_domains):
        return [(0, 1), (1, 2), (2, 0)]


def test_mixup_objective_with_fixed_lambda_and_pairing():
    model = Net().double()
    minibatches = _batches((4, 6, 5))
    algorithm = FixedPairsMixup(model, 3, {"mixup_fixed_lambda": 0.3})
    loss, _ = algorithm.objective([], minibatches, _forward(model))
    expected = 0.0
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
        n = min(len(yi), len(yj))
        logits = model(0.3 * xi[:n] + 0.7 * xj[:n])
        expected += 0.3 * _ce(logits, yi[:n]) + 0.7 * _ce(logits, yj[:n])
    torch.testing.assert_close(loss, expected / 3)


def test_mixup_draws_pairs_as_a_cyclic_permutation_and_lambda_from_beta():
    algorithm = make_algorithm("mixup", Net(), 4, {"seed": 3})
    rng = np.random.default_rng(3)
    perm = rng.permutation(4).tolist()
    assert algorithm.pairs(4) == [(perm[k], perm[(k + 1) % 4]) for k in range(4)]
    assert algorithm.mixing_weight() == rng.beta(0.2, 0.2)


def test_vrex_penalty_is_the_population_variance_of_domain_risks():
    model, algorithm, minibatches = _setup("vrex", {"vrex_lambda": 5.0, "vrex_penalty_anneal_iters": 2})
    risks = np.array([float(_ce(model(x), y).detach()) for x, y in minibatches])
    outputs = _outputs(model, minibatches)
    loss, stats = algorithm.objective(outputs, minibatches, _forward(model))
    assert stats["penalty"] == pytest.approx(np.var(risks), rel=1e-10)
    assert loss.item() == pytest.approx(risks.mean() + 1.0 * np.var(risks), rel=1e-10)
    algorithm.step_count = 2  # annealing over: weight = vrex_lambda
    loss, _ = algorithm.objective(outputs, minibatches, _forward(model))
    assert loss.item() == pytest.approx(risks.mean() + 5.0 * np.var(risks), rel=1e-10)


def test_groupdro_updates_q_and_weights_the_risks_over_two_calls():
    model, algorithm, minibatches = _setup("groupdro", {"groupdro_eta": 0.5})
    second = _batches((4, 6, 5), seed=7)
    q = np.ones(3)  # DomainBed: ones, multiplied then normalised each step
    for batches in (minibatches, second):
        risks = np.array([float(_ce(model(x), y).detach()) for x, y in batches])
        q = q * np.exp(0.5 * risks)
        q = q / q.sum()
        loss, _ = algorithm.objective(_outputs(model, batches), batches, _forward(model))
        np.testing.assert_allclose(algorithm.q.numpy(), q, rtol=1e-12)
        assert loss.item() == pytest.approx(float(q @ risks), rel=1e-12)


def test_irm_penalty_matches_its_closed_form_including_gradients():
    model, algorithm, minibatches = _setup("irm", {"irm_lambda": 3.0, "irm_penalty_anneal_iters": 0})

    def dscale(logits, y):
        # d/dw CE(w z, y) at w = 1 = mean over samples of (sum_k softmax(z)_k z_k - z_y)
        return ((logits.softmax(1) * logits).sum(1) - logits[torch.arange(len(y)), y]).mean()

    nll, penalty = 0.0, 0.0
    for x, y in minibatches:
        logits = model(x)
        nll = nll + _ce(logits, y) / 3
        penalty = penalty + dscale(logits[::2], y[::2]) * dscale(logits[1::2], y[1::2]) / 3
    expected = nll + 3.0 * penalty
    loss, stats = algorithm.objective(_outputs(model, minibatches), minibatches, _forward(model))
    torch.testing.assert_close(loss, expected)
    assert stats["penalty"] == pytest.approx(penalty.item(), rel=1e-10)
    params = list(model.parameters())
    for got, want in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(got, want)  # the penalty's graph (create_graph) is right


# ---------------------------------------------------------------------------------------- training
def _blobs(seed=0, n=48):
    """3 domains x 3 classes of 2-D Gaussian blobs; each domain shifts all blobs differently."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    domains = []
    for d in range(3):
        y = torch.arange(n) % 3
        x = centres[y] + 0.5 * torch.randn(n, 2, generator=g) + 0.4 * torch.tensor([d - 1.0, 0.5 * d])
        domains.append((x, y))
    return domains


class Blob(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("name", NAMES)
def test_each_algorithm_lowers_the_training_loss(name):
    domains = _blobs()
    model = Blob()
    algorithm = make_algorithm(name, model, 3, {"lr": 1e-2})
    x_all, y_all = torch.cat([x for x, _ in domains]), torch.cat([y for _, y in domains])
    with torch.no_grad():
        before = float(_ce(model(x_all), y_all))
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        picks = [torch.randperm(len(y), generator=g)[:16] for _, y in domains]
        algorithm.update([(x[i], y[i]) for (x, y), i in zip(domains, picks, strict=True)])
    with torch.no_grad():
        after = float(_ce(model(x_all), y_all))
    assert algorithm.step_count == 30
    assert after < 0.3 * before, (before, after)


# ---------------------------------------------------------------------------------------- resume
def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_saved_state_gives_the_same_next_step(name):
    hparams = {"lr": 1e-2, "seed": 5}
    if name in ("vrex", "irm"):
        hparams[f"{name}_penalty_anneal_iters"] = 2  # the resumed step is past the switch
    domains = _blobs()
    steps = [[(x[k::4][:8], y[k::4][:8]) for x, y in domains] for k in range(4)]

    model = Blob()
    algorithm = make_algorithm(name, model, 3, hparams)
    for batch in steps[:3]:
        algorithm.update(batch)
    saved_model = _roundtrip(model.state_dict())
    saved_algorithm = _roundtrip(algorithm.state_dict())
    expected = algorithm.update(steps[3])

    torch.manual_seed(123)  # a different initialisation, overwritten by the saved state
    resumed_model = Blob()
    resumed_model.load_state_dict(saved_model)
    resumed = make_algorithm(name, resumed_model, 3, hparams)
    resumed.load_state_dict(saved_algorithm)
    assert resumed.step_count == 3
    got = resumed.update(steps[3])
    assert got == expected
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)

    if name in ("mixup", "groupdro"):  # without the algorithm's own state the step would differ
        fresh_model = Blob()
        fresh_model.load_state_dict(saved_model)
        fresh = make_algorithm(name, fresh_model, 3, hparams)
        fresh.optimizer.load_state_dict(saved_algorithm["optimizer"])
        assert fresh.update(steps[3])["loss"] != expected["loss"]


# ---------------------------------------------------------------------------------------- annealing
@pytest.mark.parametrize("name", ["vrex", "irm"])
def test_penalty_switch_and_adam_reset_happen_at_anneal_iters(name):
    hparams = {"lr": 1e-2, f"{name}_lambda": 7.0, f"{name}_penalty_anneal_iters": 3}
    domains = _blobs()
    model = Blob()
    algorithm = make_algorithm(name, model, 3, hparams)
    weights, adam_steps, optimizers = [], [], []
    for k in range(6):
        optimizers.append(algorithm.optimizer)
        stats = algorithm.update([(x[k::6], y[k::6]) for x, y in domains])
        weights.append(stats["penalty_weight"])
        adam_steps.append(int(algorithm.optimizer.state[model.fc.weight]["step"]))
    assert weights == [1.0, 1.0, 1.0, 7.0, 7.0, 7.0]
    assert adam_steps == [1, 2, 3, 1, 2, 3]  # a fresh Adam takes the first step with the full penalty
    assert optimizers[3] is optimizers[0] and algorithm.optimizer is not optimizers[0]
    assert algorithm.optimizer.param_groups[0]["lr"] == 1e-2


def test_groupdro_and_update_reject_a_wrong_number_of_domains():
    _, algorithm, minibatches = _setup("groupdro")
    with pytest.raises(ValueError, match="3"):
        algorithm.update(minibatches[:2])
