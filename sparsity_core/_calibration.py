"""Running data through a model for sparsifiers that need activations or gradients.

Three ways, all driven by :class:`~sparsity_core.SparsityController`:

- *dense*: every batch through the whole model once, each covered tensor's module observed (v1);
- *sequential*: block by block (``sequential="model.layers.*"``), as the reference SparseGPT and Wanda
  code does: the inputs of block ``i`` are the outputs of the blocks before it, already pruned;
  only block ``i``'s statistics exist at a time; its masks (and reconstructed weights) are applied
  before its outputs are computed for block ``i + 1``;
- *gradients*: ``loss_fn(model(inputs), targets)`` per batch, its gradients handed to
  ``observe_gradient`` (``torch.autograd.grad``: the parameters' ``.grad`` is left alone).

A batch is model inputs: a tensor (``model(x)``), a tuple (``model(*args)``) or a dict
(``model(**kwargs)``, what a Hugging Face collator yields).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ._controller import SparsityController

Sequential = str | Sequence[str]


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _patterns(sequential: Sequential) -> list[str]:
    if isinstance(sequential, str):
        return [sequential]
    patterns = list(sequential)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"sequential must be a glob or a non-empty list of module names/globs, got {sequential!r}")
    return patterns


def find_blocks(model: nn.Module, sequential: Sequential) -> list[tuple[str, nn.Module]]:
    """The modules ``sequential`` names, outermost only, in the model's order. Raises ValueError
    naming the pattern when it matches nothing."""
    from ._targets import plain_name

    patterns = _patterns(sequential)
    blocks: list[tuple[str, nn.Module]] = []
    for raw, module in model.named_modules():
        name = plain_name(raw)  # a compiled model's blocks answer to their plain names
        if not name or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if blocks and name.startswith(blocks[-1][0] + "."):
            continue  # inside a block already chosen ("layers.*" also matches "layers.0.mlp")
        blocks.append((name, module))
    if not blocks:
        children = [n for n, _ in model.named_modules() if n and n.count(".") <= 2][:12]
        raise ValueError(
            f"sequential={sequential!r} matches no module of {type(model).__name__}; module names look like "
            f"{children} (e.g. sequential='transformer.h.*' for GPT-2, 'model.layers.*' for Llama)"
        )
    return blocks


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode (like a dense calibration) and, for a Hugging Face model, no key/value cache:
    blocks are run more than once on the same inputs, and a cache would grow with every run (the
    reference SparseGPT and Wanda code turn it off too)."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache  # type: ignore[union-attr]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it wanted are captured."""


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _capture(model: nn.Module, block: nn.Module, batches: Sequence[Any]) -> list[_Call]:
    """The inputs ``block`` receives for each batch, from a forward pass stopped at the block."""
    calls: list[_Call] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(_Call(args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_model(model, batch)
            except _Stop:
                continue
            raise ValueError(f"sequential calibration: the block {type(block).__name__} was never called by the model's forward")
    finally:
        handle.remove()
    return calls


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects that cannot be compared are not the same
        return False


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _chained(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: Any) -> list[bool]:
    """For each block after the first: whether, in a dense forward of ``batch``, its first input is
    the previous block's (first) output and its other arguments are the previous block's. Where
    that holds, a block's inputs are made by running the previous block; elsewhere they are
    captured from a forward pass of the whole (partly pruned) model."""
    seen: list[tuple[_Call, Any]] = []
    handles = []
    calls: dict[int, _Call] = {}

    for i, (_, block) in enumerate(blocks):

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            calls[i] = _Call(args, kwargs)

        def post(_m: nn.Module, _args: Any, output: Any, i: int = i) -> None:
            seen.append((calls[i], output))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(blocks):
        return [False] * (len(blocks) - 1)
    chained = []
    for (prev, out), (call, _) in zip(seen, seen[1:]):
        ok = bool(call.args) and call.args[0] is _first(out)
        ok = ok and len(call.args) == len(prev.args) and all(_same(a, b) for a, b in zip(call.args[1:], prev.args[1:]))
        chained.append(ok and _same(call.kwargs, prev.kwargs))
    return chained


@contextlib.contextmanager
def _observing(controller: SparsityController, names: Iterable[str]) -> Iterator[None]:
    """Inside the block, the module owning each named tensor hands its inputs to ``observe``."""
    sparsifier = controller.sparsifier
    handles = []
    try:
        for name in names:
            module, _ = controller.owners[name]
            handles.append(module.register_forward_pre_hook(lambda mod, inputs, name=name: sparsifier.observe(name, mod, inputs)))
        yield
    finally:
        for h in handles:
            h.remove()


def dense(controller: SparsityController, batches: Iterable[Any], names: Iterable[str] | None = None) -> int:
    """Every batch through the whole model, the module of each covered tensor (or of ``names``) observed."""
    seen = 0
    with torch.no_grad(), _observing(controller, controller.tensors if names is None else names):
        for batch in batches:
            run_model(controller.calibration_model, batch)
            seen += 1
    return seen


def sequential(controller: SparsityController, batches: Sequence[Any], blocks: list[tuple[str, nn.Module]]) -> None:
    """Calibrate and prune block by block (see the module docstring); then the covered tensors
    outside every block, observed in one forward pass of the pruned model."""
    model = controller.calibration_model
    sparsifier = controller.sparsifier
    inside: dict[int, list[str]] = {i: [] for i in range(len(blocks))}
    rest: list[str] = []
    for name in controller.tensors:
        for i, (prefix, _) in enumerate(blocks):
            if name.startswith(prefix + "."):
                inside[i].append(name)
                break
        else:
            rest.append(name)
    with torch.no_grad(), _calibrating(model):
        chained = _chained(model, blocks, batches[0]) if len(blocks) > 1 else []
        calls = _capture(model, blocks[0][1], batches)
        for i, (_, block) in enumerate(blocks):
            if inside[i]:
                sparsifier.reset_calibration()
                with _observing(controller, inside[i]):
                    for call in calls:
                        block(*call.args, **call.kwargs)
                controller.update_masks(names=inside[i])
                sparsifier.reset_calibration()
            if i + 1 == len(blocks):
                break
            if chained[i]:
                calls = [_Call((_first(block(*c.args, **c.kwargs)), *c.args[1:]), c.kwargs) for c in calls]
            else:
                calls = _capture(model, blocks[i + 1][1], batches)
        del calls
        if rest:
            sparsifier.reset_calibration()
            dense(controller, batches, rest)
            controller.update_masks(names=rest)
            sparsifier.reset_calibration()


def gradients(
    controller: SparsityController, batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor]
) -> int:
    """``loss_fn(model(inputs), targets)`` for each ``(inputs, targets)`` batch; the gradients of
    the covered parameters go to ``observe_gradient`` (``.grad`` is not touched)."""
    model = controller.calibration_model
    names = [n for n in controller.tensors if controller.tensors[n].requires_grad]
    if not names:
        raise ValueError(f"sparsifier {controller.sparsifier.name!r} needs gradients, but no covered tensor requires grad")
    params = [controller.tensors[n] for n in names]
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"gradient calibration needs (inputs, targets) batches for loss_fn(model(inputs), targets); "
                    f"got a {type(batch).__name__}"
                )
            inputs, targets = batch
            loss = loss_fn(run_model(model, inputs), targets)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for name, param, grad in zip(names, params, grads):
                if grad is not None:
                    controller.sparsifier.observe_gradient(name, param, grad)
            seen += 1
    return seen
