"""What ``movement`` and ``snip`` share: one float32 accumulator of ``weight * gradient`` per tensor.

The core delivers ``(name, parameter, gradient)`` through ``observe_gradient``; each class says how
its score is read from the running sum ``sum_t W_t * g_t`` (movement: its negation; snip: its
absolute value). Summing the product per observation, not the gradient alone, keeps each gradient
paired with the weight it was taken at, which matters in training where the weights move.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sparsity_core import Capabilities, ScoreSparsifier

if TYPE_CHECKING:
    # torch is imported where it is used: discovery (`sparsity list`) must not pay for it.
    import torch


def how_to_give_gradients(sparsifier: str) -> str:
    """The part of an error message that says where gradients come from."""
    return (
        f"In training, use the Lightning callback TrainingAwareSparsity({sparsifier!r}, ...) or, in "
        f"plain PyTorch, SparsityController(model, {sparsifier!r}, ...).attach(optimizer), which "
        f"delivers each step's gradients before the update. One-shot, pass (inputs, targets) batches "
        f"and a loss: sparsify(model, {sparsifier!r}, args, calibration=[(x, y), ...], "
        f"loss_fn=torch.nn.functional.cross_entropy)."
    )


class GradientScoreSparsifier(ScoreSparsifier):
    """A score sparsifier fed by gradients: keeps ``sum_t W_t * g_t`` per covered tensor."""

    capabilities: ClassVar[Capabilities] = Capabilities(gradients=True)

    def __init__(self, spec: Any = None, /, **fields: Any) -> None:
        super().__init__(spec, **fields)
        self._sums: dict[str, torch.Tensor] = {}
        #: Observations per name since the last reset (for reports and tests).
        self.observed: dict[str, int] = {}

    # -- gradients ---------------------------------------------------------------------------
    def reset_calibration(self) -> None:
        self._sums.clear()
        self.observed.clear()

    def observe_gradient(self, name: str, tensor: torch.Tensor, grad: torch.Tensor | None) -> None:
        import torch

        if grad is None:
            # A parameter the loss does not reach (an unused layer) has no gradient: it did not move.
            grad = torch.zeros_like(tensor)
        if grad.shape != tensor.shape:
            raise ValueError(
                f"{self.name}: the gradient of {name!r} has shape {tuple(grad.shape)}, but the tensor has "
                f"{tuple(tensor.shape)}; observe_gradient needs the gradient of that very tensor"
            )
        with torch.no_grad():
            total = self._sums.get(name)
            if total is None:
                total = self._sums[name] = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
            elif total.shape != tensor.shape:
                raise ValueError(
                    f"{self.name}: {name!r} now has shape {tuple(tensor.shape)}, but its earlier gradients "
                    f"had {tuple(total.shape)}; call reset_calibration() before observing another tensor "
                    f"under that name"
                )
            grad = grad.detach()
            # An fp16 overflow step (inf or NaN gradient, skipped by a GradScaler) must not poison
            # the sum for the rest of training; its finite elements are real gradients, kept. On
            # an accelerator the zeroing always runs (memory-bound, and no host sync); on CPU,
            # where it is slow, only when the gradient's sum says there is something to zero.
            if grad.device.type != "cpu" or not bool(torch.isfinite(grad.sum())):
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            # One pass, multiplied in float32 (the sum's dtype) whatever the parameter's dtype.
            total.addcmul_(tensor.detach().to(total.device), grad.to(total.device))
        self.observed[name] = self.observed.get(name, 0) + 1

    def accumulated(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``sum_t W_t * g_t`` for ``name`` (float32, on ``tensor``'s device); raises when no
        gradient was observed or the shapes differ."""
        total = self._sums.get(name)
        if total is None:
            seen = sorted(self._sums)
            raise RuntimeError(
                f"{self.name} has no gradients for {name!r}: it needs gradients (capabilities.gradients) "
                f"and none were observed for this tensor"
                + (
                    f" (gradients were observed for {len(seen)} others, e.g. {seen[:3]}; a frozen parameter, "
                    f"requires_grad=False, or one the loss does not reach never gets one: exclude it)"
                    if seen
                    else ""
                )
                + ". "
                + how_to_give_gradients(self.name)
            )
        if total.shape != tensor.shape:
            raise ValueError(
                f"{self.name}: {name!r} has shape {tuple(tensor.shape)}, but its gradients were observed "
                f"with shape {tuple(total.shape)}"
            )
        return total.to(tensor.device)

    # -- state: the sums are the sparsifier's memory of training -----------------------------
    def state_dict(self) -> dict[str, Any]:
        """The accumulated sums (float32 tensors) and observation counts; ``torch.save``-able and
        loadable with ``weights_only=True``. Without them a resumed run starts its scores afresh."""
        return {"sums": dict(self._sums), "observed": dict(self.observed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        sums = state.get("sums")
        if not isinstance(sums, dict) or not all(isinstance(t, torch.Tensor) for t in sums.values()):
            raise ValueError(f"{self.name}: state must hold 'sums', a dict of name -> tensor; got {type(sums).__name__}")
        self._sums = {n: t.detach().to(torch.float32).clone() for n, t in sums.items()}
        self.observed = {n: int(c) for n, c in state.get("observed", {}).items()}
