"""Deployment figures: file sizes of ``save_sparse`` vs a dense safetensors file, and (with CUDA)
the matmul time of 2:4 semi-structured Linear weights vs dense.

    python benchmarks/deploy.py            # sizes (seconds); GPU timings when CUDA is present
    python benchmarks/deploy.py --quick    # smaller tensors

Sizes: a block of LLM-like Linear weights (``[out, in]``: 2 x [1024, 4096] + [4096, 1024], 12.6 M
weights; ``--quick``: a quarter of each side) pruned to 50% (random positions), 90% (random) and
2:4 (along the input dim), in fp32 and bf16, written dense with ``safetensors.torch.save_file``
and compressed with ``save_sparse``; the ratio is the compressed file's bytes over the dense file's.
Zeroing is by multiplication, as masking does (so half the zeros are -0.0).

GPU: ``F.linear`` of a [tokens, in] fp16 activation with a [out, in] weight, dense vs the same 2:4
weight converted by ``to_semi_structured``, at a few LLM shapes; CUDA events, median of 50 runs
after 10 warm-up runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sparsity_core import save_sparse, to_semi_structured

LEVELS = ("50%", "90%", "2:4")
GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # [out, in], Llama-7B-like
GPU_TOKENS = (16, 2048)


def weights(scale: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = [(1024 // scale, 4096 // scale), (1024 // scale, 4096 // scale), (4096 // scale, 1024 // scale)]
    return {f"layers.{i}.weight": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}


def prune(t: torch.Tensor, level: str, gen: torch.Generator) -> torch.Tensor:
    if level == "2:4":
        groups = t.reshape(t.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
        return (groups * keep).reshape(t.shape)
    return t * (torch.rand(t.shape, generator=gen) >= float(level.rstrip("%")) / 100)


def sizes(scale: int) -> list[tuple[str, str, int, int, int]]:
    gen = torch.Generator().manual_seed(0)
    base = weights(scale, gen)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            for level in LEVELS:
                state = {k: prune(v, level, gen).to(dtype) for k, v in base.items()}
                save_file(state, Path(tmp) / "dense.safetensors")
                saved = save_sparse(state, Path(tmp) / "sparse.safetensors")
                dense = (Path(tmp) / "dense.safetensors").stat().st_size
                rows.append((str(dtype).removeprefix("torch."), level, dense, saved.file_bytes, len(saved.compressed)))
    return rows


@torch.no_grad()
def gpu_timings() -> list[tuple[tuple[int, int], int, float, float, str]]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for shape in GPU_SHAPES:
        linear = nn.Linear(shape[1], shape[0], bias=False).half().cuda()
        linear.weight.copy_(prune(torch.randn(shape, generator=gen), "2:4", gen).half().cuda())
        sparse = nn.Linear(shape[1], shape[0], bias=False).half().cuda()
        sparse.weight.copy_(linear.weight)
        report = to_semi_structured(sparse)
        for tokens in GPU_TOKENS:
            x = torch.randn(tokens, shape[1], dtype=torch.float16, device="cuda")
            times = [_time(linear, x), _time(sparse, x)] if report.converted else [_time(linear, x), float("nan")]
            out.append((shape, tokens, times[0], times[1], report.layers[0].status))
    return out


def _time(module: nn.Module, x: torch.Tensor, warmup: int = 10, runs: int = 50) -> float:
    for _ in range(warmup):
        module(x)
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module(x)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of each dimension")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scale = 4 if args.quick else 1
    print(f"File sizes: save_sparse vs dense safetensors ({'quick: ' if args.quick else ''}"
          f"{sum(t.numel() for t in weights(scale, torch.Generator()).values()):,} weights)")
    print(f"{'dtype':<9}{'pattern':<9}{'dense':>12}{'compressed':>13}{'ratio':>8}")
    for dtype, level, dense, sparse, _ in sizes(scale):
        print(f"{dtype:<9}{level:<9}{dense / 2**20:>10.2f}Mi{sparse / 2**20:>11.2f}Mi{sparse / dense:>8.3f}")

    if not torch.cuda.is_available():
        print("\nGPU matmul timings: skipped (no CUDA device)")
        return
    name = torch.cuda.get_device_name()
    print(f"\n2:4 semi-structured vs dense F.linear, fp16, {name} (median ms of 50)")
    print(f"{'[out, in]':<16}{'tokens':>8}{'dense':>10}{'2:4':>10}{'speedup':>9}  status")
    for shape, tokens, dense_ms, sparse_ms, status in gpu_timings():
        print(f"{str(list(shape)):<16}{tokens:>8}{dense_ms:>10.3f}{sparse_ms:>10.3f}{dense_ms / sparse_ms:>9.2f}  {status}")


if __name__ == "__main__":
    main()
