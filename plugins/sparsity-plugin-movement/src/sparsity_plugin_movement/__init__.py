"""Gradient-based sparsifiers for sparsity-core: ``movement`` and ``snip``.

Both accumulate, per element of each covered weight, a product of the weight and its gradient,
delivered by the core through :meth:`~sparsity_core.Sparsifier.observe_gradient` (in training once
per optimizer step; one-shot once per ``(inputs, targets)`` batch of ``sparsify(..., loss_fn=...)``)
and hand it to the core as a score, so patterns, scopes, N:M and nested masks come from the core.

- ``movement`` (Sanh, Wolf & Rush, 2020): ``S = -sum_t W_t * dL/dW_t``, gradual, during training.
- ``snip`` (Lee, Ajanthan & Torr, 2019): ``|g * W|`` with ``g`` the gradient of the loss over the
  calibration batches, one shot, usually at initialisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsity_core import hookimpl

from ._movement import Movement, MovementSpec
from ._snip import Snip, SnipSpec

SPARSITY_CORE_API = 2

__all__ = ["Movement", "MovementSpec", "Snip", "SnipSpec", "register_sparsifiers"]


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    register(Movement)
    register(Snip)
