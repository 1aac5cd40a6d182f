"""Placeholder main job: sparsify a small model one-shot by name and print the per-layer report."""

from torch import nn

import sparsity_core

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
print(sparsity_core.sparsify(model, "magnitude", {"sparsity_level": 0.9}))
