"""Plugin discovery and name resolution.

Plugins are found through the ``sparsity_core`` entry-point group on first use of the registry
(never at ``import sparsity_core``). Each plugin is loaded, version-checked and asked to register
on its own: one that raises is recorded with its error and warned about once, and the rest keep
working. Built-ins are a plugin too (``builtin``), registered through the same hooks.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import threading
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final, Literal

import pluggy

from . import hookspecs
from ._errors import AmbiguousNameError, PluginLoadError, PluginWarning, UnknownNameError
from ._version import API_VERSION, SUPPORTED_APIS, __version__

ENTRY_POINT_GROUP: Final = "sparsity_core"
BUILTIN: Final = "builtin"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")

Kind = Literal["sparsifier", "scheduler"]
Status = Literal["loaded", "failed", "disabled", "incompatible"]
_HOOKS: Final[dict[Kind, str]] = {"sparsifier": "register_sparsifiers", "scheduler": "register_schedulers"}
#: The third hook: plugins teach the core layer kinds (``register(LayerKind(...))``), see :mod:`._layers`.
_KIND_HOOK: Final = "register_layer_kinds"


def normalize(name: str) -> str:
    """Plugin names compare like distribution names: case-insensitive, with -, _ and . alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(environ: Mapping[str, str], key: str) -> set[str] | None:
    raw = environ.get(key)
    if raw is None or not raw.strip():
        return None
    return {normalize(part.strip()) for part in raw.split(",") if part.strip()}


@dataclass
class PluginInfo:
    """What discovery found for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: Status
    module: str | None = None
    sparsifiers: list[str] = field(default_factory=list)
    schedulers: list[str] = field(default_factory=list)
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def provides(self) -> list[str]:
        return [f"sparsifier:{n}" for n in self.sparsifiers] + [f"scheduler:{n}" for n in self.schedulers]

    @property
    def label(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"{self.name} ({dist})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "module": self.module,
            "sparsifiers": list(self.sparsifiers),
            "schedulers": list(self.schedulers),
            "error": self.error,
        }


@dataclass(frozen=True)
class Implementation:
    """A registered class, with the plugin that provides it."""

    kind: Kind
    name: str
    plugin: PluginInfo
    cls: type

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin.name}:{self.name}"


class Registry:
    """Every sparsifier and scheduler that discovery found, by qualified and short name.

    ``Registry()`` reads the process environment; tests and the conformance kit build isolated
    ones with ``autoload=False`` and ``plugins=[(name, module_or_object)]``.
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        autoload: bool | None = None,
        plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._autoload = autoload
        self._extra = list(plugins)
        self._lock = threading.RLock()
        self._loaded = False
        #: Whether discovery runs, and the plugin it is loading (set under the lock, so only the
        #: discovering thread can see them set).
        self._discovering = False
        self._loading: str | None = None
        self._clear()

    def _clear(self) -> None:
        self._strict_error: PluginLoadError | None = None
        self._plugins: dict[str, PluginInfo] = {}
        self._impls: dict[Kind, dict[str, Implementation]] = {"sparsifier": {}, "scheduler": {}}
        self._layer_kinds: list[tuple[Any, str]] = []  # (LayerKind, plugin name), in registration order
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)

    # -- discovery ---------------------------------------------------------------------------
    def _ensure(self) -> None:
        if not self._loaded:
            with self._lock:
                if self._discovering:
                    # Only the discovering thread gets here (others wait on the lock): a plugin
                    # looked a name up while it was loaded. Discovery must not start again.
                    who = f"plugin {self._loading!r}" if self._loading else "code run by plugin discovery"
                    raise PluginLoadError(
                        f"{who} used the sparsity registry while it was being loaded (at import or in "
                        f"its register hook); look names up when they are used, not while registering",
                        plugin=self._loading or "",
                    )
                if not self._loaded:
                    self._discovering = True
                    try:
                        self._discover()
                    except BaseException:
                        # KeyboardInterrupt, SystemExit, a warning turned error: what was found so
                        # far is dropped, so that the next use starts discovery from nothing.
                        self._clear()
                        raise
                    finally:
                        self._discovering, self._loading = False, None
                    self._loaded = True
        if self._strict_error is not None:
            raise self._strict_error

    def _discover(self) -> None:
        from . import builtin

        self._add(BUILTIN, lambda: builtin, "sparsity-core", __version__, module="sparsity_core.builtin")
        env = self._environ
        autoload = self._autoload if self._autoload is not None else not _env_flag(
            env, "SPARSITY_DISABLE_PLUGIN_AUTOLOAD"
        )
        if self._autoload is not False:
            allow = _env_list(env, "SPARSITY_PLUGINS")
            deny = _env_list(env, "SPARSITY_DISABLE_PLUGINS") or set()
            installed: dict[str, str] = {normalize(BUILTIN): BUILTIN}
            for ep in self._entry_points():
                dist = getattr(ep, "dist", None)
                meta = dist.metadata if dist is not None else None  # parses METADATA: once
                dist_name, version = (meta["Name"], meta["Version"]) if meta is not None else (None, None)
                keys = {normalize(ep.name)} | ({normalize(dist_name)} if dist_name else set())
                installed.update({normalize(n): n for n in (ep.name, dist_name) if n})
                reason = None
                if not autoload:
                    reason = "disabled by SPARSITY_DISABLE_PLUGIN_AUTOLOAD=1"
                elif allow is not None and not keys & allow:
                    reason = f"not in SPARSITY_PLUGINS={env.get('SPARSITY_PLUGINS')}"
                elif keys & deny:
                    reason = f"disabled by SPARSITY_DISABLE_PLUGINS={env.get('SPARSITY_DISABLE_PLUGINS')}"
                if reason is not None:
                    self._record(PluginInfo(ep.name, dist_name, version, "disabled", ep.value, error=reason))
                else:
                    self._add(ep.name, ep.load, dist_name, version, module=ep.value)
            if autoload:
                _warn_unmatched(env, "SPARSITY_PLUGINS", allow, installed)
                _warn_unmatched(env, "SPARSITY_DISABLE_PLUGINS", deny, installed)
        for name, obj in self._extra:
            self._add(name, lambda obj=obj: obj, None, None, module=getattr(obj, "__name__", repr(obj)))

        broken = [p for p in self._plugins.values() if p.status in ("failed", "incompatible")]
        if broken and _env_flag(env, "SPARSITY_STRICT_PLUGINS"):
            lines = "\n".join(f"  - {p.label}: {p.error}" for p in broken)
            self._strict_error = PluginLoadError(
                f"{len(broken)} sparsity plugin(s) failed to load (SPARSITY_STRICT_PLUGINS=1):\n{lines}",
                plugin=broken[0].name,
            )
            self._strict_error.__cause__ = broken[0].exception

    @staticmethod
    def _entry_points() -> list[EntryPoint]:
        seen: set[tuple[str, str]] = set()
        found = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            # The same distribution reachable twice on sys.path is one plugin, not a collision.
            if (ep.name, ep.value) not in seen:
                seen.add((ep.name, ep.value))
                found.append(ep)
        return sorted(found, key=lambda ep: ep.name)

    def _record(self, info: PluginInfo) -> None:
        if info.name in self._plugins:
            other = self._plugins[info.name]
            info.status, info.error = "failed", (
                f"plugin name {info.name!r} is already taken by {other.label}; "
                f"rename the entry point in one of the two distributions"
            )
            info.name = f"{info.name}#{len(self._plugins)}"
        self._plugins[info.name] = info

    def _add(self, name: str, load: Any, dist: str | None, version: str | None, *, module: str) -> None:
        info = PluginInfo(name, dist, version, "loaded", module)
        self._record(info)
        if info.status != "loaded":
            self._fail(info, None)
            return
        self._loading = name
        stage, obj = "import", None
        try:
            obj = load()
            stage = "check"
            target = getattr(obj, "SPARSITY_CORE_API", API_VERSION)
            if target not in SUPPORTED_APIS:
                info.status = "incompatible"
                info.error = (
                    f"plugin targets sparsity-core API {target!r}, but sparsity-core {__version__} "
                    f"provides API {API_VERSION} (and runs plugins for APIs {', '.join(map(str, SUPPORTED_APIS))}); "
                    f"upgrade the plugin or sparsity-core"
                )
            else:
                stage = "register"
                self.pm.register(obj, name=name)
                self._check_hooks(name)
                staged = self._collect(name, obj)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
            if obj is not None and self.pm.is_registered(obj):
                self.pm.unregister(obj)
            info.status = "failed"
            where = {"import": "failed to import", "check": "failed its checks", "register": "failed to register"}
            info.error = f"{where[stage]}: {type(exc).__name__}: {exc}"
            self._fail(info, exc)
            return
        finally:
            self._loading = None
        if info.status == "incompatible":
            self._fail(info, None)
            return
        for impl in staged:
            self._impls[impl.kind][impl.qualified_name] = impl
            (info.sparsifiers if impl.kind == "sparsifier" else info.schedulers).append(impl.name)
        self._warn_shadowed(info, staged)

    def _warn_shadowed(self, info: PluginInfo, staged: list[Implementation]) -> None:
        """Built-ins keep their short names: a plugin that registers one is reachable qualified
        only, so that installing it never breaks a script or config that says 'magnitude'."""
        if info.name == BUILTIN:
            return
        builtin = self._plugins[BUILTIN]
        taken = [i for i in staged if i.name in (builtin.sparsifiers if i.kind == "sparsifier" else builtin.schedulers)]
        if taken:
            listing = ", ".join(f"{i.kind} {i.name!r} (use {i.qualified_name!r})" for i in taken)
            warnings.warn(
                f"sparsity plugin {info.label} registers names the built-ins already have: {listing}. "
                f"A short name stays the built-in's; the plugin's is reachable by its qualified name.",
                PluginWarning,
                stacklevel=4,
            )

    def _check_hooks(self, name: str) -> None:
        """pluggy accepts hook implementations nobody specified; a misspelt hook would then
        register nothing, silently. Refuse it and say which hooks exist."""
        for hook_name, caller in vars(self.pm.hook).items():
            if caller.has_spec():
                continue
            if any(impl.plugin_name == name and not impl.optionalhook for impl in caller.get_hookimpls()):
                hooks = [*_HOOKS.values(), _KIND_HOOK]
                close = difflib.get_close_matches(hook_name, hooks, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown hook {hook_name!r}{hint} The hooks are: {', '.join(hooks)}")

    def _collect(self, name: str, obj: object) -> list[Implementation]:
        """Call the plugin's own hook implementations; all of its registrations or none."""
        staged: list[Implementation] = []
        info = self._plugins[name]
        for kind, hook_name in _HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            for hookimpl in hook.get_hookimpls():
                if hookimpl.plugin_name != name:
                    continue

                def register(cls: type, kind: Kind = kind) -> None:
                    _check_class(kind, cls, name)
                    if any(s.kind == kind and s.name == cls.name for s in staged):
                        raise ValueError(f"{kind} {cls.name!r} registered twice by plugin {name!r}")
                    staged.append(Implementation(kind, cls.name, info, cls))

                hookimpl.function(**{arg: register for arg in hookimpl.argnames})
        kinds = self._collect_layer_kinds(name)  # last: nothing after it can fail
        self._layer_kinds.extend((kind, name) for kind in kinds)
        return staged

    def _collect_layer_kinds(self, name: str) -> list[Any]:
        """The layer kinds plugin ``name`` registers through ``register_layer_kinds``. A kind
        name is unique across plugins (case-insensitive): it is the KIND of "KIND:GLOB" selectors."""
        from ._layers import LayerKind

        staged: list[Any] = []
        taken = {kind.name.lower(): plugin for kind, plugin in self._layer_kinds}

        def register(kind: Any) -> None:
            if not isinstance(kind, LayerKind):
                raise TypeError(
                    f"plugin {name!r} registered {kind!r} as a layer kind, but it is not a sparsity_core.LayerKind"
                )
            other = taken.get(kind.name.lower())
            if other is not None:
                raise ValueError(f"layer kind {kind.name!r} registered by plugin {name!r} is already registered by plugin {other!r}")
            taken[kind.name.lower()] = name
            staged.append(kind)

        for hookimpl in getattr(self.pm.hook, _KIND_HOOK).get_hookimpls():
            if hookimpl.plugin_name == name:
                hookimpl.function(**{arg: register for arg in hookimpl.argnames})
        return staged

    def _fail(self, info: PluginInfo, exc: BaseException | None) -> None:
        info.exception = exc
        if exc is not None and exc.__traceback__ is not None:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            info.error = f"{info.error} (at {tb.filename}:{tb.lineno})"
        warnings.warn(
            f"sparsity plugin {info.label} {info.error}. It is skipped; every other plugin works. "
            f"Set SPARSITY_STRICT_PLUGINS=1 to make this an error.",
            PluginWarning,
            stacklevel=4,
        )

    # -- queries -----------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        self._ensure()
        return list(self._plugins.values())

    def layer_kinds(self) -> tuple[Any, ...]:
        """Every registered :class:`~sparsity_core.LayerKind`: the built-ins first, then each
        plugin's, in registration order."""
        self._ensure()
        return tuple(kind for kind, _ in self._layer_kinds)

    def layer_kind_plugins(self) -> dict[str, str]:
        """Layer kind name -> the plugin that registered it."""
        self._ensure()
        return {kind.name: plugin for kind, plugin in self._layer_kinds}

    def implementations(self, kind: Kind) -> list[Implementation]:
        self._ensure()
        return sorted(self._impls[kind].values(), key=lambda i: (i.name, i.plugin.name))

    def names(self, kind: Kind) -> list[str]:
        """Sorted names: the short name where one plugin provides it, else each qualified name."""
        by_short: dict[str, list[Implementation]] = {}
        for impl in self.implementations(kind):
            by_short.setdefault(impl.name, []).append(impl)
        out = []
        for short, impls in by_short.items():
            if len(impls) == 1:
                out.append(short)
            else:  # the built-in keeps its short name (see get); the rest are listed qualified
                out.extend(short if i.plugin.name == BUILTIN else i.qualified_name for i in impls)
        return sorted(out)

    def get(self, kind: Kind, name: str) -> Implementation:
        """Resolve a short or qualified name."""
        if not isinstance(name, str):
            raise TypeError(f"a {kind} name must be a string, got {type(name).__name__}")
        self._ensure()
        table = self._impls[kind]
        if ":" in name:
            plugin, _, short = name.partition(":")
            impl = table.get(f"{plugin}:{short}")
            if impl is not None:
                return impl
            raise self._unknown(kind, name)
        matches = [impl for impl in table.values() if impl.name == name]
        if len(matches) == 1:
            return matches[0]
        # Built-ins win their short names: a plugin registering one is reachable qualified only.
        builtin = next((impl for impl in matches if impl.plugin.name == BUILTIN), None)
        if builtin is not None:
            return builtin
        if not matches:
            raise self._unknown(kind, name)
        matches.sort(key=lambda i: i.qualified_name)
        listing = " and ".join(f"{i.qualified_name} (from {i.plugin.distribution or 'no distribution'})" for i in matches)
        raise AmbiguousNameError(
            f"{kind} name {name!r} is ambiguous: it is provided by {listing}. "
            f"Use a qualified name, e.g. {matches[0].qualified_name!r}.",
            name=name,
            kind=kind,
            candidates=[i.qualified_name for i in matches],
        )

    def _unknown(self, kind: Kind, name: str) -> UnknownNameError:
        impls = list(self._impls[kind].values())
        vocabulary = sorted({i.name for i in impls} | {i.qualified_name for i in impls})
        close = difflib.get_close_matches(name, vocabulary, n=3, cutoff=0.6)
        lines = [f"unknown {kind} {name!r}."]
        if close:
            lines[0] += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
        lines.append(f"Available {kind}s: {', '.join(self.names(kind)) or '(none)'}.")
        trouble = [p for p in self._plugins.values() if p.status != "loaded"]
        if trouble:
            lines.append("Plugins not loaded (one of them may provide it):")
            lines += [f"  - {p.label} [{p.status}]: {p.error}" for p in trouble]
        return UnknownNameError("\n".join(lines), name=name, kind=kind, suggestions=close)


def _warn_unmatched(environ: Mapping[str, str], key: str, listed: set[str] | None, installed: dict[str, str]) -> None:
    """A name in a plugin list that no installed plugin has is a typo (in SPARSITY_PLUGINS one
    silently disabled every plugin): say so, with the names there are."""
    for name in sorted((listed or set()) - set(installed)):
        close = difflib.get_close_matches(name, list(installed), n=1, cutoff=0.6)
        hint = f"; did you mean {installed[close[0]]!r}?" if close else "."
        names = ", ".join(sorted(set(installed.values())))
        warnings.warn(
            f"{key}={environ.get(key)} names {name!r}, which no installed sparsity plugin has{hint} "
            f"Installed (entry point or distribution names): {names}.",
            PluginWarning,
            stacklevel=5,
        )


def _check_class(kind: Kind, cls: Any, plugin: str) -> None:
    from ._base import Scheduler, Sparsifier
    from ._specs import SchedulerSpec, SparsifierSpec

    base, spec_base = (Sparsifier, SparsifierSpec) if kind == "sparsifier" else (Scheduler, SchedulerSpec)
    what = f"plugin {plugin!r} registered {getattr(cls, '__qualname__', cls)!r} as a {kind}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{what}, but it is not a subclass of sparsity_core.{base.__name__}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or ":" in name:
        raise TypeError(
            f"{what}, but its class attribute `name` is {name!r}; it must be set on the class itself "
            f"and be a short name of letters, digits, '_', '-' or '.', starting with a letter"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TypeError(f"{what}, but it does not implement: {missing}")
    spec = inspect.getattr_static(cls, "Spec", None)
    spec = getattr(spec, "raw", spec)  # an unbuilt _SpecSlot: check the author's model, build nothing
    if not (isinstance(spec, type) and issubclass(spec, spec_base)):
        raise TypeError(f"{what}, but its Spec is not a subclass of sparsity_core.{spec_base.__name__}")


# -- the process-wide registry -------------------------------------------------------------
_current: Registry | None = None
_current_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _current
    if _current is None:
        with _current_lock:
            if _current is None:
                _current = Registry()
    return _current


@contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one inside the block (the testing kit's isolation)."""
    global _current
    previous, _current = _current, registry
    try:
        yield registry
    finally:
        _current = previous


def reset_registry() -> None:
    """Forget the process-wide registry: the next use discovers plugins again (e.g. after an
    install, or a change of the SPARSITY_* environment)."""
    global _current
    _current = None
