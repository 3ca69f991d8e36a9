"""Worked example of docs/architecture.md: a new pruning criterion, ``mean_abs_taylor``.

``mean_abs_taylor`` scores channel m by ``mean_i |c_{i,m}|``, the mean over source domains of each
domain's absolute first-order Taylor contribution ``c_{i,m} = G_{i,m} g_m`` (notation of
``dgprune.pruning.criteria``). Unlike ``taylor`` (``(mean_i c_{i,m})^2``), contributions of opposite
sign in two domains do not cancel: a channel that one domain needs and another would rather lose is
kept. With one source domain it is ``sqrt(taylor)``, so it ranks channels exactly as ``taylor`` does.

To ship it, copy ``mean_abs_taylor_scores`` into ``src/dgprune/pruning/criteria.py`` and add the
``CriterionSpec`` line to ``_SPECS`` there. Without editing the package, a test (or a notebook) can
use it through ``make_criterion`` by putting ``SPEC`` into ``REGISTRY``::

    monkeypatch.setitem(REGISTRY, SPEC.name, SPEC)
    scores = make_criterion("mean_abs_taylor").score(inputs)

(run configs validate ``prune.criterion`` against ``CRITERIA``, the names of ``_SPECS``, so a config
or a sweep accepts the name only once the spec is in ``_SPECS``).
"""

from __future__ import annotations

import torch

from dgprune.pruning.criteria import CriterionSpec, ScoreInputs, contributions


def mean_abs_taylor_scores(inputs: ScoreInputs) -> torch.Tensor:
    """[M] ``mean_i |G_{i,m} g_m|``; needs the per-domain gate gradients (``inputs.domain_grads``)."""
    return contributions(inputs).abs().mean(dim=0)


# The registry entry: the score takes (inputs, validated parameters); this criterion has no parameters,
# so it ignores the second argument (the default ``params`` model, NoParams, accepts none).
SPEC = CriterionSpec(
    "mean_abs_taylor",
    lambda inputs, _params: mean_abs_taylor_scores(inputs),
    needs_gradients=True,
)
