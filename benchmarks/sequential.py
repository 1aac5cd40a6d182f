"""Peak calibration memory with and without ``sequential=`` on a stack of wide Linear blocks.

A sparsifier that keeps second-order statistics (SparseGPT's ``H = X^T X``: in^2 floats per Linear)
holds every layer's at once in one dense calibration pass, but only one block's when calibrating
block by block. Two figures per case, each measured in a fresh process so that one case's heap does
not hide another's:

- *statistics*: the most bytes the sparsifier held at once (counted exactly, on every observe);
- *peak RSS*: the process's peak resident memory above what it held once the model was built.

Run: ``python benchmarks/sequential.py [--blocks 8] [--width 2048]``. With the ``sparsegpt`` plugin
installed it is measured too; the built-in anchor is an OBS-statistics sparsifier defined here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch
from torch import nn

import sparsity_core as sc


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class HessianMagnitude(sc.ScoreSparsifier):
    """|w| / sqrt(diag(H^-1))-free stand-in: keeps H = X^T X per layer, as SparseGPT does, and scores |w| * sqrt(diag(H))."""

    name = "hessian_magnitude"
    capabilities = sc.Capabilities(calibration=True)
    held = 0
    peak = 0

    def __init__(self, spec: Any = None, /, **fields: Any) -> None:
        super().__init__(spec, **fields)
        self.h: dict[str, torch.Tensor] = {}

    def _count(self) -> None:
        cls = type(self)
        cls.held = sum(t.numel() * t.element_size() for t in self.h.values())
        cls.peak = max(cls.peak, cls.held)

    def reset_calibration(self) -> None:
        self.h.clear()
        self._count()

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        if name not in self.h:
            self.h[name] = torch.zeros(x.shape[1], x.shape[1])
        self.h[name].addmm_(x.t(), x)
        self._count()

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in self.h:
            raise RuntimeError(f"{name}: no calibration")
        return tensor.abs().float() * self.h[name].diagonal().sqrt()


def _case(sparsifier: str, sequential: bool, blocks: int, width: int, batches: int) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Stack(blocks, width)
    data = [torch.randn(16, width) for _ in range(batches)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    args = {"sparsity_level": 0.5}
    cls: Any = HessianMagnitude if sparsifier == "hessian_magnitude" else sparsifier
    tracker = None
    if sparsifier == "sparsegpt":
        # count SparseGPT's own statistics: whatever tensors it holds in its dicts
        impl = sc.create_sparsifier("sparsegpt", args)
        tracker = _Tracker(impl)
        cls, args = impl, None
    sc.sparsify(model, cls, args, calibration=data, sequential="blocks.*" if sequential else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = HessianMagnitude.peak if tracker is None else tracker.peak
    return {"stats_bytes": stats, "rss_bytes": peak - base}


class _Tracker:
    """Wraps a sparsifier's observe/reset to count the bytes of the tensors it keeps as attributes."""

    def __init__(self, impl: Any) -> None:
        self.impl, self.peak = impl, 0
        observe, reset = impl.observe, impl.reset_calibration

        def held() -> int:
            total = 0
            for value in vars(impl).values():
                items = value.values() if isinstance(value, dict) else [value]
                for t in items:
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
                    elif isinstance(t, (tuple, list)):
                        total += sum(x.numel() * x.element_size() for x in t if isinstance(x, torch.Tensor))
            return total

        def tracked_observe(*a: Any, **k: Any) -> None:
            observe(*a, **k)
            self.peak = max(self.peak, held())

        def tracked_reset() -> None:
            self.peak = max(self.peak, held())
            reset()

        impl.observe, impl.reset_calibration = tracked_observe, tracked_reset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, seq = args.case.split(",")
        print(json.dumps(_case(name, seq == "1", args.blocks, args.width, args.batches)))
        return
    names = ["hessian_magnitude"] + (["sparsegpt"] if "sparsegpt" in sc.list_sparsifiers() else [])
    block_stats = 2 * args.width * args.width * 4
    print(f"{args.blocks} blocks of 2 Linear {args.width}x{args.width}; one block's H statistics = {block_stats / 2**20:.1f} MiB")
    print(f"{'sparsifier':<20} {'mode':<11} {'statistics':>12} {'x one block':>12} {'peak RSS':>10}")
    for name in names:
        for seq in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--case", f"{name},{int(seq)}", "--blocks", str(args.blocks),
                 "--width", str(args.width), "--batches", str(args.batches)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{name:<20} {'sequential' if seq else 'dense':<11} {r['stats_bytes'] / 2**20:>9.1f} MiB "
                f"{r['stats_bytes'] / block_stats:>11.2f}x {r['rss_bytes'] / 2**20:>6.0f} MiB"
            )


if __name__ == "__main__":
    main()
