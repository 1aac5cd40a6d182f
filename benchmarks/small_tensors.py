"""Many small tensors: the per-tensor overhead of a one-shot prune and of re-applying masks.

20,000 parameters of 10 elements each (a model of many tiny layers, or per-channel scales).
Anchor: one ``torch._foreach_mul_`` of every tensor by its bool mask, measured in the same run.
Goals (issue 10.20): re-applying masks after a step <= 2x the anchor; a one-shot prune <= 10x.

Run: ``python benchmarks/small_tensors.py [--tensors 20000] [--size 10] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsity_core as sc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    oneshot, reapply, anchor = [], [], []
    for _ in range(args.repeat):
        params = {f"p{i}": torch.randn(args.size, generator=gen) for i in range(args.tensors)}
        t0 = time.perf_counter()
        controller = sc.SparsityController(params, "magnitude", {"sparsity_level": 0.5})
        controller.step()
        oneshot.append(time.perf_counter() - t0)
        tensors, masks = list(controller.tensors.values()), list(controller.masks.values())
        controller.apply_masks()  # builds its plan once per set of masks
        t0 = time.perf_counter()
        controller.apply_masks()
        reapply.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch._foreach_mul_(tensors, masks)
        anchor.append(time.perf_counter() - t0)
    a = statistics.median(anchor)
    print(f"{args.tensors} tensors of {args.size} elements, one thread, medians of {args.repeat}")
    print(f"anchor: one torch._foreach_mul_            {a * 1e3:8.1f} ms")
    print(f"re-apply masks (controller.apply_masks)    {statistics.median(reapply) * 1e3:8.1f} ms  {statistics.median(reapply) / a:5.1f}x (goal <= 2x)")
    print(f"one-shot prune (controller + step)         {statistics.median(oneshot) * 1e3:8.1f} ms  {statistics.median(oneshot) / a:5.1f}x (goal <= 10x)")


if __name__ == "__main__":
    main()
