"""The callbacks in other processes: from a LightningCLI YAML, and under 2-process CPU DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # One thread per process: two processes on a shared 2-core machine would otherwise fight.
    # This checkout's sparsity_core first: the script runs from another folder, where the installed
    # (possibly another checkout's) package would be imported instead of the one under test.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning", "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_lightning_cli_from_the_example_yaml(tmp_path: Path) -> None:
    proc = run(
        [
            str(ROOT / "examples" / "cli.py"), "fit",
            "--config", str(ROOT / "examples" / "digits_sparsity.yaml"),
            # a short run: 3 epochs of 8 batches; the cubic schedule (start 2, end 10) is then at t=3
            "--trainer.max_epochs=3", "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "TrainingAwareSparsity: magnitude" in output
    overall = re.search(r"^overall\s.*?([0-9.]+)%\s*$", output, re.MULTILINE)
    assert overall is not None, output
    assert float(overall.group(1)) == pytest.approx(100 * 0.9 * (1 - (7 / 8) ** 3), abs=0.05)
    # the schedule was cut short by the override, and the callback says so
    assert "before the 'cubic' schedule reached its final level" in output


@pytest.mark.slow
def test_lightning_cli_reports_a_misspelt_sparsifier_before_training(tmp_path: Path) -> None:
    config = (ROOT / "examples" / "digits_sparsity.yaml").read_text().replace("sparsifier: magnitude", "sparsifier: magnitud")
    (tmp_path / "bad.yaml").write_text(config)
    proc = run([str(ROOT / "examples" / "cli.py"), "fit", "--config", "bad.yaml"], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "magnitud" in output and "did you mean" in output.lower(), output
    assert "Epoch 0" not in output


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_on_masks(tmp_path: Path) -> None:
    proc = run([str(ROOT / "tests" / "scripts" / "ddp_fit.py"), str(tmp_path)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["mask_names"] == ["noise.weight", "random.weight"]
    for key in ("masks", "weights", "post_training"):
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["pruned"] == pytest.approx({"noise.weight": 0.6, "random.weight": 0.5}, abs=0.01)
    assert ranks[0]["best_checkpoint"] == ranks[1]["best_checkpoint"] == "best.ckpt"
    # logged by rank zero, with names as in the LightningModule's state_dict
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"sparsity/model.0/overall", "sparsity/model.2/overall", "sparsity/model.0.weight"} <= set(header)


@pytest.mark.slow
def test_ddp_reconstruction_ends_with_rank_zeros_weights_and_masks(tmp_path: Path) -> None:
    proc = run([str(ROOT / "tests" / "scripts" / "ddp_fit.py"), str(tmp_path), "reconstruction"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    # rank 1's own update differs from rank 0's, so agreement comes from the broadcast
    assert ranks[1]["training_own_masks_differ"] == [True, True] and ranks[1]["post_own_masks_differ"] is True
    assert ranks[0]["training_own_masks_differ"] == [False, False]
    for r in ranks:
        assert r["training_updates"] == 2
        assert r["training_matches_rank0"] == [True, True], r["rank"]
        assert r["post_matches_rank0"] is True and r["post_pruned_zero_kept_doubled"] is True, r["rank"]
    for key in ("masks", "weights"):
        assert ranks[0][key] == ranks[1][key], key
