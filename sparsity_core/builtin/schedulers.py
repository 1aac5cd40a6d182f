"""Built-in schedulers: pure functions of progress ``t`` and the group's final level."""

from __future__ import annotations

import math

from pydantic import Field

from .._base import Scheduler
from .._specs import SchedulerSpec


class Constant(Scheduler):
    """The final level from `start` on (nothing before)."""

    name = "constant"

    def level_at(self, t: float, final_level: float) -> float:
        return final_level if t >= self.spec.start else 0.0


class Linear(Scheduler):
    """Rise linearly from 0 at `start` to the final level at `end`."""

    name = "linear"

    def level_at(self, t: float, final_level: float) -> float:
        return final_level * self.progress(t)


class Cubic(Scheduler):
    """Zhu & Gupta (2017): final * (1 - (1 - p)^3), fast at first, gentle near the end."""

    name = "cubic"

    def level_at(self, t: float, final_level: float) -> float:
        if t < self.spec.start:
            return 0.0
        return final_level * (1.0 - (1.0 - self.progress(t)) ** 3)


class StepSpec(SchedulerSpec):
    initial_level: float = Field(0.1, ge=0.0, le=1.0, description="Level at `start`.")
    gamma: float = Field(2.0, gt=0.0, description="Factor applied to the level every `step_size`.")
    step_size: float = Field(1, gt=0, description="Progress (in `unit`) between two multiplications.")


class Step(Scheduler):
    """The seed's StepSL, bounded: initial_level * gamma^k every step_size, the final level from `end` on.

    Between `start` and `end` the level multiplies by `gamma` every `step_size` and never rises
    above the final level (the seed's grew without bound: 0.5 -> 16.0); from `end` on it is the
    final level, as for every scheduler. Set `end` to give the steps room (its default, `start`,
    makes this a constant schedule).
    """

    name = "step"
    Spec = StepSpec
    spec: StepSpec

    def level_at(self, t: float, final_level: float) -> float:
        spec = self.spec
        if t < spec.start:
            return 0.0
        if spec.end is not None and t >= spec.end:
            return final_level
        if spec.initial_level <= 0:
            return 0.0
        k = math.floor((t - spec.start) / spec.step_size + 1e-9)
        # The product itself, not exp(log(...)): that is off by ulps (0.1 -> 0.10000000000000002),
        # and a level a hair above a block boundary prunes one more block. The logarithm only
        # tells when the level is past 1 (so past any final level) before gamma ** k overflows.
        if math.log(spec.initial_level) + k * math.log(spec.gamma) > 1.0:
            return final_level
        try:
            return min(final_level, spec.initial_level * spec.gamma**k)
        except OverflowError:  # a denormal initial_level times a huge gamma ** k; still below e
            return min(final_level, math.exp(math.log(spec.initial_level) + k * math.log(spec.gamma)))


BUILTIN_SCHEDULERS = [Constant, Linear, Cubic, Step]
