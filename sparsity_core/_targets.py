"""What can be sparsified: an ``nn.Module``'s parameters or a mapping of named tensors.

One entry per *tensor*, whatever the number of names it answers to: tied weights (GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``; a ``state_dict`` holding both) are covered once,
under their first name, and every rule (include, exclude, overrides) matches any of their names.

Default coverage (``include`` unset) of a module: the weights of the matmul/conv layer kinds
(:mod:`._layers`), not embeddings (lookups), norms, biases or position tables, and not an output
head: a weight tied to an embedding, or the module a Hugging Face model declares as its output
embeddings (``get_output_embeddings()``, the LM head, tied or not). Of a mapping: every tensor.
Either way narrowed to the sparsifier's ``capabilities.layer_kinds`` / ``tensor_ranks``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._layers import TensorLayout, generic_layout, layer_kinds, layout_of


@dataclass
class Selection:
    """The tensors a sparsifier covers in a target, one entry per tensor (canonical name), with
    what the controller needs to know of each: its layout (layer kind and orientation), its owner
    module and attribute (for calibration hooks), and every name it answers to (tied weights)."""

    tensors: dict[str, torch.Tensor]
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    owners: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class _Entry:
    """One tensor of a target and all its names (canonical first), each name's layout and owner."""

    tensor: torch.Tensor
    names: list[str]
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    owners: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    head: bool = False  # a name is owned by a model's declared output embeddings

    @property
    def name(self) -> str:
        return self.names[0]

    def main(self) -> str:
        """The name whose layout and owner stand for the tensor: the first one that is a matmul
        weight (a tied head is the head's Linear, whose inputs are activations), else the first
        one with a layer kind, else the canonical name."""
        for test in (lambda lay: lay.matmul, lambda lay: lay.kind is not None):
            for n in self.names:
                lay = self.layouts.get(n)
                if lay is not None and test(lay):
                    return n
        return self.name

    def layout(self) -> TensorLayout:
        return self.layouts.get(self.main(), generic_layout())

    def by_default(self) -> bool:
        """A matmul/conv weight, not tied to a lookup, not a declared output head."""
        lays = [self.layouts[n] for n in self.names if n in self.layouts]
        return (
            any(lay.matmul for lay in lays)
            and not any(lay.kind is not None and not lay.matmul for lay in lays)
            and not self.head
        )


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Tensors with one key are one tensor: same memory, shape, strides and dtype. Tensors
    without real memory (meta, empty, lazy, wrapper subclasses such as DTensor) are only
    themselves (the controller then refuses those it cannot mask, naming them)."""
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return ("object", id(t))
    try:
        # a wrapper subclass (DTensor) answers data_ptr() with 0: two such tensors of one shape
        # are not one tensor (FSDP2's same-shaped layers would be taken as tied)
        if t.device.type != "meta" and t.numel() > 0 and t.layout == torch.strided and t.data_ptr() != 0:
            return ("memory", t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
    except (RuntimeError, NotImplementedError, ValueError):
        pass
    return ("object", id(t))


def _group(named: list[tuple[str, torch.Tensor]]) -> list[_Entry]:
    entries: dict[tuple[Any, ...], _Entry] = {}
    by_id: dict[int, tuple[Any, ...]] = {}
    for name, t in named:
        key = by_id.get(id(t)) or _storage_key(t)
        by_id[id(t)] = key
        entry = entries.get(key)
        if entry is None:
            entries[key] = _Entry(t, [name])
        elif name not in entry.names:
            entry.names.append(name)
    return list(entries.values())


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the modules that Hugging Face models in ``model`` declare as output embeddings."""
    heads = set()
    for module in model.modules():
        getter = getattr(type(module), "get_output_embeddings", None)
        if not callable(getter):
            continue
        try:
            head = module.get_output_embeddings()  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - a model that cannot say has no declared head
            continue
        if isinstance(head, nn.Module):
            heads.add(id(head))
    return heads


_COMPILED = "_orig_mod"


def plain_name(name: str) -> str:
    """A name without the ``_orig_mod`` segments ``torch.compile`` inserts (``_orig_mod.0.weight``
    and ``block._orig_mod.fc.weight`` are ``0.weight`` and ``block.fc.weight``), so patterns
    written for the model keep matching its compiled form."""
    if _COMPILED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def _reparametrized(model: nn.Module, kinds: Any) -> list[tuple[str, str]]:
    """Layers of a known kind whose weight is computed from other tensors (``torch.nn.utils.
    parametrize``, ``weight_norm``, ``spectral_norm``, ``torch.nn.utils.prune``): (layer name, how)."""
    from torch.nn.utils import parametrize

    found = []
    for prefix, module in model.named_modules():
        if layout_of(module, "weight", kinds).kind is None:
            continue
        if parametrize.is_parametrized(module, "weight"):
            chain = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])  # type: ignore[index]
            found.append((plain_name(prefix), f"its weight is parametrized ({chain}): the values live in "
                          f"'{plain_name(prefix)}.parametrizations.weight.original*'"))
        elif "weight_orig" in module._parameters and hasattr(module, "weight_mask"):
            found.append((plain_name(prefix), f"torch.nn.utils.prune reparametrized its weight: the values live in "
                          f"'{plain_name(prefix)}.weight_orig'"))
    return found


def _module_entries(model: nn.Module) -> list[_Entry]:
    kinds = layer_kinds()
    named: list[tuple[str, torch.Tensor]] = []
    info: dict[str, tuple[nn.Module, str, TensorLayout]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None:
                continue
            name = plain_name(f"{prefix}.{attr}" if prefix else attr)
            named.append((name, param))
            info[name] = (module, attr, layout_of(module, attr, kinds))
    heads = _output_heads(model)
    entries = _group(named)
    for entry in entries:
        for n in entry.names:
            module, attr, lay = info[n]
            entry.owners[n] = (module, attr)
            entry.layouts[n] = lay
            entry.head = entry.head or id(module) in heads
    return entries


def _entries(target: Any) -> list[_Entry]:
    if isinstance(target, nn.Module):
        return _module_entries(target)
    if isinstance(target, Mapping):
        bad = [k for k, v in target.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"a mapping target must map str names to tensors; bad entries: {bad[:5]}")
        return _group(list(target.items()))
    raise TypeError(
        f"target must be an nn.Module or a mapping of names to tensors, got {type(target).__name__}"
    )


def named_tensors(target: Any) -> tuple[dict[str, torch.Tensor], Callable[[str], bool] | None]:
    """The tensors of ``target`` by canonical name (tied weights once), and the default-coverage
    rule (None: every tensor). The v1 pair that ``Sparsifier.covers(names, default)`` takes."""
    entries = _entries(target)
    tensors = {e.name: e.tensor for e in entries}
    if not isinstance(target, nn.Module):
        return tensors, None
    default = {e.name for e in entries if e.by_default()}
    return tensors, default.__contains__


def _describe(entry: _Entry) -> str:
    main = entry.main()
    owner = entry.owners.get(main)
    kind = entry.layout().kind
    what = f"{type(owner[0]).__name__}, " if owner is not None else ""
    what += f"layer kind {kind!r}" if kind is not None else "no layer kind"
    also = f", also named {entry.names[1:]}" if len(entry.names) > 1 else ""
    return f"{entry.name!r} ({what}, rank {entry.tensor.dim()}{also})"


def _outside(caps: Any, entry: _Entry) -> str | None:
    """Why ``entry`` is outside the sparsifier's layer kinds / tensor ranks (None: inside)."""
    kind = entry.layout().kind
    if caps.layer_kinds is not None and kind not in caps.layer_kinds:
        return f"it supports layer kinds {sorted(caps.layer_kinds)} (capabilities.layer_kinds)"
    if caps.tensor_ranks is not None and entry.tensor.dim() not in caps.tensor_ranks:
        return f"it supports tensors of rank {sorted(caps.tensor_ranks)} (capabilities.tensor_ranks)"
    return None


def select_tensors(target: Any, sparsifier: Any) -> Selection:
    """The tensors of ``target`` that ``sparsifier`` covers, with their layouts, owners and aliases.

    Raises ValueError naming the rule when nothing is covered, when rules for the names of one
    tied tensor disagree, or when an explicitly included tensor is outside the sparsifier's
    ``capabilities.layer_kinds`` / ``tensor_ranks``."""
    entries = _entries(target)
    is_module = isinstance(target, nn.Module)
    by_name = {e.name: e for e in entries}
    aliases = {e.name: tuple(e.names) for e in entries}
    kinds = {n: e.layouts[n].kind if n in e.layouts else None for e in entries for n in e.names}
    default = (lambda name: by_name[name].by_default()) if is_module else None
    names = sparsifier.covers(list(by_name), default, kinds=kinds, aliases=aliases)

    caps = sparsifier.capabilities
    spec = sparsifier.spec
    _check_patterns_match(sparsifier, [n for e in entries for n in e.names], kinds)
    if is_module and spec.include is None:
        for layer, why in _reparametrized(target, layer_kinds()):
            if not any(sparsifier.excludes(f"{layer}.{attr}", kinds) for attr in ("weight", "weight_orig")):
                raise ValueError(
                    f"layer {layer!r} ({type(target.get_submodule(layer) if layer else target).__name__}) cannot be "
                    f"covered by default: {why}. Remove the reparametrization first (torch.nn.utils.parametrize."
                    f"remove_parametrizations / torch.nn.utils.prune.remove), include that tensor explicitly, or "
                    f"exclude the layer (exclude=['{layer}.*'])"
                )
    chosen, dropped = [], []
    for name in names:
        entry = by_name[name]
        why = _outside(caps, entry)
        if why is None:
            chosen.append(name)
        elif spec.include is None:
            dropped.append((entry, why))  # the default narrows to what the sparsifier supports
        else:
            raise ValueError(
                f"sparsifier {sparsifier.name!r} cannot sparsify {_describe(entry)}: {why}; "
                f"include={spec.include} takes it. Narrow include (e.g. a layer-kind selector such as "
                f"'linear:*') or exclude it"
            )
    if not chosen:
        rule = f"include={spec.include}" if spec.include is not None else (
            "the default (the weights of matmul/conv layers: Linear, Conv, MultiheadAttention, transformers' "
            "Conv1D; not embeddings, norms, biases or an output head)" if is_module else "the default (every tensor)"
        )
        note = ""
        if dropped:
            entry, why = dropped[0]
            note = f"; {len(dropped)} tensor(s) left out as outside what it supports, e.g. {_describe(entry)}: {why}"
        raise ValueError(
            f"sparsifier {sparsifier.name!r} covers no tensor: {rule} with exclude={spec.exclude} "
            f"matched nothing among {len(entries)} tensors (e.g. {list(by_name)[:5]}){note}"
        )
    selection = Selection({n: by_name[n].tensor for n in chosen})
    for name in chosen:
        entry = by_name[name]
        if is_module:
            main = entry.main()
            selection.owners[name] = entry.owners[main]
            selection.layouts[name] = entry.layouts[main]
        selection.aliases[name] = aliases[name]
    return selection


def _check_patterns_match(sparsifier: Any, names: list[str], kinds: Mapping[str, str | None]) -> None:
    """An ``exclude`` or ``overrides`` pattern that matches no name of the target is a typo until
    proven otherwise (a misspelt exclude once pruned half of an output layer): refuse it, with the
    closest names."""
    import difflib

    from ._layers import parse_selector

    spec = sparsifier.spec
    for field_name, patterns in (("exclude", list(spec.exclude)), ("overrides", list(spec.overrides))):
        for pattern in patterns:
            rule = parse_selector(pattern, f"{field_name} pattern")
            if any(rule.matches(n, kinds.get(n)) for n in names):
                continue
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"sparsifier {sparsifier.name!r}: {field_name} pattern {pattern!r} matches no tensor name "
                f"of the target{hint} (names look like {names[:4]})"
            )


def owner_modules(target: Any, names: list[str]) -> dict[str, nn.Module]:
    """For a module target: the submodule that owns each named parameter (for calibration hooks)."""
    if not isinstance(target, nn.Module):
        return {}
    owners = {}
    for name in names:
        prefix, _, _ = name.rpartition(".")
        owners[name] = target.get_submodule(prefix) if prefix else target
    return owners

