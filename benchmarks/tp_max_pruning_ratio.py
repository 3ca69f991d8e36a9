"""Layer widths after Torch-Pruning's global ranking with dgprune's DomainImportance, with and without
``max_pruning_ratio`` (docs/torch_pruning.md, "Known differences").

A torchvision ResNet-18 (random weights, 7 classes) at 32 px, three synthetic source domains (Gaussian
images shifted by the domain's index, random labels), IoR, ``MetaPruner(global_pruning=True,
pruning_ratio=0.5)``, 3 training steps between pruning steps. Prints each block's first conv and each
stage's width, and the pruned model's MACs and parameters.

    python benchmarks/tp_max_pruning_ratio.py
"""

from __future__ import annotations

import torch
import torch_pruning as tp
import torchvision

from dgprune.integrations.torch_pruning import DomainImportance

SHOWN = ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.1.conv1", "layer3.0.conv1", "layer3.1.conv1",
         "layer4.0.conv1", "layer4.1.conv1", "layer2.0.downsample.0", "layer3.0.downsample.0",
         "layer4.0.downsample.0")  # fmt: skip


def prune(max_ratio: float | None, steps: int) -> tuple[dict[str, int], float, float]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7)
    x = torch.zeros(1, 3, 32, 32)
    importance = DomainImportance(model, x, criterion="ior")
    limit = {} if max_ratio is None else {"max_pruning_ratio": max_ratio}
    pruner = tp.pruner.MetaPruner(
        model, x, importance, global_pruning=True, pruning_ratio=0.5, iterative_steps=steps,
        ignored_layers=[model.fc], **limit,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            batches = [
                (
                    torch.randn(8, 3, 32, 32, generator=generator) + d,
                    torch.randint(0, 7, (8,), generator=generator),
                )
                for d in range(3)
            ]
            importance.update(batches)
            optimizer.step()
        pruner.step()
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    macs, params = tp.utils.count_ops_and_params(model, x)
    return widths, macs, params


def main() -> None:
    dense = {
        n: m.out_channels
        for n, m in torchvision.models.resnet18().named_modules()
        if isinstance(m, torch.nn.Conv2d)
    }
    for max_ratio, steps in ((None, 2), (0.9, 2), (0.9, 5)):
        widths, macs, params = prune(max_ratio, steps)
        print(f"max_pruning_ratio={max_ratio} iterative_steps={steps}: params {params:.0f}, MACs {macs:.0f}")
        print("  " + ", ".join(f"{name} {widths[name]}/{dense[name]}" for name in SHOWN))


if __name__ == "__main__":
    main()
