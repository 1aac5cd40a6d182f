"""``movement``: movement pruning (Sanh, Wolf & Rush, 2020, "Movement Pruning: Adaptive Sparsity
by Fine-Tuning"), the hard (top-v) variant with the first-order score.

Magnitude pruning keeps the weights that are far from zero; movement pruning keeps the weights that
*move away* from zero during training. The paper's score of ``W[i, j]`` after ``T`` steps is
``S = -sum_t W_t[i, j] * dL/dW[i, j]_t`` (up to the score learning rate, a constant factor that no
selection sees): a step that pulls a positive weight down (positive gradient) lowers it, one that
pushes it up raises it. The highest scores are kept, so a large weight that training keeps
shrinking is pruned before a small one that keeps growing.

It is gradual and made for training: pair it with a schedule (the paper uses a cubic one from
dense to the final level) so that masks are recomputed from the scores as training goes on.

Differences from the paper's code, on purpose:
- Pruned weights are zero here (the core zeroes them), so their score stops changing; the paper
  keeps them dense behind the mask and still updates their scores through a straight-through
  estimator. With the core's nested masks a pruned weight never comes back either way, so the
  masks differ only in which still-kept weights are pruned next, through scores that, in the
  paper, keep moving.
- Scores are summed in float32 directly from the gradients (no score learning rate, no
  optimizer on the scores): the first-order form the paper derives.
- The paper's soft movement (a threshold on the scores and a regulariser in the loss) is not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsity_core import ScoreSpec

from ._gradients import GradientScoreSparsifier

if TYPE_CHECKING:
    import torch


class MovementSpec(ScoreSpec):
    """Movement pruning takes the common score arguments; its schedule is the controller's (pair it
    with ``scheduler='cubic'`` as the paper does)."""


class Movement(GradientScoreSparsifier):
    """Movement pruning (Sanh et al. 2020): keep the weights moving away from zero, S = -sum_t W_t * dL/dW_t."""

    name = "movement"
    Spec = MovementSpec
    spec: MovementSpec

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # A copy: the core may write -inf into the scores it is given (nested masks).
        return self.accumulated(name, tensor).neg()
