"""1-bit masks: their bytes, re-applying them after an optimizer step, and a one-shot prune's peak.

    python benchmarks/masks.py                    # 100M parameters, fp32 and bf16 (about two minutes)
    python benchmarks/masks.py --params 25e6      # a quicker run

On a stack of bias-free ``nn.Linear(4096, 4096)`` layers (one thread), for fp32 and bf16 alike:

- bytes of the masks a ``SparsityController`` holds (packed, 1 bit per weight) beside the bool
  masks of the same selection (1 byte per weight), as fractions of the model's bytes;
- re-applying every mask after an optimizer step, side by side in one run: the controller's
  ``apply_masks()`` (packed masks, unpacked :data:`sparsity_core._bits.CHUNK` elements at a time),
  the same in a controller attached to an optimizer (``upkeep="weights"``, which holds fp32 masks
  unpacked while attached: ``_controller._unpacked_while_training``), beside what it ran before
  with bool masks (``engine.apply_mask_`` per tensor: one NumPy multiply
  in fp32, torch's ``mul_`` in bf16), and one read+write pass (``w.mul_(1)``), the floor. Rounds
  are interleaved (each case first in turn), each case preceded by a step-like write of every
  weight (``w.add_(1e-3)``); the best and the median of the rounds are reported (the host may be
  shared: the best is the least disturbed);
- peak extra memory of a one-shot ``sparsify(model, "magnitude", {"sparsity_level": 0.9,
  "scope": "global"})`` in a fresh subprocess: the kernel's peak RSS counter is reset
  (``/proc/self/clear_refs``) after the model is built and a small global prune has run (so that
  first-use code pages are not counted), and ``VmHWM`` minus the RSS before is every byte the prune
  touched beyond the model, as a multiple of the model's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

WIDTH = 4096
GOALS = {"float32": 0.1, "bfloat16": 0.2}  # issue 13: peak extra memory of a one-shot global prune


from _proc import status as _status  # noqa: E402  (benchmarks/_proc.py, beside this script)


def _model(params: float, dtype: Any) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Linear(WIDTH, WIDTH, bias=False, dtype=dtype) for _ in range(max(1, round(params / WIDTH**2)))]
    return nn.Sequential(*layers)


def peak_child(params: float, dtype_name: str) -> dict[str, Any]:
    """Subprocess body: the peak extra memory of one-shot global 90% magnitude."""
    import torch
    from torch import nn

    import sparsity_core as sc

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    model = _model(params, dtype)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    warm = nn.Sequential(*[nn.Linear(1024, 1024, bias=False, dtype=dtype) for _ in range(2)])
    sc.sparsify(warm, "magnitude", {"sparsity_level": 0.9, "scope": "global"})  # the bracketed path, once
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    report = sc.sparsify(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})
    seconds = time.perf_counter() - t0
    return {"extra": _status("VmHWM") - base, "model_bytes": nbytes, "seconds": seconds, "overall": report.overall}


def reapply(params: float, dtype_name: str, rounds: int) -> dict[str, Any]:
    import torch

    import sparsity_core as sc
    from sparsity_core import _engine as engine

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    model = _model(params, dtype)
    weights = [m.weight for m in model]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})
    c.step()
    packed_bytes = sum(m.nbytes for m in c.masks.packed().values())
    bools = [c.masks[n] for n in c.tensors]  # the same masks as bool tensors: what was held before
    bool_bytes = sum(m.numel() * m.element_size() for m in bools)

    def step_like() -> None:
        with torch.no_grad():
            for w in weights:
                w.add_(1e-3)

    def with_bool() -> None:
        with torch.no_grad():
            for w, m in zip(weights, bools):
                engine.apply_mask_(w, m)

    # the same masks in a controller attached to an optimizer (upkeep="weights"): what training runs
    attached = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})
    attached.masks = c.masks
    attached.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    attached.apply_masks()  # builds its plan (unpacked copies where those are faster)

    def one_pass() -> None:
        with torch.no_grad():
            for w in weights:
                w.mul_(1)

    cases = {
        "bool masks (before)": with_bool,
        "packed masks: apply_masks()": c.apply_masks,
        "attached: apply_masks()": attached.apply_masks,
        "one pass (w.mul_(1))": one_pass,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:  # each case first in turn
            fn = cases[name]
            step_like()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    with_bool()
    same = all(torch.equal(w.detach() != 0, (w.detach() != 0) & m) for w, m in zip(weights, bools))
    return {
        "params": sum(w.numel() for w in weights),
        "model_bytes": nbytes,
        "packed_bytes": packed_bytes,
        "bool_bytes": bool_bytes,
        "seconds": {k: min(v) for k, v in times.items()},
        "medians": {k: statistics.median(v) for k, v in times.items()},
        "pruned_zero": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="parameters in the Linear stack (default 100e6)")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of re-applying (best and median)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        print(json.dumps(peak_child(args.params, args.peak_child)))
        return
    print(f"one thread; machine: {os.cpu_count()} cores")
    for dtype_name in args.dtypes.split(","):
        r = reapply(args.params, dtype_name, args.rounds)
        mb = r["model_bytes"]
        print(f"\n{dtype_name}: {r['params'] / 1e6:.1f}M parameters in Linear({WIDTH}, {WIDTH}) layers, {mb / 2**20:.0f} MiB")
        print(f"  masks held by the controller: packed {r['packed_bytes'] / 2**20:7.1f} MiB ({r['packed_bytes'] / mb:.4f}x the model); "
              f"bool {r['bool_bytes'] / 2**20:7.1f} MiB ({r['bool_bytes'] / mb:.4f}x); packed/bool {r['packed_bytes'] / r['bool_bytes']:.4f}")
        secs = r["seconds"]
        floor = secs["one pass (w.mul_(1))"]
        print(f"  re-applying every mask after a step (best of {args.rounds} interleaved rounds; median in brackets):")
        for name, s in secs.items():
            med = r["medians"][name]
            print(f"    {name:32s} {s * 1e3:8.1f} ms  {s / floor:5.2f}x the pass   ({med * 1e3:.1f} ms, {med / r['medians']['one pass (w.mul_(1))']:.2f}x)")
        for name in ("packed masks: apply_masks()", "attached: apply_masks()"):
            ratio = secs[name] / secs["bool masks (before)"]
            print(f"    {name} / bool masks: {ratio:.2f} ({'no slower' if ratio <= 1.05 else 'SLOWER'}; within 5% counts as even)")
        assert r["pruned_zero"], "a pruned weight survived"
        out = subprocess.run([sys.executable, __file__, "--peak-child", dtype_name, "--params", str(args.params)],
                             capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"  one-shot peak: subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        p = json.loads(lines[-1])
        x = p["extra"] / p["model_bytes"]
        goal = GOALS.get(dtype_name)
        verdict = "" if goal is None else f" (goal <= {goal:g}x: {'met' if x <= goal else 'NOT met'})"
        print(f"  one-shot sparsify magnitude 90% global: {p['seconds']:.2f} s, peak extra memory {p['extra'] / 2**20:.1f} MiB "
              f"= {x:.3f}x the model's bytes{verdict}; bool masks alone would be {r['bool_bytes'] / mb:.2f}x")


if __name__ == "__main__":
    main()
