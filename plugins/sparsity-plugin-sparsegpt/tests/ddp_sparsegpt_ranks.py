"""Two gloo ranks calibrate SparseGPT on different halves of the batches; each saves what
compute_masks returns to OUT_DIR/rank<N>.pt. Run: python ddp_sparsegpt_ranks.py OUT_DIR."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsity_plugin_sparsegpt import SparseGPT


def layer_and_batches() -> tuple[nn.Linear, list[torch.Tensor]]:
    torch.manual_seed(0)
    layer = nn.Linear(32, 12)
    gen = torch.Generator().manual_seed(1)
    mixing = torch.randn(32, 32, generator=gen)
    return layer, [torch.randn(20 + 5 * i, 32, generator=gen) @ mixing for i in range(4)]


def run(rank: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2)
    try:
        layer, batches = layer_and_batches()
        sparsegpt = SparseGPT({"sparsity_level": 0.5, "block_size": 8})
        for x in batches[rank::2]:  # each rank sees other batches, of other sizes
            sparsegpt.observe("weight", layer, (x,))
        result = sparsegpt.compute_masks({"weight": layer.weight}, {"weight": 0.5})
        torch.save({"mask": result.masks["weight"], "weight": result.weights["weight"]}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(Path(sys.argv[1]),), nprocs=2)
