"""benchmarks/quality.py end to end at --quick sizes: it trains, prunes through the public API, and
reports a table whose numbers mean something (finite, levels met, pruning does not help)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / "quality.py"), "--quick", "--json", str(out), "--cache-dir", str(cache)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    table, skipped, runs = result["table"], result["skipped"], result["runs"]

    # every method is either measured or skipped with a reason; the two shipped with the core's
    # test set-up (magnitude built in, wanda first-party) are always measured
    labels = {"dense", "magnitude", "wanda", "wanda (sequential)", "sparsegpt (sequential)"}
    assert set(table) | set(skipped) == labels and not set(table) & set(skipped)
    assert {"dense", "magnitude", "wanda"} <= set(table)
    assert all(reason for reason in skipped.values())
    for label in table:
        assert f"| {label} |" in proc.stdout
        assert set(table[label]) == {"50%", "2:4"}
        assert all(math.isfinite(cell["mean"]) and cell["n"] == len(result["seeds"]) for cell in table[label].values())

    # the dense models learnt something (uniform over bytes is perplexity 256) and were cached
    dense = {r["seed"]: r["ppl"] for r in runs if r["method"] == "dense"}
    assert set(dense) == set(result["seeds"]) and len(dense) >= 2
    assert all(1.0 < ppl < 128.0 for ppl in dense.values())
    assert len(list(cache.glob("tinylm-*.pt"))) == len(dense)

    assert set(result["increase_over_dense"]) == set(table) - {"dense"}
    pruned = [r for r in runs if r["method"] != "dense"]
    assert len(pruned) == 2 * len(dense) * (len(table) - 1)
    for r in pruned:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0
        assert r["sparsity"] == pytest.approx(0.5, abs=1e-3), r  # the covered Linear weights, both settings
    # removing half the weights by magnitude does not make the model better (beyond a 1% slack
    # for a tiny, barely trained model), seed by seed against its own dense model
    for r in pruned:
        if r["method"] == "magnitude" and r["setting"] == "50%":
            assert r["ppl"] >= 0.99 * dense[r["seed"]], r
