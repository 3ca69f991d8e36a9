"""Taylor-FO and IoR from one backward pass vs brute force: N separate autograd.grad calls."""

import pytest
import torch
import torch.nn.functional as F

from dgprune.models import build_model
from dgprune.pruning import GateSet, ScoreInputs, find_channel_groups, make_criterion
from dgprune.pruning.criteria import ior_scores, taylor_scores
from dgprune.pruning.scoring import per_domain_forward_backward

DOMAIN_SIZES = (3, 5, 7)  # unequal on purpose


def _model_and_batches(name: str, pixels: int):
    model = build_model(name, num_classes=4, in_channels=2, small_input=True).double()
    model.train()  # BatchNorm in the mode that training uses
    batches = [
        (torch.randn(n, 2, pixels, pixels, dtype=torch.float64), torch.randint(0, 4, (n,)))
        for n in DOMAIN_SIZES
    ]
    return model, batches


def _brute_force(model, groups, batches, alpha):
    """Independent reference: own gate hooks, one forward + autograd.grad per domain."""
    modules = dict(model.named_modules())
    gates = [torch.ones(g.size, dtype=torch.float64, requires_grad=True) for g in groups]
    handles = []
    for gate, group in zip(gates, groups, strict=False):
        for site in group.gate_sites:
            assert list(site.channel_index) == list(range(group.size))  # identity for these models
            handles.append(
                modules[site.module_name].register_forward_hook(
                    lambda m, i, out, gate=gate: out * gate.view(1, -1, 1, 1)
                )
            )
    risks = [F.cross_entropy(model(x), y) for x, y in batches]
    domain_grads = [torch.cat(torch.autograd.grad(r, gates, retain_graph=True)) for r in risks]
    risk_vec = torch.stack(risks)
    variance = ((risk_vec - risk_vec.mean()) ** 2).mean()  # population variance, as V-REx
    var_grad = torch.cat(torch.autograd.grad(variance, gates))
    for h in handles:
        h.remove()
    mean_grad = torch.stack(domain_grads).mean(dim=0)
    taylor = mean_grad**2
    return torch.stack(domain_grads), risk_vec.detach(), taylor, taylor + alpha * var_grad**2


@pytest.mark.parametrize(("name", "pixels"), [("mnist_cnn", 8), ("resnet18", 16)])
def test_taylor_and_ior_equal_brute_force(name, pixels):
    model, batches = _model_and_batches(name, pixels)
    example = batches[0][0][:1]
    groups = find_channel_groups(model, example, scope="all")
    alpha = 0.7
    ref_grads, ref_risks, ref_taylor, ref_ior = _brute_force(model, groups, batches, alpha)

    gates = GateSet(model, groups).attach()
    step = per_domain_forward_backward(model, gates, batches)
    inputs = ScoreInputs(gates=gates.flat_gates().double(), domain_grads=step.domain_grads, risks=step.risks)

    torch.testing.assert_close(step.risks, ref_risks, rtol=1e-10, atol=0)
    torch.testing.assert_close(step.domain_grads, ref_grads, rtol=1e-5, atol=1e-12 * ref_grads.abs().max())
    taylor = make_criterion("taylor").score(inputs)
    ior = make_criterion("ior", {"alpha": alpha}).score(inputs)
    torch.testing.assert_close(taylor, ref_taylor, rtol=1e-5, atol=1e-12 * ref_taylor.max())
    torch.testing.assert_close(ior, ref_ior, rtol=1e-5, atol=1e-12 * ref_ior.max())
    # the variance term matters: IoR is not Taylor in disguise
    assert (ior - taylor).abs().max() > 1e-6 * taylor.max()


def test_pruned_gates_score_zero_and_alpha_zero_is_taylor():
    grads = torch.randn(3, 6)
    risks = torch.tensor([0.5, 1.0, 2.0])
    gates = torch.tensor([1.0, 1, 0, 1, 0, 1])
    inputs = ScoreInputs(gates=gates, domain_grads=grads, risks=risks)
    assert torch.all(taylor_scores(inputs)[gates == 0] == 0)
    torch.testing.assert_close(ior_scores(inputs, alpha=0.0), taylor_scores(inputs))


def test_one_backward_matches_when_batchnorm_mixes_domains_only_per_domain():
    """Guard the design: forwarding the *concatenated* batch couples domains through BN statistics,
    so its per-sample split differs from the per-domain gradient; our per-domain forward does not."""
    model, batches = _model_and_batches("resnet18", 8)
    groups = find_channel_groups(model, batches[0][0][:1])
    ref_grads, *_ = _brute_force(model, groups, batches, 1.0)
    # naive: one BN batch over all domains, then autograd per domain's share of the loss
    modules = dict(model.named_modules())
    gates = [torch.ones(g.size, dtype=torch.float64, requires_grad=True) for g in groups]
    handles = [
        modules[s.module_name].register_forward_hook(lambda m, i, o, g=g: o * g.view(1, -1, 1, 1))
        for g, grp in zip(gates, groups, strict=False)
        for s in grp.gate_sites
    ]
    logits = model(torch.cat([x for x, _ in batches]))
    ys = torch.cat([y for _, y in batches])
    losses = F.cross_entropy(logits, ys, reduction="none").split(list(DOMAIN_SIZES))
    naive = torch.stack(
        [torch.cat(torch.autograd.grad(part.mean(), gates, retain_graph=True)) for part in losses]
    )
    for h in handles:
        h.remove()
    assert (naive - ref_grads).abs().max() > 1e-3 * ref_grads.abs().max()


@pytest.mark.parametrize(("name", "pixels"), [("mnist_cnn", 8), ("resnet18", 8)])
def test_dg_finetune_objective_keeps_plain_risk_gradients(name, pixels):
    """With a DG objective (CORAL), gate gradients are still those of the plain per-domain CE
    (IoR's risks) and the parameters receive the gradient of the CORAL objective."""
    from dgprune.algorithms import DomainOutput, make_algorithm
    from dgprune.models import forward_with_features

    model, batches = _model_and_batches(name, pixels)
    groups = find_channel_groups(model, batches[0][0][:1])
    ref_grads, ref_risks, *_ = _brute_force(model, groups, batches, 1.0)
    coral = make_algorithm("coral", model, len(batches), {"mmd_gamma": 0.5})
    # reference parameter gradient: the CORAL objective on per-domain forwards, no gates at all
    outputs = [DomainOutput(*forward_with_features(model, x), y) for x, y in batches]
    ref_loss, _ = coral.objective(outputs, batches, lambda x: forward_with_features(model, x))
    params = [model.fc.weight, next(model.parameters())]
    ref_param_grads = torch.autograd.grad(ref_loss, params)

    gates = GateSet(model, groups).attach()
    model.zero_grad()
    step = per_domain_forward_backward(model, gates, batches, objective=coral.objective)
    torch.testing.assert_close(step.risks, ref_risks, rtol=1e-10, atol=0)
    torch.testing.assert_close(step.domain_grads, ref_grads, rtol=1e-5, atol=1e-12 * ref_grads.abs().max())
    assert step.loss == pytest.approx(float(ref_loss.detach()), rel=1e-9)
    for param, ref in zip(params, ref_param_grads, strict=True):
        torch.testing.assert_close(param.grad, ref, rtol=1e-6, atol=1e-12)
