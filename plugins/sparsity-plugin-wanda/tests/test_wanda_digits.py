"""The demo task: on digits, one-shot wanda keeps more accuracy than one-shot magnitude."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def _digits():
    path = Path(__file__).parents[1] / "examples" / "digits.py"
    spec = importlib.util.spec_from_file_location("wanda_digits_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_wanda_beats_magnitude_one_shot_at_high_sparsity_on_digits() -> None:
    digits = _digits()
    result = digits.compare(levels=(0.8,), seeds=(0, 1, 2), standardize=True)
    dense, magnitude, wanda = result["dense"][0], result["magnitude"][0], result["wanda"][0]
    assert min(dense) > 0.95
    # Each seed (split, init, training order): wanda at least as accurate as magnitude.
    assert all(w >= m for w, m in zip(wanda, magnitude)), (wanda, magnitude)
    assert sum(wanda) / 3 >= sum(magnitude) / 3 + 0.03


@pytest.mark.slow
def test_wanda_beats_magnitude_with_one_global_threshold_on_the_demos_raw_pixels() -> None:
    # The demo's own preprocessing (pixels / 16, not standardised), one threshold over the model:
    # wanda weighs the first layer's weights by how much each pixel actually varies.
    digits = _digits()
    result = digits.compare(levels=(0.9,), seeds=(0, 1, 2), standardize=False, args={"scope": "global"})
    magnitude, wanda = result["magnitude"][0], result["wanda"][0]
    # Not every seed (one split favours magnitude), but most, and clearly on average.
    assert sum(w >= m for w, m in zip(wanda, magnitude)) >= 2, (wanda, magnitude)
    assert sum(wanda) / 3 >= sum(magnitude) / 3 + 0.05, (wanda, magnitude)
