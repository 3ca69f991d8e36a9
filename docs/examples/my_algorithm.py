"""Worked example of docs/architecture.md: a new training algorithm, ``soft_worst``.

``soft_worst`` minimises a smooth maximum of the source domains' risks,
``tau * log(mean_i exp(R_i / tau))``: the mean risk as ``tau`` grows, the worst domain's risk as
``tau`` shrinks (a soft GroupDRO without the weights' state). It has one hyper-parameter of its own,
``soft_worst_tau``, with a default and a random-search distribution (ours, not DomainBed's: it has no
such algorithm).

To ship it, copy this file to ``src/dgprune/algorithms/soft_worst.py`` and add the class to the
registry lines of ``src/dgprune/algorithms/registry.py`` (with its import)::

    for _algorithm in (ERM, CORAL, Mixup, VREx, GroupDRO, IRM, SoftWorst):

Its name is then accepted by ``pretrain.algorithm`` and ``prune.finetune_algorithm`` (any case), its
hyper-parameter by ``pretrain.hparams``, ``default_hparams`` and ``random_hparams``. Without editing the
package, a test registers it at run time: ``monkeypatch.setitem(ALGORITHMS, SoftWorst.name, SoftWorst)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from dgprune.algorithms.base import Algorithm, DomainOutput, ForwardFn, Minibatches, domain_risks
from dgprune.algorithms.hparams import HParam, LogUniform


class SoftWorst(Algorithm):
    """``tau * log(mean_i exp(R_i / tau))`` over the per-domain risks ``R_i``."""

    name = "soft_worst"
    forward_mode = "concat"  # one forward of all domains' mini-batches, split per domain afterwards
    own_hparams: ClassVar[Mapping[str, HParam]] = {
        "soft_worst_tau": HParam(1.0, LogUniform(-2, 1), "SoftWorst: temperature of the smooth maximum"),
    }

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        risks = domain_risks(outputs)
        tau = float(self.hparams["soft_worst_tau"])
        loss = tau * (torch.logsumexp(risks / tau, dim=0) - math.log(len(risks)))
        return loss, {"loss": float(loss.detach()), "worst_risk": float(risks.max().detach())}
