"""``new_plugin``: write a new plugin distribution from a template (``sparsity new-plugin NAME``).

The result is the shape of ``plugins/sparsity-plugin-example``: a pyproject with the entry point,
a module with a working ``ScoreSparsifier``, a README, and a test that runs the conformance kit.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*$")
_PREFIX = "sparsity-plugin-"

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "The $name sparsifier for sparsity-core"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["sparsity-core>=$core_major.$core_minor,<$core_major.$core_next"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This line makes the distribution a sparsity-core plugin: plugin name -> module with the hooks.
[project.entry-points.sparsity_core]
$name = "$module"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
filterwarnings = ["error"]
"""

_MODULE = '''\
"""The $name sparsifier, a sparsity-core plugin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from sparsity_core import ScoreSparsifier, ScoreSpec, hookimpl

#: The sparsity-core plugin API this module targets; another major API refuses to load it.
SPARSITY_CORE_API = $api


class $cls_name(ScoreSpec):
    power: float = Field(1.0, gt=0, description="Importance is |w| ** power (any power gives magnitude's order; replace with yours).")


class $cls(ScoreSparsifier):
    """Prune the weights of lowest |w| ** power (replace with your importance score)."""

    name = "$name"
    Spec = $cls_name
    spec: $cls_name
    # `score` looks at each element on its own, so the core may score pieces of a tensor (less
    # memory, faster). Delete this line if your score uses rows, norms or the whole tensor.
    elementwise = True

    def score(self, name: str, tensor: Any) -> Any:
        # Same shape as `tensor`, higher = more important. The core selects the masks for every
        # pattern and scope, applies, saves and reports them. Never modify `tensor`.
        return tensor.abs().float().pow(self.spec.power)


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    register($cls)
'''

_TEST = '''\
"""$dist: found through its entry point and passing the sparsity-core conformance kit."""

from __future__ import annotations

import pytest

from sparsity_core.testing import parametrize_with_checks

pytestmark = pytest.mark.sparsity_plugin("$name")


# Every contract check is its own test, with this plugin alone in the registry (plus built-ins).
@parametrize_with_checks(["$name"], plugin="$name")
def test_conformance(check) -> None:
    check()


def test_found_through_its_entry_point(sparsity_registry) -> None:
    impl = sparsity_registry.get("sparsifier", "$name")
    assert impl.plugin.distribution == "$dist"
    assert impl.qualified_name == "$name:$name"
'''

_README = """\
# $dist

The `$name` sparsifier for [sparsity-core](https://pypi.org/project/sparsity-core/).

```bash
pip install -e .          # registers `$name` through the `sparsity_core` entry point
sparsity show $name       # its arguments, from the spec
pytest                    # the conformance kit, one test per check
```

```python
from sparsity_core import sparsify
print(sparsify(model, "$name", {"sparsity_level": 0.5}))
```

Write your importance score in `src/$module/__init__.py` (`score` returns a tensor shaped like the
weight, higher = more important), and add its arguments to the spec as pydantic fields with a
description and a default. To publish: `python -m build` and upload the wheel; users install it
and `$name` appears in `sparsity list`.
"""

_GITIGNORE = "__pycache__/\n*.egg-info/\nbuild/\ndist/\n.pytest_cache/\n"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[_-]", name))


def new_plugin(name: str, directory: Path, *, force: bool = False) -> Path:
    """Write the plugin distribution ``sparsity-plugin-<name>`` under ``directory``; return its folder.

    ``name`` is the plugin's and the sparsifier's name (lowercase letters, digits, single ``-`` or
    ``_`` between them; a leading ``sparsity-plugin-`` is dropped). An existing non-empty folder is
    refused unless ``force``, which overwrites the template's files and leaves others alone.
    """
    from ._version import API_VERSION, __version__

    name = name.strip()
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    if not _NAME.match(name):
        raise ValueError(
            f"plugin name {name!r} is not valid: use lowercase letters and digits, starting with a letter, "
            f"with single '-' or '_' between parts (e.g. 'my-pruner')"
        )
    snake = name.replace("-", "_")
    dist = _PREFIX + name.replace("_", "-")
    module = "sparsity_plugin_" + snake
    root = Path(directory) / dist
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise FileExistsError(f"{root} already exists and is not empty; pass force=True (--force) to overwrite its template files")

    major, minor = (int(p) for p in __version__.split(".")[:2])
    values = {
        "name": name,
        "dist": dist,
        "module": module,
        "cls": _camel(snake),
        "cls_name": _camel(snake) + "Spec",
        "api": str(API_VERSION),
        "core_major": str(major),
        "core_minor": str(minor),
        "core_next": str(minor + 1),
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        f"src/{module}/__init__.py": _MODULE,
        f"tests/test_{snake}.py": _TEST,
        "README.md": _README,
        ".gitignore": _GITIGNORE,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(values), encoding="utf-8")
    return root
