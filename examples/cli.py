"""LightningCLI on the digits task: ``python examples/cli.py fit --config examples/digits_sparsity.yaml``.

The sparsity callback comes from the YAML (``class_path: sparsity_core.lightning.TrainingAwareSparsity``),
its sparsifier and scheduler by name; any field can be overridden on the command line, e.g.
``--trainer.callbacks.init_args.sparsifier_args.sparsity_level=0.95``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402


def main() -> None:
    # No config.yaml written next to the run: this is an example, not an experiment log.
    LightningCLI(DigitsClassifier, DigitsDataModule, save_config_callback=None)


if __name__ == "__main__":
    main()
