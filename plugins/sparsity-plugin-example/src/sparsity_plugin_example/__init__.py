"""The smallest complete sparsity-core plugin: one sparsifier and one scheduler.

Copy this distribution (or run ``sparsity new-plugin NAME``) to start your own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import Field

from sparsity_core import Scheduler, SchedulerSpec, ScoreSparsifier, ScoreSpec, hookimpl

#: The sparsity-core plugin API this module targets; another major API refuses to load it.
SPARSITY_CORE_API = 1


class RowRelativeSpec(ScoreSpec):
    eps: float = Field(1e-12, gt=0, description="Added to each row's mean |w| so that an all-zero row scores 0, not NaN.")


class RowRelative(ScoreSparsifier):
    """Prune weights that are small relative to their output row's mean |w|."""

    name = "row_relative"
    Spec = RowRelativeSpec
    spec: RowRelativeSpec

    def score(self, name: str, tensor: Any) -> Any:
        # Only the score: the core selects the mask for every pattern (unstructured, 1x4, 2:4)
        # and scope (layer, global), applies it, saves it, and reports.
        w = tensor.abs().float()
        rows = w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)
        return (rows / (rows.mean(dim=1, keepdim=True) + self.spec.eps)).view(w.shape)


class ExponentialSpec(SchedulerSpec):
    rate: float = Field(4.0, gt=0, description="How front-loaded the schedule is: larger rises faster at first.")


class Exponential(Scheduler):
    """Rise from 0 at `start` to the final level at `end` along 1 - exp(-rate * progress), normalised."""

    name = "exponential"
    Spec = ExponentialSpec
    spec: ExponentialSpec

    def level_at(self, t: float, final_level: float) -> float:
        if t < self.spec.start:
            return 0.0
        rate = self.spec.rate
        return final_level * (1.0 - math.exp(-rate * self.progress(t))) / (1.0 - math.exp(-rate))


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    register(RowRelative)


@hookimpl
def register_schedulers(register: Callable[[type[Any]], None]) -> None:
    register(Exponential)
