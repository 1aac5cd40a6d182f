"""The functional API: list, create, sparsify, plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ._base import Scheduler, Sparsifier
from ._registry import Kind, PluginInfo, get_registry

if TYPE_CHECKING:
    from ._report import SparsityReport

_BASES: dict[Kind, type] = {"sparsifier": Sparsifier, "scheduler": Scheduler}
Args = Mapping[str, Any] | BaseModel | None


def list_sparsifiers() -> list[str]:
    """Sorted names of every available sparsifier (qualified where a short name is ambiguous)."""
    return get_registry().names("sparsifier")


def list_schedulers() -> list[str]:
    """Sorted names of every available scheduler (qualified where a short name is ambiguous)."""
    return get_registry().names("scheduler")


def plugins() -> list[PluginInfo]:
    """What discovery found: each plugin's name, distribution, version, status, names and error."""
    return get_registry().plugins()


def resolve_class(kind: Kind, name_or_class: str | type) -> type:
    """A registered class by short or qualified name, or a local (unregistered) class as is."""
    base = _BASES[kind]
    if isinstance(name_or_class, type):
        if not issubclass(name_or_class, base):
            raise TypeError(f"{name_or_class.__qualname__} is not a sparsity_core.{base.__name__} subclass")
        return name_or_class
    return get_registry().get(kind, name_or_class).cls


def _create(kind: Kind, obj: str | type | Any, args: Args) -> Any:
    base = _BASES[kind]
    if isinstance(obj, base):
        if args is not None:
            raise TypeError(f"pass either a configured {kind} instance or arguments, not both")
        return obj
    return resolve_class(kind, obj)(args)


def create_sparsifier(name: str | type[Sparsifier] | Sparsifier, args: Args = None) -> Sparsifier:
    """A configured sparsifier, from a short or qualified name or a class (a configured instance
    is returned as is). ``args``: a dict or a spec instance; invalid ones raise pydantic's
    ``ValidationError`` naming the implementation, the field and the rule."""
    return _create("sparsifier", name, args)


def create_scheduler(name: str | type[Scheduler] | Scheduler, args: Args = None) -> Scheduler:
    """A configured scheduler (see :func:`create_sparsifier`)."""
    return _create("scheduler", name, args)


def sparsify(
    target: Any,
    sparsifier: str | type[Sparsifier] | Sparsifier,
    args: Args = None,
    *,
    calibration: Iterable[Any] | None = None,
    sequential: str | Sequence[str] | None = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
) -> SparsityReport:
    """Sparsify ``target`` (an ``nn.Module`` or a mapping of names to tensors) once, in place.

    ``calibration``: batches for sparsifiers that need data. Each is model inputs (a tensor, a
    tuple of positional inputs, or a dict of keyword inputs, ``model(**batch)``) for sparsifiers
    that need activations; ``(inputs, targets)`` with ``loss_fn(model(inputs), targets)`` for those
    that need gradients. ``sequential``: a glob or list of block module names
    (``"transformer.h.*"``, ``"model.layers.*"``): calibrate and prune one block at a time on the
    outputs of the blocks already pruned, holding one block's statistics.
    Returns the per-name and overall sparsity of the covered tensors (prints as a table).
    """
    from ._controller import SparsityController

    controller = SparsityController(target, sparsifier, args, sequential=sequential)
    caps = controller.sparsifier.capabilities
    if (caps.calibration or caps.gradients) and calibration is None:
        need = "activations: pass calibration=batches of model inputs" if caps.calibration else (
            "gradients: pass calibration=[(inputs, targets), ...] and loss_fn=..."
        )
        raise ValueError(f"sparsifier {controller.sparsifier.name!r} needs {need}")
    if calibration is not None:
        if controller.calibrate(calibration, loss_fn=loss_fn) == 0 and (caps.calibration or caps.gradients):
            raise ValueError(f"sparsifier {controller.sparsifier.name!r} needs calibration data, but calibration= was empty")
    elif loss_fn is not None:
        raise ValueError("loss_fn= needs calibration=[(inputs, targets), ...] batches")
    controller._hold_masks = False  # each mask is dropped as soon as it is applied: none is held at the end
    controller.step()
    controller._squash(trust_masked=True)  # nothing ran since the masks were applied
    return controller.report()
