"""SparseGPT per layer: ours (``compute_masks`` of the plugin) beside a straight port of the
reference ``fasterprune`` (IST-DASLab/sparsegpt, without its quantizer and printing), one thread.

    python benchmarks/sparsegpt.py                          # 512x512, 1024x1024, 2048x512 (rows x columns)
    python benchmarks/sparsegpt.py --shapes 4096x4096 --repeat 2
    python benchmarks/sparsegpt.py --pattern 2:4

Both are timed in the same process, alternately (reference, ours, reference, ours, ...), on the
same weights and the same Hessian (from correlated calibration inputs, 4 x columns rows), best of
``--repeat``: a shared machine slows both alike. Both times include inverting the damped Hessian
(three O(columns^3) factorisations, identical in both); ours also its copy of the Hessian and
the mapping back to the tensor's layout. The result columns say whether the two agree: masks
equal and the largest weight difference.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn


def reference_fasterprune(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SparseGPT.fasterprune`` of the reference on a Linear weight; returns (W, pruned mask)."""
    W = W.clone().float()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    pruned = torch.zeros(rows, columns, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, pruned


def _layer(rows: int, columns: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=gen) / math.sqrt(columns))
    rank = max(8, columns // 8)
    mixing = torch.randn(columns, rank, generator=gen) @ torch.randn(rank, columns, generator=gen) / math.sqrt(rank)
    x = torch.randn(4 * columns, columns, generator=gen) @ (mixing + 0.1 * torch.eye(columns))
    return layer, x


def bench(rows: int, columns: int, pattern: str, repeat: int) -> dict[str, float]:
    from sparsity_plugin_sparsegpt import SparseGPT

    layer, x = _layer(rows, columns, seed=rows * 7919 + columns)
    ours = SparseGPT({"pattern": pattern, "sparsity_level": 0.5} if pattern == "unstructured" else {"pattern": pattern})
    ours.observe("weight", layer, (x,))
    hessian = ours._stats["weight"].hessian
    prunen, prunem = (0, 0)
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        prunen, prunem = m - n, m
    best_ref = best_ours = math.inf
    ref = result = None
    with torch.no_grad():
        for _ in range(repeat):
            h = hessian.clone()  # fasterprune consumes its Hessian; the copy is not timed
            t0 = time.perf_counter()
            ref = reference_fasterprune(layer.weight.detach(), h, 0.5, prunen, prunem)
            best_ref = min(best_ref, time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = ours.compute_masks({"weight": layer.weight}, {"weight": 0.5})
            best_ours = min(best_ours, time.perf_counter() - t0)
    assert ref is not None and result is not None
    same = float((result.masks["weight"] == ~ref[1]).float().mean())
    diff = float((result.weights["weight"] - ref[0]).abs().max())
    return {"reference": best_ref, "ours": best_ours, "mask_agreement": same, "max_weight_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["512x512", "1024x1024", "2048x512"], help="rows x columns of each Linear weight")
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' (50%%) or 'N:M'")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"SparseGPT per layer, {args.pattern} {'50%' if args.pattern == 'unstructured' else ''}, 1 thread, best of {args.repeat}, torch {torch.__version__}")
    print(f"{'shape':>10} {'reference s':>12} {'ours s':>8} {'speedup':>8} {'masks equal':>12} {'max |dW|':>9}")
    for shape in args.shapes:
        rows, columns = (int(v) for v in shape.split("x"))
        r = bench(rows, columns, args.pattern, args.repeat)
        print(
            f"{shape:>10} {r['reference']:>12.3f} {r['ours']:>8.3f} {r['reference'] / r['ours']:>7.2f}x "
            f"{r['mask_agreement']:>11.2%} {r['max_weight_diff']:>9.1e}"
        )


if __name__ == "__main__":
    main()
