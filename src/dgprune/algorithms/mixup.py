"""Inter-domain Mixup (Xu et al. 2020; Yan et al. 2020), as DomainBed implements it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dgprune.algorithms.base import Algorithm, DomainOutput, ForwardFn, Minibatches
from dgprune.algorithms.hparams import HParam, LogUniform


class Mixup(Algorithm):
    """For each pair (i, j) of domains: x = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha), loss +=
    lam CE(f(x), y_i) + (1 - lam) CE(f(x), y_j); the sum is divided by the number of pairs.

    The pairing and lam come from a NumPy generator owned by the algorithm (seeded by the ``seed``
    hyper-parameter, saved in ``state_dict``), so a resumed run draws what an uninterrupted one would.
    """

    name = "mixup"
    forward_mode = "none"  # the per-domain outputs are not used: only mixed inputs are forwarded
    own_hparams: ClassVar[Mapping[str, HParam]] = {
        "mixup_alpha": HParam(0.2, LogUniform(-1, 1), "Mixup: lambda ~ Beta(alpha, alpha)"),
        "mixup_fixed_lambda": HParam(
            None, None, "Mixup: use this lambda instead of drawing one (tests, ablations); None = draw"
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(self.hparams["seed"])

    def pairs(self, num_domains: int) -> list[tuple[int, int]]:
        """DomainBed's ``random_pairs_of_minibatches``: a random permutation p, domain p[k] paired with
        p[k + 1 mod N]. Override to fix the pairing."""
        perm = self.rng.permutation(num_domains).tolist()
        return [(perm[k], perm[(k + 1) % num_domains]) for k in range(num_domains)]

    def mixing_weight(self) -> float:
        fixed = self.hparams["mixup_fixed_lambda"]
        if fixed is not None:
            return float(fixed)
        alpha = self.hparams["mixup_alpha"]
        return float(self.rng.beta(alpha, alpha))

    def objective(
        self, outputs: list[DomainOutput], minibatches: Minibatches, forward: ForwardFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Ignores ``outputs``; forwards the mixed inputs with ``forward``. Advances the generator."""
        pairs = self.pairs(len(minibatches))
        terms = []
        for i, j in pairs:  # pairing first, then one lam per pair: DomainBed's order of draws
            lam = self.mixing_weight()
            (xi, yi), (xj, yj) = minibatches[i], minibatches[j]
            n = min(len(yi), len(yj))  # DomainBed truncates both to the smaller batch
            logits, _ = forward(lam * xi[:n] + (1 - lam) * xj[:n])
            terms.append(lam * F.cross_entropy(logits, yi[:n]) + (1 - lam) * F.cross_entropy(logits, yj[:n]))
        loss = torch.stack(terms).sum() / len(pairs)
        return loss, {"loss": float(loss.detach())}

    def _extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state["rng"])
