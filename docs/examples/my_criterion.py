"""Worked example of docs/architecture.md: a new pruning criterion, ``mean_abs_taylor``.

``mean_abs_taylor`` scores channel m by ``mean_i |c_{i,m}|``, the mean over source domains of each
domain's absolute first-order Taylor contribution ``c_{i,m} = G_{i,m} g_m`` (notation of
``dgprune.pruning.criteria``). Unlike ``taylor`` (``(mean_i c_{i,m})^2``), contributions of opposite
sign in two domains do not cancel: a channel that one domain needs and another would rather lose is
kept. With one source domain it is ``sqrt(taylor)``, so it ranks channels exactly as ``taylor`` does.

To ship it, copy this file to ``src/dgprune/pruning/mean_abs_taylor.py`` and add its one registry
line to ``_SPECS`` in ``src/dgprune/pruning/criteria.py`` (with the import of the module)::

    mean_abs_taylor.SPEC,

Without editing the package, a test (or a notebook) registers it at run time; it is then accepted
wherever a criterion is named (``prune.criterion`` in configs and sweeps run in this process,
``make_criterion``...)::

    monkeypatch.setitem(REGISTRY, SPEC.name, SPEC)  # or REGISTRY.register(SPEC.name, SPEC)
    scores = make_criterion("mean_abs_taylor").score(inputs)
"""

from __future__ import annotations

import torch

from dgprune.pruning.criterion_spec import CriterionSpec, ScoreInputs, contributions, plain


def mean_abs_taylor_scores(inputs: ScoreInputs) -> torch.Tensor:
    """[M] ``mean_i |G_{i,m} g_m|``; needs the per-domain gate gradients (``inputs.domain_grads``)."""
    return contributions(inputs).abs().mean(dim=0)


# The registry entry: the score takes (inputs, validated parameters); ``plain`` adapts a score function
# without parameters (the default ``params`` model, NoParams, accepts none).
SPEC = CriterionSpec("mean_abs_taylor", plain(mean_abs_taylor_scores), needs_gradients=True)
