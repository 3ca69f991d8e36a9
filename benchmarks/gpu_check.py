"""GPU check: exact scores, compressed == masked, and step-time ratios on CUDA. Writes a JSON.

python benchmarks/gpu_check.py --json gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dgprune.models import build_model
from dgprune.pruning import GateSet, ScoreInputs, compress, find_channel_groups, make_criterion
from dgprune.pruning.scoring import per_domain_forward_backward


def exactness(device: torch.device) -> float:
    """Max relative error of one-backward per-domain gate gradients vs N autograd.grad calls."""
    model = build_model("resnet18", 4, 3, small_input=True).double().to(device).train()
    batches = [
        (
            torch.randn(n, 3, 16, 16, dtype=torch.float64, device=device),
            torch.randint(0, 4, (n,), device=device),
        )
        for n in (3, 5, 7)
    ]
    groups = find_channel_groups(model, batches[0][0][:1])
    gates = GateSet(model, groups).attach()
    step = per_domain_forward_backward(model, gates, batches)
    gates.begin_scoring(len(batches))
    reference = []
    for i, (x, y) in enumerate(batches):
        with gates.domain(i):
            risk = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(risk, gates._domain_gates)
        reference.append(torch.cat([g[i] for g in grads]))
    gates.end_scoring()
    reference = torch.stack(reference)
    return float((step.domain_grads - reference).abs().max() / reference.abs().max())


def compression_diff(device: torch.device) -> dict[str, float]:
    model = build_model("resnet18", 7, 3).to(device).eval()
    x = torch.randn(8, 3, 64, 64, device=device)
    gates = GateSet(model, find_channel_groups(model, x[:1])).attach()
    gen = torch.Generator().manual_seed(0)
    alive = torch.cat([torch.rand(n, generator=gen) < 0.5 for n in gates.sizes])
    alive[torch.cumsum(torch.tensor(gates.sizes), 0) - 1] = True  # keep one per group
    gates.set_alive(alive)
    with torch.no_grad():
        masked = model(x)
    compress(model, gates, x[:1])
    with torch.no_grad():
        return {"max_abs_diff": float((model(x) - masked).abs().max())}


def step_times(device: torch.device, repeats: int = 5, steps: int = 10) -> dict[str, float]:
    model = build_model("resnet18", 7, 3, small_input=True).to(device).train()
    batches = [
        (torch.randn(32, 3, 64, 64, device=device), torch.randint(0, 7, (32,), device=device))
        for _ in range(3)
    ]
    gates = GateSet(model, find_channel_groups(model, batches[0][0][:1])).attach()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run(name: str) -> float:
        criterion = make_criterion(name)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            out = per_domain_forward_backward(model, gates, batches)
            criterion.score(ScoreInputs(gates.flat_gates(), out.domain_grads, out.risks))
            opt.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    run("taylor"), run("ior")  # warm-up
    times: dict[str, list[float]] = {"taylor": [], "ior": []}
    for _ in range(repeats):
        for name in times:
            times[name].append(run(name))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"taylor_ms": med["taylor"], "ior_ms": med["ior"], "ior_over_taylor": med["ior"] / med["taylor"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="gpu_check.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "exactness_max_rel_err": exactness(device),
        "compression": compression_diff(device),
        "step_times": step_times(device),
    }
    print(json.dumps(result, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
