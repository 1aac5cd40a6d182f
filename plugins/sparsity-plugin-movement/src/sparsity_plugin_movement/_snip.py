"""``snip``: SNIP, single-shot network pruning by connection sensitivity (Lee, Ajanthan & Torr,
2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity").

The sensitivity of connection ``j`` is ``|g_j * w_j|``, where ``g`` is the gradient of the loss
over the calibration data ``D`` (the derivative of the loss with respect to a multiplicative gate
on the connection, at gate 1). The paper divides by the sum over all connections, a constant that
changes no selection, so it is left out.

Over several batches this is the paper's definition applied to their union: ``g`` is the gradient
of the summed loss, the sum of the batches' gradients, and the score is ``|sum_b g_b * w|`` -- not
``sum_b |g_b * w|``, which would count gradients that cancel between batches as importance. The
running sum is kept as ``sum_b w_b * g_b`` so that it stays well defined if the weights change
between observations (in training); in one shot the weights are fixed and it is exactly
``|sum_b g_b| * |w|``.

The paper prunes once, at initialisation, before training, ranking all connections of the network
together: ``scope='global'``. The default here is the core's ``scope='layer'`` (each tensor at the
level), which cannot prune a layer away entirely, as global SNIP can at high sparsity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsity_core import ScoreSpec

from ._gradients import GradientScoreSparsifier

if TYPE_CHECKING:
    import torch


class SnipSpec(ScoreSpec):
    """SNIP takes the common score arguments (the paper's ranking is ``scope='global'``)."""


class Snip(GradientScoreSparsifier):
    """SNIP (Lee et al. 2019): prune by connection sensitivity |g * w|, g the loss gradient over the calibration batches."""

    name = "snip"
    Spec = SnipSpec
    spec: SnipSpec

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.accumulated(name, tensor).abs()
