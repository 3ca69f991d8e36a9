"""Training loops: checkpoint selection rules (paper A.2) and the magnitude statistics."""

import numpy as np
import pytest
import torch

from dgprune.data import DomainBatches, load_dataset, make_lodo_split
from dgprune.models import build_model
from dgprune.pruning import GateSet, find_channel_groups
from dgprune.pruning.weight_stats import weight_statistics
from dgprune.training import PretrainSettings, PruneSettings, intra_accuracy, pretrain, prune_and_finetune

CPU = torch.device("cpu")


def _split():
    return make_lodo_split(load_dataset("rotated_digits"), target="45", seed=1)


def test_pretrain_keeps_the_best_intra_val_checkpoint():
    split = _split()
    model = build_model("mnist_cnn", 10, 1)
    outcome = pretrain(
        model, split, PretrainSettings(steps=30, batch_size=16, eval_every=5), seed=0, device=CPU
    )
    vals = [h["val_acc"] for h in outcome.history]
    assert len(vals) == 6 and outcome.best_val == max(vals)
    first_best = outcome.history[vals.index(max(vals))]["step"]
    assert outcome.best_step == first_best
    assert intra_accuracy(model, split, CPU) == outcome.best_val  # the returned model is that checkpoint


def test_pruned_model_is_selected_only_among_checkpoints_at_target():
    split = _split()
    model = build_model("mnist_cnn", 10, 1)
    settings = PruneSettings(
        criterion="taylor", keep_ratio=0.4, interval=3, max_per_step=60, steps=30, batch_size=16, eval_every=4
    )
    outcome = prune_and_finetune(
        model, split, settings, seed=0, device=CPU, example_input=torch.zeros(1, 1, 8, 8)
    )
    target = round(0.4 * 448)
    assert outcome.filters_kept == target
    assert outcome.history and all(h["alive"] == target for h in outcome.history)
    # the target is reached after ceil((448 - 179) / 60) = 5 pruning steps of 3 batches: step 15
    assert outcome.history[0]["step"] == 15
    vals = [h["val_acc"] for h in outcome.history]
    assert outcome.best_val == max(vals)
    assert intra_accuracy(model, split, CPU) == outcome.best_val


def test_schedule_extends_training_until_the_target_is_reached():
    split = _split()
    model = build_model("mnist_cnn", 10, 1)
    settings = PruneSettings(
        criterion="l1", keep_ratio=0.3, interval=2, max_per_step=100, steps=1, batch_size=8
    )
    outcome = prune_and_finetune(
        model, split, settings, seed=0, device=CPU, example_input=torch.zeros(1, 1, 8, 8)
    )
    assert outcome.filters_kept == round(0.3 * 448)
    assert outcome.steps_run == 4 * 2 + 1  # 4 pruning steps of 2 batches, then one at the target


def test_weight_statistics_sum_the_members_of_a_coupled_group():
    model = build_model("resnet18", 5, 3, small_input=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
    groups = find_channel_groups(model, torch.zeros(1, 3, 16, 16))
    l1, scale = weight_statistics(model, groups)
    gates = GateSet(model, groups)
    offsets = [0, *torch.cumsum(torch.tensor(gates.sizes), 0).tolist()]
    stage = next(i for i, g in enumerate(groups) if g.name == "layer2.0.downsample.0")
    convs = [model.layer2[0].downsample[0], model.layer2[0].conv2, model.layer2[1].conv2]
    bns = [model.layer2[0].downsample[1], model.layer2[0].bn2, model.layer2[1].bn2]
    expected_l1 = sum(c.weight.detach().abs().sum(dim=(1, 2, 3)) for c in convs)
    expected_scale = sum(b.weight.detach().abs() for b in bns)
    lo, hi = offsets[stage], offsets[stage + 1]
    torch.testing.assert_close(l1[lo:hi], expected_l1)
    torch.testing.assert_close(scale[lo:hi], expected_scale)


@pytest.mark.parametrize("algorithm", ["erm", "coral", "mixup", "vrex", "groupdro", "irm"])
def test_every_algorithm_pretrains_and_prunes_with_taylor_and_ior(algorithm):
    split = _split()
    model = build_model("mnist_cnn", 10, 1)
    pretrain(model, split, PretrainSettings(algorithm=algorithm, steps=4, batch_size=8, eval_every=2), 0, CPU)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for criterion in ("taylor", "ior"):
        for finetune in sorted({"erm", algorithm}):
            model.load_state_dict(state)
            settings = PruneSettings(
                criterion=criterion,
                keep_ratio=0.7,
                interval=2,
                steps=6,
                batch_size=8,
                eval_every=2,
                finetune_algorithm=finetune,
            )
            outcome = prune_and_finetune(
                model, split, settings, seed=0, device=CPU, example_input=torch.zeros(1, 1, 8, 8)
            )
            assert outcome.filters_kept == round(0.7 * 448)
            assert all(torch.isfinite(torch.tensor(h["loss"])) for h in outcome.history)
            outcome.gates.detach()
            model = build_model("mnist_cnn", 10, 1)  # fresh hooks-free model for the next variant


@pytest.mark.parametrize("algorithm", ["coral", "mixup"])
def test_dg_finetuning_with_batchnorm_resnet(algorithm):
    split = _split()
    model = build_model("resnet18", 10, 1, small_input=True)
    settings = PruneSettings(
        criterion="ior",
        keep_ratio=0.9,
        interval=1,
        max_per_step=300,
        steps=3,
        batch_size=4,
        eval_every=1,
        finetune_algorithm=algorithm,
    )
    outcome = prune_and_finetune(
        model, split, settings, seed=0, device=CPU, example_input=torch.zeros(1, 1, 8, 8)
    )
    assert outcome.filters_kept == round(0.9 * 2880)


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, calls: int = 10**9) -> dict[str, int]:
    """Count mini-batch draws; simulate a kill when the (calls+1)-th draw is asked for."""
    original = DomainBatches.next
    count = {"n": 0}

    def next_batches(self):
        count["n"] += 1
        if count["n"] > calls:
            raise _Interrupted
        return original(self)

    monkeypatch.setattr(DomainBatches, "next", next_batches)
    return count


def _fresh_model():
    torch.manual_seed(123)
    return build_model("mnist_cnn", 10, 1)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("algorithm", ["mixup", "groupdro"])
def test_interrupted_pretraining_resumes_to_the_same_result(tmp_path, monkeypatch, algorithm):
    split = _split()
    settings = PretrainSettings(algorithm=algorithm, steps=12, batch_size=8, eval_every=4)
    reference = pretrain(model_ref := _fresh_model(), split, settings, 0, CPU)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 7)
        with pytest.raises(_Interrupted):
            pretrain(_fresh_model(), split, settings, 0, CPU, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = pretrain(
        model := _fresh_model(), split, settings, 0, CPU, checkpoint_dir=tmp_path, checkpoint_every=3
    )
    assert resumed.history == reference.history and resumed.best_step == reference.best_step
    _assert_same_state(model.state_dict(), model_ref.state_dict())


@pytest.mark.parametrize(("criterion", "finetune"), [("random", "erm"), ("ior", "groupdro")])
def test_interrupted_pruning_resumes_to_the_same_result(tmp_path, monkeypatch, criterion, finetune):
    split = _split()
    settings = PruneSettings(
        criterion=criterion,
        keep_ratio=0.5,
        interval=3,
        max_per_step=50,
        steps=20,
        batch_size=8,
        eval_every=2,
        finetune_algorithm=finetune,
    )
    x = torch.zeros(1, 1, 8, 8)
    reference = prune_and_finetune(model_ref := _fresh_model(), split, settings, 0, CPU, x)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 11)
        with pytest.raises(_Interrupted):
            prune_and_finetune(
                _fresh_model(), split, settings, 0, CPU, x, checkpoint_dir=tmp_path, checkpoint_every=4
            )
    resumed = prune_and_finetune(
        model := _fresh_model(), split, settings, 0, CPU, x, checkpoint_dir=tmp_path, checkpoint_every=4
    )
    assert resumed.history == reference.history and resumed.best_step == reference.best_step
    assert torch.equal(resumed.gates.flat_alive(), reference.gates.flat_alive())
    _assert_same_state(model.state_dict(), model_ref.state_dict())


def _mixup_pretrained(hparams: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10, 1)
    settings = PretrainSettings(algorithm="mixup", hparams=hparams, steps=3, batch_size=8, eval_every=3)
    pretrain(model, _split(), settings, seed=3, device=CPU)
    return model.state_dict()


def test_mixup_draws_from_the_run_seed_unless_the_config_sets_one():
    implicit = _mixup_pretrained({})
    _assert_same_state(implicit, _mixup_pretrained({"seed": 3}))  # run seed 3 is the default
    other = _mixup_pretrained({"seed": 0})
    assert any(not torch.equal(implicit[k], other[k]) for k in implicit)


def test_dg_finetuning_algorithm_draws_from_the_run_seed():
    from dgprune.training.prune_finetune import finetune_algorithm

    model = build_model("mnist_cnn", 10, 1)
    seeded = finetune_algorithm(model, 3, PruneSettings(finetune_algorithm="mixup"), seed=7)
    explicit = finetune_algorithm(
        model, 3, PruneSettings(finetune_algorithm="mixup", finetune_hparams={"seed": 2}), seed=7
    )
    assert seeded.rng.random() == np.random.default_rng(7).random()
    assert explicit.rng.random() == np.random.default_rng(2).random()


def test_round_to_compresses_to_widths_that_are_multiples_of_eight():
    from dgprune.pruning import compress

    split = _split()
    model = build_model("mnist_cnn", 10, 1)
    settings = PruneSettings(
        criterion="taylor", keep_ratio=0.3, interval=2, steps=10, batch_size=8, eval_every=2, round_to=8
    )
    x = torch.zeros(1, 1, 8, 8)
    outcome = prune_and_finetune(model, split, settings, seed=0, device=CPU, example_input=x)
    probe = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        masked = model(probe)
    compress(model, outcome.gates, x)
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    assert abs(sum(widths) - round(0.3 * 448)) <= 4 * len(widths)
    with torch.no_grad():
        torch.testing.assert_close(model(probe), masked, atol=1e-4, rtol=0)
