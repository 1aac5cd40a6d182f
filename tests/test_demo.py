"""The main job (`make demo`) runs end to end: a shortened run, in a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_prunes_to_the_target_and_writes_its_plot(tmp_path):
    png = tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--dense-epochs", "2", "--sparse-epochs", "3", "--out", str(png)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "overall" in out and "90.00%" in out  # the per-layer table reaches the target
    assert "dense, after 2 epochs" in out and "TrainingAwareSparsity" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out
    assert "KiB compressed" in out and "test accuracy" in out and "unchanged" in out
    assert (tmp_path / "digits_sparse.safetensors").stat().st_size < 0.2 * (tmp_path / "digits_dense.safetensors").stat().st_size
