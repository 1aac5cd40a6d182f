"""``import sparsity_core`` imports neither torch, Lightning nor any plugin."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
before = set(sys.modules)
import sparsity_core
from sparsity_core import hookimpl, SparsifierSpec, ScoreSpec, SchedulerSpec, API_VERSION
from sparsity_core import _registry
new = sorted(set(sys.modules) - before)
print(json.dumps({"new": new, "registry_built": _registry._current is not None}))
"""


def test_import_is_lazy():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    heavy = [m for m in result["new"] if m.split(".")[0] in {"torch", "pytorch_lightning", "lightning", "numpy"}]
    assert heavy == []
    # no plugin was imported, and discovery has not run
    assert not any(m.startswith("sparsity_plugin") for m in result["new"])
    assert not any(m.startswith("sparsity_core.builtin") for m in result["new"])
    assert result["registry_built"] is False


def test_listing_names_does_not_import_torch():
    probe = "import sys, sparsity_core as sc; sc.list_sparsifiers(); sc.list_schedulers(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
