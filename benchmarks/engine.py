"""Engine speed and memory against the limit (one read+write pass) and the anchors users have today.

    python benchmarks/engine.py --params 100e6          # the issue's setting (takes a few minutes)
    python benchmarks/engine.py --params 10e6 --quick   # a smoke run
    python benchmarks/engine.py --only "data_norm 1x4"  # some cases (beside the pass) only
    python benchmarks/engine.py --dtypes bf16 --quick   # one weight dtype (default: fp32,bf16,fp16)
    python benchmarks/engine.py --general ...           # magnitude off the bits path (float32 scores)

Every case runs in a fresh subprocess on one thread (``torch.set_num_threads(1)``) over a model of
``nn.Linear`` layers (4096 x 4096 when large enough). Time: the best of ``--repeat`` runs for ours
(weights re-drawn in place between runs), one run for the slow anchors. The machine may be shared:
run the script at least twice and compare medians across runs.

Peak extra memory, honestly: before a case the subprocess resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), notes its current RSS, runs the case, and reads the peak
(``VmHWM``) from ``/proc/self/status``. Peak minus baseline is every byte the case touched beyond
the model already in memory: scores, temporaries, masks, allocator slack; nothing is estimated.
It is reported as a fraction of the model's weight bytes. Where ``/proc`` is missing it falls back
to ``ru_maxrss`` (which cannot be reset; the model is then built first and the figure is an upper
bound).

Cases: ``pass`` (w.mul_(1) over every weight: the limit); ours one-shot through ``sparsify`` (masks
computed, applied and dropped; ``SparsityController(...).step()`` then ``._squash(trust_masked=True)``,
i.e. ``sparsify`` without its closing report): magnitude 90% global and layer, 2:4 (Linear weights, and transformers' Conv1D ones, [in, out],
groups along dim 0), data_norm 1x4; ours with the
masks kept (``SparsityController.step()``, bool masks alive afterwards); the anchors
``torch.nn.utils.prune.global_unstructured`` + ``prune.remove`` (what Lightning's ModelPruning
calls), torch.ao ``WeightNormSparsifier`` (1x4 blocks) and ``DataNormSparsifier`` (1x4, the seed
callback's path). Then the cost of re-applying masks after each optimizer step, as a fraction of a
training step of a ~5M-parameter MLP, beside torch.nn.utils.prune's forward pre-hooks and torch.ao's
parametrizations.

The pass, magnitude global and layer, 2:4 and ``prune.global_unstructured`` run in every weight
dtype of ``--dtypes`` (the model built in that dtype, each compared with the pass in its own dtype);
the other cases in fp32 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

GOALS = {
    "magnitude global 90%": ("pass", 3.0, "prune.global_unstructured", 20.0),
    "magnitude layer 90%": ("pass", 3.0, None, None),
    "2:4": ("pass", 3.0, None, None),
    "2:4 Conv1D": ("pass", 3.0, None, None),
    "data_norm 1x4": (None, None, "torch.ao DataNormSparsifier", 20.0),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Cases run in every dtype of --dtypes; the rest in fp32 only.
PER_DTYPE = ("pass", "magnitude global 90%", "magnitude layer 90%", "2:4", "2:4 Conv1D", "prune.global_unstructured")
MEMORY_GOAL = 0.3
APPLY_GOAL = 0.03


# -- measuring (inside the subprocess) -----------------------------------------------------------
from _proc import status as _status  # noqa: E402  (benchmarks/_proc.py, beside this script)


def _measure(fn: Callable[[], None], repeat: int, before: Callable[[], None] | None = None) -> tuple[float, int]:
    import gc
    import resource

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, proc = _status("VmRSS"), True
    except OSError:
        base, proc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
    best = math.inf
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    peak = _status("VmHWM") if proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return best, max(0, peak - base)


def _model(params: float, dtype: str = "fp32", conv1d: bool = False) -> Any:
    """Square Linear layers, or transformers' Conv1D ([in, out] weights: GPT-2's) with ``conv1d``."""
    import torch
    from torch import nn

    d = 4096 if params >= 4096 * 4096 else max(16, int(math.sqrt(params)))
    layers = max(1, round(params / (d * d)))
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(*[Conv1D(d, d) for _ in range(layers)]).to(getattr(torch, DTYPES[dtype]))
    return nn.Sequential(*[nn.Linear(d, d, dtype=getattr(torch, DTYPES[dtype])) for _ in range(layers)])


def _weights(model: Any) -> list[Any]:
    return [m.weight for m in model]


def run_case(case: str, params: float, repeat: int, dtype: str = "fp32", general: bool = False) -> dict[str, Any]:
    import torch

    if general:  # the general path (float32 scores, selection.py) for magnitude, to compare
        from sparsity_core._engine import magnitude

        magnitude.eligible = lambda *_: False  # type: ignore[assignment]

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = _model(params, dtype, conv1d=case == "2:4 Conv1D")
    weights = _weights(model)
    n = sum(w.numel() for w in weights)
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    def redraw() -> None:
        with torch.no_grad():
            for w in weights:
                w.normal_()

    import sparsity_core as sc

    sc.sparsify(torch.nn.Linear(8, 8), "data_norm")  # warm up: imports and plugin discovery are not the case
    sc.sparsify(torch.nn.Linear(8, 8), "magnitude", {"pattern": "2:4"})

    ours: dict[str, tuple[str, dict[str, Any]]] = {
        "magnitude global 90%": ("magnitude", {"sparsity_level": 0.9, "scope": "global"}),
        "magnitude layer 90%": ("magnitude", {"sparsity_level": 0.9}),
        "2:4": ("magnitude", {"pattern": "2:4"}),
        "2:4 Conv1D": ("magnitude", {"pattern": "2:4"}),  # groups along dim 0, the input axis
        "data_norm 1x4": ("data_norm", {"sparsity_level": 0.9, "sparse_block_shape": (1, 4)}),
    }
    keep: list[Any] = []
    if case == "pass":
        with torch.no_grad():
            fn: Callable[[], None] = lambda: [w.mul_(1) for w in weights] and None  # noqa: E731
            seconds, extra = _measure(fn, repeat)
    elif case in ours:
        name, args = ours[case]

        def one_shot() -> None:  # what sparsify() does, less its report (a count of zeros)
            c = sc.SparsityController(model, name, args)
            c._hold_masks = False  # as sparsify(): each mask dropped once applied
            c.step()
            c._squash(trust_masked=True)

        seconds, extra = _measure(one_shot, repeat, redraw)
    elif case == "magnitude global 90%, masks kept":

        def kept() -> None:
            keep.clear()
            c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})
            c.step()
            keep.append(c)

        seconds, extra = _measure(kept, repeat, redraw)
        assert keep[0].masks and all(m.dtype == torch.bool for m in keep[0].masks.values())
    elif case == "prune.global_unstructured":
        import torch.nn.utils.prune as prune

        def tp() -> None:
            pairs = [(m, "weight") for m in model]
            prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=0.9)
            for m, p in pairs:
                prune.remove(m, p)

        seconds, extra = _measure(tp, 1)
    elif case == "torch.ao WeightNormSparsifier":
        from torch.ao.pruning import WeightNormSparsifier

        def wn() -> None:
            s = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 4), zeros_per_block=4)
            s.prepare(model, [{"tensor_fqn": f"{i}.weight"} for i in range(len(model))])
            s.step()
            s.squash_mask()

        seconds, extra = _measure(wn, 1)
    elif case == "torch.ao DataNormSparsifier":
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

        def dn() -> None:
            s = DataNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 4), zeros_per_block=4)
            for i, w in enumerate(weights):
                s.add_data(f"w{i}", w.data)
            s.step()
            s.squash_mask()

        seconds, extra = _measure(dn, 1)
    else:
        raise SystemExit(f"unknown case {case!r}")
    return {"case": case, "dtype": dtype, "seconds": seconds, "extra_bytes": extra, "model_bytes": nbytes, "params": n}


def run_apply(repeat: int) -> dict[str, Any]:
    """Per-step cost of keeping a ~5M-parameter MLP sparse, as a fraction of its training step.

    Everything on one thread (``torch.set_num_threads(1)``: the step and the re-apply alike),
    batch 128, SGD with momentum, 90% magnitude masks on the three Linear weights. The re-apply
    is timed where it runs in training, right after ``optimizer.step()`` (not in a hot loop over
    cached data), interleaved with dense steps; every figure is a median over ``repeat`` rounds.
    Beside it, one read+write pass (``w.mul_(1)``) over the same weights, timed the same way:
    the floor for anything that touches every masked weight once per step.
    """
    import statistics

    import torch
    import torch.nn.utils.prune as prune
    from torch import nn
    from torch.ao.pruning import WeightNormSparsifier

    import sparsity_core as sc

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 512))

    x, y = torch.randn(128, 1024), torch.randn(128, 512)

    def one_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    def steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> float:
        for _ in range(3):
            one_step(model, opt)
        return statistics.median(one_step(model, opt) for _ in range(n))

    out: dict[str, Any] = {}
    model = mlp()
    out["params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.9})
    c.step()
    weights = list(c.tensors.values())
    dense, apply, floor = [], [], []
    for _ in range(3):
        one_step(model, opt)
    for _ in range(max(repeat, 30)):
        dense.append(one_step(model, opt))
        t0 = time.perf_counter()
        c.apply_masks()
        apply.append(time.perf_counter() - t0)
        one_step(model, opt)
        t0 = time.perf_counter()
        with torch.no_grad():
            for w in weights:
                w.mul_(1)
        floor.append(time.perf_counter() - t0)
        c.apply_masks()
    out["dense step"] = base = statistics.median(dense)
    out["ours: apply_masks after a step"] = statistics.median(apply)
    out["one pass over the masked weights"] = statistics.median(floor)
    assert all(not w[~m].any() for w, m in zip(weights, c.masks.values()))
    c.attach(opt)
    out["ours: step with hook"] = steps(model, opt, max(repeat, 30))

    m2 = mlp()
    for layer in m2:
        if isinstance(layer, nn.Linear):
            prune.l1_unstructured(layer, "weight", amount=0.9)
    opt2 = torch.optim.SGD(m2.parameters(), lr=1e-3, momentum=0.9)
    out["torch prune: step with hooks"] = steps(m2, opt2, max(repeat, 30))

    m3 = mlp()
    s = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 1), zeros_per_block=1)
    s.prepare(m3, [{"tensor_fqn": f"{i}.weight"} for i in (0, 2, 4)])
    s.step()
    opt3 = torch.optim.SGD(m3.parameters(), lr=1e-3, momentum=0.9)
    out["torch.ao: step with parametrizations"] = steps(m3, opt3, max(repeat, 30))
    out["base"] = base
    return out


# -- orchestration -------------------------------------------------------------------------------
def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="weights in the Linear model (default 100e6)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case of ours (best is kept)")
    parser.add_argument("--quick", action="store_true", help="skip the slow anchors")
    parser.add_argument("--only", help="comma-separated cases to run (the pass always runs); skips the re-apply table")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="weight dtypes of the per-dtype cases (default fp32,bf16,fp16)")
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--general", action="store_true", help="magnitude on the general path (float32 scores), not on the weights' bits")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--apply", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.params, args.repeat, args.dtype, args.general)))
        return
    if args.apply:
        print(json.dumps(run_apply(max(args.repeat, 5))))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    cases = [
        "pass",
        "magnitude global 90%",
        "magnitude layer 90%",
        "2:4",
        "2:4 Conv1D",
        "data_norm 1x4",
        "magnitude global 90%, masks kept",
    ]
    anchors = ["prune.global_unstructured", "torch.ao WeightNormSparsifier", "torch.ao DataNormSparsifier"]
    todo = cases + ([] if args.quick else anchors)
    if args.only:
        wanted = [c.strip() for c in args.only.split(",")]
        unknown = [c for c in wanted if c not in todo]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; choose from {todo}")
        todo = ["pass"] + [c for c in todo if c in wanted and c != "pass"]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise SystemExit(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    runs = [(case, d) for d in dtypes for case in todo if case in PER_DTYPE] + [(c, "fp32") for c in todo if c not in PER_DTYPE]
    if "fp32" not in dtypes and any(c not in PER_DTYPE for c in todo):
        runs.insert(0, ("pass", "fp32"))  # the fp32-only cases are compared with the fp32 pass
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for case, d in runs:
        console.print(f"running {case} ({d}) ...", style="dim")
        results[case, d] = _child(
            ["--case", case, "--params", str(args.params), "--repeat", str(args.repeat), "--dtype", d] + (["--general"] if args.general else [])
        )
    for d in {d for _, d in runs}:
        if "error" in results["pass", d]:
            raise SystemExit(f"the reference pass ({d}) failed: {results['pass', d]['error']}")
    first = results["pass", runs[0][1]]
    table = Table(title=f"Mask computation, {first['params'] / 1e6:.1f}M params, one thread; x pass: over the pass in the same dtype")
    for col in ("case", "dtype", "time (s)", "x pass", "peak extra (x model bytes)"):
        table.add_column(col, justify="left" if col in ("case", "dtype") else "right")
    for (case, d), r in results.items():
        if "error" in r:
            table.add_row(case, d, "error", " ".join(r["error"]), "")
            continue
        table.add_row(
            case, d, f"{r['seconds']:.3f}", f"{r['seconds'] / results['pass', d]['seconds']:.1f}", f"{r['extra_bytes'] / r['model_bytes']:.3f}"
        )
    console.print(table)

    verdicts = []
    notes: list[str] = []
    for (case, d), r in results.items():
        if case not in GOALS or "seconds" not in r:
            continue
        vs_pass, pass_ratio, anchor, anchor_ratio = GOALS[case]
        if vs_pass:
            x = r["seconds"] / results["pass", d]["seconds"]
            verdicts.append((f"{case} ({d}): within {pass_ratio:g}x of the pass", f"{x:.1f}x", x <= pass_ratio))
        if anchor and "seconds" in results.get((anchor, d), {}):
            x = results[anchor, d]["seconds"] / r["seconds"]
            verdicts.append((f"{case} ({d}): >= {anchor_ratio:g}x faster than {anchor}", f"{x:.0f}x", x >= anchor_ratio))
    for case in ("magnitude global 90%", "2:4", "data_norm 1x4", "magnitude global 90%, masks kept"):
        r = results.get((case, "fp32"), {})
        if "extra_bytes" in r:
            x = r["extra_bytes"] / r["model_bytes"]
            verdicts.append((f"{case} (fp32): peak extra memory <= {MEMORY_GOAL:g}x model bytes", f"{x:.3f}x", x <= MEMORY_GOAL))
            if x > MEMORY_GOAL:
                notes.append(
                    f"{case}: peak extra {x:.3f}x model bytes. The bool masks alone are 0.25x (one byte per fp32 "
                    "weight, all alive at once); the rest is candidate buffers (about 1% of the weights), data_norm's "
                    "block means of the band in hand (never of a whole tensor), pieces in flight and memory "
                    "the C allocator keeps after frees, which varies by a few hundredths between runs."
                )

    a = {"error": ["skipped (--only)"]}
    if not args.only:
        console.print("running apply-after-step ...", style="dim")
        a = _child(["--apply", "--repeat", str(max(args.repeat, 5))])
    if "error" not in a:
        t2 = Table(
            title=f"Keeping a {a['params'] / 1e6:.1f}M-param MLP sparse per training step "
            "(batch 128, SGD momentum, one thread for step and re-apply alike; medians)"
        )
        t2.add_column("what")
        t2.add_column("seconds", justify="right")
        t2.add_column("x dense step", justify="right")
        for k in (
            "dense step",
            "ours: apply_masks after a step",
            "one pass over the masked weights",
            "ours: step with hook",
            "torch prune: step with hooks",
            "torch.ao: step with parametrizations",
        ):
            t2.add_row(k, f"{a[k]:.4f}", f"{a[k] / a['base']:.3f}")
        console.print(t2)
        frac = a["ours: apply_masks after a step"] / a["base"]
        floor = a["one pass over the masked weights"] / a["base"]
        verdicts.append((f"re-applying masks <= {APPLY_GOAL:.0%} of a training step", f"{frac:.1%}", frac <= APPLY_GOAL))
        if frac > APPLY_GOAL:
            notes.append(
                f"Re-applying masks costs {frac:.1%} of a step; one read+write pass over the same weights alone costs "
                f"{floor:.1%}. The re-apply is one NumPy multiply by the bool mask per tensor (it reads the mask as "
                "well, and NumPy casts bool to float in buffers; torch's mul_/masked_fill_/where measured 3-4x slower), "
                "and it must touch every masked weight after every step (the optimizer moves every pruned weight that "
                "has a gradient). Even that bare pass is above the goal here, so the goal is below the memory floor "
                "for this model at batch 128 on one thread."
            )
    elif not args.only:
        console.print(f"apply-after-step failed: {a['error']}", style="red")

    t3 = Table(title="Goals")
    t3.add_column("goal")
    t3.add_column("measured", justify="right")
    t3.add_column("met")
    for goal, measured, ok in verdicts:
        t3.add_row(goal, measured, "[green]met[/]" if ok else "[red]not met[/]")
    console.print(t3)
    for note in notes:
        console.print(f"note: {note}")


if __name__ == "__main__":
    main()
