"""Scale: one-shot global 90% magnitude on a model as large as the machine allows.

Builds a stack of bias-free ``nn.Linear(width, width)`` layers in bf16, layer by layer (each
weight allocated once and filled in place: no second copy), prunes it with
``sparsity_core.sparsify(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})`` and
reports the time as a multiple of one read+write pass over every weight (``w.mul_(1)``, measured
in the same run) and the peak extra memory (``ru_maxrss`` after the prune minus before it).
Then, in a subprocess that builds the same model, ``torch.nn.utils.prune.global_unstructured``
(L1, 90%; what Lightning's ModelPruning runs) under an address-space limit (``RLIMIT_AS``:
the subprocess's size after building plus ``--budget-gib``, default the memory available
then), reporting its time or where it fails.

Run: ``python benchmarks/scale.py`` (2.0B parameters, 4 GB of bf16: a few minutes on 2 cores),
``python benchmarks/scale.py --fraction 0.5`` (weights fill half of the machine's memory: 6.4B
parameters on 24 GiB), ``--params 6e9``, ``--skip-torch``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import traceback

import torch
from torch import nn

GIB = 1024**3


from _proc import meminfo  # noqa: E402  (benchmarks/_proc.py, beside this script)


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def vsize() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[20])


def build(params: float, width: int, dtype: torch.dtype) -> nn.Sequential:
    """``round(params / width^2)`` layers, each weight created empty and filled in place in
    chunks of rows (normal_ on a bf16 tensor draws in float32 internally: chunks bound that)."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(max(1, round(params / width**2))):
        layer = nn.Linear(width, width, bias=False, device="meta", dtype=dtype).to_empty(device="cpu")
        with torch.no_grad():
            for rows in layer.weight.split(256):
                rows.normal_(0.0, 0.02, generator=gen)
        layers.append(layer)
    return nn.Sequential(*layers)


def torch_prune(params: float, width: int, budget: int) -> None:
    """Subprocess body: build, limit the address space, run global_unstructured; print JSON."""
    torch.set_num_threads(1)
    from torch.nn.utils import prune

    model = build(params, width, torch.bfloat16)
    weights = [(m, "weight") for m in model]
    limit = vsize() + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = maxrss()
    t0 = time.perf_counter()
    try:
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=0.9)
    except BaseException as exc:  # noqa: BLE001 - the point is to report it
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "torch/nn/utils/prune.py" in f.filename]
        where = f"{frames[-1].name}: {frames[-1].line}" if frames else "?"
        print(json.dumps({"ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                          "where": where, "extra": maxrss() - before, "limit": limit}))
        return
    print(json.dumps({"ok": True, "seconds": time.perf_counter() - t0, "extra": maxrss() - before, "limit": limit}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--params", type=float, default=None, help="parameters (default 2e9)")
    size.add_argument("--fraction", type=float, default=None, help="weights fill this fraction of the machine's memory")
    parser.add_argument("--width", type=int, default=8192, help="layers are width x width (default 8192: 67M each)")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="memory the torch.nn.utils.prune subprocess may add (default: MemAvailable after it builds)")
    parser.add_argument("--skip-torch", action="store_true", help="skip torch.nn.utils.prune.global_unstructured")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = torch.bfloat16
    if args.fraction is not None:
        params = args.fraction * meminfo("MemTotal") / dtype.itemsize
    else:
        params = args.params if args.params is not None else 2e9
    if args.torch_child:
        budget = int(args.budget_gib * GIB) if args.budget_gib is not None else max(0, meminfo("MemAvailable") - GIB)
        torch_prune(params, args.width, budget)
        return
    torch.set_num_threads(1)
    import sparsity_core as sc

    t0 = time.perf_counter()
    model = build(params, args.width, dtype)
    weights = [m.weight for m in model]
    n = sum(w.numel() for w in weights)
    nbytes = n * dtype.itemsize
    print(f"{n / 1e9:.2f}B parameters in {len(weights)} Linear({args.width}, {args.width}) layers, bf16: "
          f"{nbytes / GIB:.1f} GiB, built in {time.perf_counter() - t0:.0f} s; machine: {os.cpu_count()} cores, "
          f"{meminfo('MemTotal') / GIB:.0f} GiB ({meminfo('MemAvailable') / GIB:.1f} GiB available); one thread")
    with torch.no_grad():
        for w in weights:  # warm: first touch of pages is not part of either figure
            w.mul_(1)
        t0 = time.perf_counter()
        for w in weights:
            w.mul_(1)
        one_pass = time.perf_counter() - t0
    print(f"anchor: one read+write pass (w.mul_(1) over every weight)   {one_pass:8.2f} s")
    before = maxrss()
    t0 = time.perf_counter()
    report = sc.sparsify(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})
    took = time.perf_counter() - t0
    extra = maxrss() - before
    print(f"sparsity_core.sparsify magnitude 90% global                  {took:8.2f} s  {took / one_pass:5.1f}x the pass; "
          f"peak extra memory {extra / GIB:.2f} GiB ({extra / nbytes:.2f}x the model's bytes); sparsity {report.overall:.3f}")
    if args.skip_torch:
        return
    del model, weights, report
    gc.collect()
    cmd = [sys.executable, __file__, "--torch-child", "--params", str(params), "--width", str(args.width)]
    if args.budget_gib is not None:
        cmd += ["--budget-gib", str(args.budget_gib)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        why = "killed by SIGKILL: the kernel's OOM killer, most likely" if done.returncode == -9 else f"exit {done.returncode}"
        print(f"torch.nn.utils.prune.global_unstructured: subprocess died ({why}): "
              f"{done.stderr.strip().splitlines()[-1:]}")
        return
    r = json.loads(lines[-1])
    head = f"torch.nn.utils.prune.global_unstructured L1 90% (address space limited to {r['limit'] / GIB:.1f} GiB)"
    if r["ok"]:
        print(f"{head}: {r['seconds']:.1f} s  {r['seconds'] / one_pass:.1f}x the pass; peak extra memory "
              f"{r['extra'] / GIB:.2f} GiB ({r['extra'] / nbytes:.2f}x)")
    else:
        print(f"{head}: FAILED after {r['seconds']:.1f} s in {r['where']}: {r['error']} "
              f"(peak extra memory reached {r['extra'] / GIB:.2f} GiB, {r['extra'] / nbytes:.2f}x the model's bytes)")


if __name__ == "__main__":
    main()
