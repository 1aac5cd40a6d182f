"""The ``sparsity`` command: ``plugins``, ``list``, ``show NAME`` (each with ``--json``), ``new-plugin``,
``inspect PATH``.

It never imports torch to list or show: the registry, specs and base classes are torch-free.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ._errors import AmbiguousNameError, PluginLoadError, UnknownNameError
from ._registry import Implementation, Kind, get_registry
from ._version import API_VERSION, __version__

KINDS: tuple[Kind, ...] = ("sparsifier", "scheduler")


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=False)


def _table(title: str, columns: Sequence[str]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _kernels() -> str:
    """Which kernels the engine's hottest loops run on (found without importing torch): the compiled
    ones (``_engine/_bitkernels.c``, built at install when a C compiler was there) or NumPy."""
    from . import _clib

    lib = _clib.load()
    if lib is None:
        return "NumPy kernels (the compiled ones were not built or do not load: no C compiler at install?)"
    return "compiled kernels, AVX2" if lib.sc_simd() else "compiled kernels, portable C"


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


def _field_rows(spec: type[BaseModel]) -> list[dict[str, Any]]:
    rows = []
    for name, field in spec.model_fields.items():
        if field.default_factory is not None:
            default: Any = field.default_factory()  # type: ignore[call-arg]
        elif field.default is PydanticUndefined:
            default = "(required)"
        else:
            default = field.default
        annotation = field.annotation
        # list[str] passes isinstance(..., type); only a plain class prints as its bare name
        type_name = annotation.__name__ if type(annotation) is type else str(annotation).replace("typing.", "")
        rows.append(
            {
                "name": name,
                "type": type_name,
                "default": default,
                "required": field.is_required(),
                "description": field.description or "",
            }
        )
    return rows


def _describe(impl: Implementation) -> dict[str, Any]:
    plugin = impl.plugin
    return {
        "kind": impl.kind,
        "name": impl.name,
        "qualified_name": impl.qualified_name,
        "plugin": plugin.name,
        "distribution": plugin.distribution,
        "version": plugin.version,
        "class": f"{impl.cls.__module__}.{impl.cls.__qualname__}",
        "summary": _summary(impl.cls),
        "doc": inspect.getdoc(impl.cls) or "",
        "needs_calibration": bool(getattr(impl.cls, "needs_calibration", False)),
        **({"capabilities": caps.to_dict()} if (caps := getattr(impl.cls, "capabilities", None)) is not None else {}),
        "fields": _field_rows(impl.cls.Spec),
        "schema": impl.cls.Spec.model_json_schema(),
    }


def _capabilities_line(caps: dict[str, Any] | None) -> str:
    """What a sparsifier declares, in words (``sparsity show``)."""
    if caps is None:
        return ""
    words = [k for k in ("calibration", "gradients", "reconstruction", "regrowth", "allocates_levels", "shard_safe") if caps.get(k)]
    if caps.get("layer_kinds") is not None:
        words.append("layer kinds: " + ", ".join(caps["layer_kinds"]))
    if caps.get("tensor_ranks") is not None:
        words.append("tensor ranks: " + ", ".join(map(str, caps["tensor_ranks"])))
    return "\n[bold]capabilities[/]: " + (", ".join(words) if words else "none (scores weights alone; any tensor)")


# -- commands ----------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = get_registry().plugins()
    if args.json:
        print(json.dumps([p.to_dict() for p in plugins], indent=2))
        return 0
    table = _table("Sparsity plugins", ["plugin", "distribution", "version", "status", "provides", "error"])
    for p in plugins:
        status = {"loaded": "[green]loaded[/]", "disabled": "[yellow]disabled[/]"}.get(p.status, f"[red]{p.status}[/]")
        table.add_row(p.name, p.distribution or "-", p.version or "-", status, ", ".join(p.provides), p.error or "")
    _console().print(table)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = get_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    rows = []
    for kind in kinds:
        names = set(registry.names(kind))
        for impl in registry.implementations(kind):
            shown = impl.name if impl.name in names else impl.qualified_name
            rows.append(
                {
                    "kind": kind,
                    "name": shown,
                    "qualified_name": impl.qualified_name,
                    "plugin": impl.plugin.name,
                    "distribution": impl.plugin.distribution,
                    "summary": _summary(impl.cls),
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = _table("Sparsifiers and schedulers", ["kind", "name", "plugin", "summary"])
    for r in rows:
        table.add_row(r["kind"], r["name"], r["plugin"], r["summary"])
    _console().print(table)
    return 0


def _find(name: str, kind: Kind | None) -> Implementation:
    registry = get_registry()
    if kind is not None:
        return registry.get(kind, name)
    found: list[Implementation] = []
    errors: list[LookupError] = []
    for k in KINDS:
        try:
            found.append(registry.get(k, name))
        except UnknownNameError as exc:
            errors.append(exc)
    if len(found) == 1:
        return found[0]
    if found:
        raise AmbiguousNameError(
            f"{name!r} names both a sparsifier and a scheduler; add --kind sparsifier or --kind scheduler",
            name=name,
            kind="sparsifier",
            candidates=[f.qualified_name for f in found],
        )
    # Unknown as either kind: suggest across both (each kind's own error knows only its names).
    vocabulary: dict[str, Kind] = {}
    for k in KINDS:
        for impl in registry.implementations(k):
            vocabulary.setdefault(impl.name, k)
            vocabulary.setdefault(impl.qualified_name, k)
    close = difflib.get_close_matches(name, list(vocabulary), n=3, cutoff=0.6)
    lines = [f"unknown sparsifier or scheduler {name!r}."]
    if close:
        lines[0] += " Did you mean " + " or ".join(f"{c!r} (a {vocabulary[c]})" for c in close) + "?"
    sparsifiers, schedulers = (str(e).splitlines() for e in errors)
    lines += [sparsifiers[1], schedulers[1], *sparsifiers[2:]]  # available names, then failed plugins
    raise UnknownNameError("\n".join(lines), name=name, kind="sparsifier", suggestions=close)


def cmd_show(args: argparse.Namespace) -> int:
    info = _describe(_find(args.name, args.kind))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.panel import Panel
    from rich.syntax import Syntax

    console = _console()
    dist = f"{info['distribution']} {info['version']}" if info["distribution"] else "no distribution"
    console.print(
        Panel(
            f"{info['doc'] or '(no docstring)'}\n\n"
            f"[bold]provided by[/] plugin {info['plugin']} ({dist}) as [bold]{info['qualified_name']}[/]\n"
            f"[bold]class[/] {info['class']}"
            + _capabilities_line(info.get("capabilities")),
            title=f"{info['kind']} {info['name']}",
            title_align="left",
        )
    )
    table = _table("Arguments", ["field", "type", "default", "description"])
    for f in info["fields"]:
        table.add_row(f["name"], f["type"], repr(f["default"]), f["description"])
    console.print(table)
    console.print("JSON schema:")
    # Whole lines at any terminal width (a cropped or folded line is not JSON any more).
    schema = Syntax(json.dumps(info["schema"], indent=2), "json", theme="ansi_dark", background_color="default")
    width = console.width
    console.width = max(width, max(len(line) for line in schema.code.splitlines()) + 1)
    try:
        console.print(schema)
    finally:
        console.width = width
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from ._scaffold import new_plugin

    path = new_plugin(args.name, Path(args.dir), force=args.force)
    print(f"Wrote plugin {args.name!r} to {path}")
    print(f"Next: pip install -e {path} && pytest {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .deploy._inspect import AXIS_NOTE, inspect_checkpoint, plot, to_json

    fmt, stats = inspect_checkpoint(args.path)
    info = to_json(args.path, fmt, stats)
    if args.plot:
        bars = plot(stats, args.plot, f"{Path(args.path).name}: zeros per tensor ({fmt})")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        from rich.markup import escape  # tensor names and paths are text, not markup

        table = _table(escape(f"{args.path}: {fmt}"), ["tensor", "shape", "dtype", "params", "zeros", "sparsity", "storage", "N:M"])
        for s in stats:
            nm = "-" if s.patterns is None else (", ".join(s.patterns) or "none")
            table.add_row(escape(s.name), "x".join(map(str, s.shape)) or "scalar", s.dtype, f"{s.numel:,}", f"{s.zeros:,}",
                          f"{s.sparsity:.2%}", s.storage, nm)
        table.add_row("overall", "", "", f"{sum(s.numel for s in stats):,}", f"{sum(s.zeros for s in stats):,}",
                      f"{info['overall']:.2%}", "", "")
        console = _console()
        console.print(table)
        console.print(f"tensors of rank >= 2: {info['weights_overall']:.2%} zeros. {AXIS_NOTE}.", markup=False)
    if args.plot:
        print(f"wrote a bar chart of {bars} tensors to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsity", description="Sparsifiers and sparsity schedulers, as plugins, for PyTorch and Lightning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (plugin API {API_VERSION}; {_kernels()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="what was discovered: plugin, distribution, version, status, names, error")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("list", help="every sparsifier and scheduler, with its plugin and summary")
    p.add_argument("--kind", choices=KINDS, help="only this kind")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one implementation: docstring, provider, arguments, JSON schema")
    p.add_argument("name", help="short name (e.g. magnitude) or qualified name (e.g. builtin:magnitude)")
    p.add_argument("--kind", choices=KINDS, help="when a name is both a sparsifier and a scheduler")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("new-plugin", help="write a new plugin distribution from the template")
    p.add_argument("name", help="plugin name, e.g. 'my-pruner' (distribution sparsity-plugin-my-pruner)")
    p.add_argument("--dir", default=".", help="folder to create the plugin in (default: current folder)")
    p.add_argument("--force", action="store_true", help="overwrite an existing folder")
    p.set_defaults(func=cmd_new_plugin)

    p = sub.add_parser("inspect", help="per-tensor sparsity of a checkpoint (Lightning, torch, safetensors, compressed)")
    p.add_argument("path", help="a .ckpt, a torch state dict (.pt), a .safetensors file or a save_sparse file")
    p.add_argument("--json", action="store_true", help="print JSON (with N:M patterns) instead of a table")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG bar chart of per-tensor sparsity to FILE")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so that a closed pipe is seen here and not at exit
        return code
    except BrokenPipeError:
        # `sparsity list --json | head`: the reader is gone. Exit like a tool killed by SIGPIPE,
        # quietly; stdout goes to devnull so that the flush at exit does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except (UnknownNameError, AmbiguousNameError, PluginLoadError, FileExistsError, ValueError) as exc:
        print(f"sparsity {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
