"""One-shot pruning quality: perplexity of a small language model at 50% and 2:4, per method.

    python benchmarks/quality.py                      # the table (trains 3 small models once, cached under out/)
    python benchmarks/quality.py --seeds 0 1 --json out/quality.json
    python benchmarks/quality.py --levels 0.5 0.7      # an extra unstructured column
    python benchmarks/quality.py --quick              # tiny sizes, seconds (the smoke test's run)

The papers' claim (SparseGPT, Frantar & Alistarh 2023; Wanda, Sun et al. 2023): pruned one-shot
without retraining, magnitude falls far behind, wanda and SparseGPT stay close to each other and to
dense, and SparseGPT's weight reconstruction wins at 2:4. This script measures it here, on a model
small enough to train in minutes of CPU (``benchmarks/tinylm.py``: a byte-level transformer on the
standard library's own source files), through the public API only::

    sparsify(copy_of_dense, name, {"sparsity_level": 0.5, ...}, calibration=batches, sequential="blocks.*")

Coverage is the Linear weights inside the blocks (q, k, v, o, fc1, fc2), as in the papers:
embeddings, norms, biases and the output head stay dense. Seed ``s`` sets the model's
initialisation and training order and the calibration sample (``--calibration`` random windows of
the training split); every model is scored on the same held-out windows (files of the validation
split). A method whose sparsifier is not installed, or which needs ``sequential=`` on a core that
lacks it, is skipped with a note, not failed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinylm  # noqa: E402  (the sibling module, wherever the script is run from)

import sparsity_core as sc  # noqa: E402

NM = {"2:4": {"pattern": "2:4"}}


def settings(levels: list[float]) -> dict[str, dict[str, Any]]:
    """Column label -> sparsifier arguments: each unstructured level ("50%"), then 2:4."""
    return {f"{level * 100:g}%": {"sparsity_level": level} for level in levels} | NM


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    sparsifier: str
    sequential: bool = False


METHODS = (
    Method("magnitude", "magnitude"),
    # the dense-pass variant (v1's calibration) beside the reference code's block-by-block one
    Method("wanda", "wanda"),
    Method("wanda (sequential)", "wanda", sequential=True),
    Method("sparsegpt (sequential)", "sparsegpt", sequential=True),
)
DENSE = "dense"
BLOCKS = "blocks.*"

QUICK = tinylm.Config(
    n_blocks=2, d_model=32, n_heads=2, context=32, batch_size=8, steps=60, max_train_bytes=200_000, max_val_bytes=20_000
)


def availability(method: Method) -> str | None:
    """Why ``method`` cannot run here, or None when it can."""
    if method.sparsifier not in sc.list_sparsifiers():
        return f"sparsifier {method.sparsifier!r} is not installed (have: {', '.join(sc.list_sparsifiers())})"
    if method.sequential and "sequential" not in inspect.signature(sc.sparsify).parameters:
        return "this sparsity_core's sparsify() has no sequential= (layer-sequential calibration)"
    return None


def prune_and_score(
    dense: torch.nn.Module, method: Method, setting: dict[str, Any], calibration: list[torch.Tensor], held_out: torch.Tensor
) -> dict[str, float]:
    model = copy.deepcopy(dense)
    # a sparsifier that needs no data (magnitude) is handed the batches too: sparsify ignores them
    kwargs: dict[str, Any] = {"calibration": calibration}
    if method.sequential:
        kwargs["sequential"] = BLOCKS
    start = time.perf_counter()
    report = sc.sparsify(model, method.sparsifier, {**tinylm.BLOCK_LINEARS, **setting}, **kwargs)
    seconds = time.perf_counter() - start
    return {"ppl": tinylm.perplexity(model, held_out), "sparsity": report.overall, "prune_s": seconds}


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def markdown(table: dict[str, dict[str, dict[str, float]]], skipped: dict[str, str], notes: bool = True) -> str:
    cols = list(next(iter(table.values())))
    lines = [
        "| method | " + " | ".join(f"{c} unstructured" if c.endswith("%") else c for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, row in table.items():
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" if c in row else "n/a" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, why in skipped.items():
        lines.append(f"| {label} | " + " | ".join("skipped" for _ in cols) + " |")
    text = "\n".join(lines)
    if skipped and notes:
        text += "\n\n" + "\n".join(f"- {label} skipped: {why}" for label, why in skipped.items())
    return text


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = QUICK if args.quick else tinylm.Config()
    corpus = tinylm.Corpus.load(config.max_train_bytes, config.max_val_bytes)
    held_out = tinylm.consecutive_windows(corpus.val, args.eval_windows, config.context)
    cache = None if args.no_cache else Path(args.cache_dir)
    chosen = [m for m in METHODS if args.methods is None or m.label in args.methods or m.sparsifier in args.methods]
    skipped = {m.label: why for m in chosen if (why := availability(m)) is not None}
    runnable = [m for m in chosen if m.label not in skipped]
    columns = settings(args.levels)

    runs: list[dict[str, Any]] = []
    training: list[dict[str, Any]] = []
    for seed in args.seeds:
        dense, meta = tinylm.trained(config, corpus, seed, cache, log=args.verbose)
        training.append({"seed": seed, **{k: v for k, v in meta.items() if k not in ("config", "seed")}})
        generator = torch.Generator().manual_seed(20_000 + seed)
        windows = tinylm.random_windows(corpus.train, args.calibration, config.context, generator)[:, :-1]
        calibration = list(windows.split(args.calibration_batch))
        runs.append({"method": DENSE, "setting": None, "seed": seed, "ppl": tinylm.perplexity(dense, held_out), "sparsity": 0.0})
        for method in runnable:
            for setting, spec in columns.items():
                result = prune_and_score(dense, method, spec, calibration, held_out)
                runs.append({"method": method.label, "setting": setting, "seed": seed, **result})
                if args.verbose:
                    print(f"  seed {seed} {method.label:24s} {setting:4s} ppl {result['ppl']:.3f} "
                          f"(sparsity {result['sparsity']:.3f}, {result['prune_s']:.1f} s)", flush=True)

    table: dict[str, dict[str, dict[str, float]]] = {}
    dense_ppl = [r["ppl"] for r in runs if r["method"] == DENSE]
    table[DENSE] = {s: summarise(dense_ppl) for s in columns}
    # paired by seed: each pruned model against its own dense model, which removes the
    # seed-to-seed spread of the dense models (larger than most gaps between methods here)
    dense_by_seed = {r["seed"]: r["ppl"] for r in runs if r["method"] == DENSE}
    increase: dict[str, dict[str, dict[str, float]]] = {}
    for method in runnable:
        cells = {s: [r for r in runs if r["method"] == method.label and r["setting"] == s] for s in columns}
        table[method.label] = {s: summarise([r["ppl"] for r in rs]) for s, rs in cells.items()}
        increase[method.label] = {s: summarise([r["ppl"] - dense_by_seed[r["seed"]] for r in rs]) for s, rs in cells.items()}
    return {
        "config": dataclasses.asdict(config),
        "corpus": {"train_bytes": corpus.train.numel(), "val_bytes": corpus.val.numel(), "digest": corpus.digest},
        "seeds": list(args.seeds),
        "calibration": {"sequences": args.calibration, "length": config.context, "batch": args.calibration_batch},
        "eval": {"windows": int(held_out.shape[0]), "length": config.context},
        "coverage": tinylm.BLOCK_LINEARS,
        "threads": torch.get_num_threads(),
        "training": training,
        "runs": runs,
        "table": table,
        "increase_over_dense": increase,
        "skipped": skipped,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and data (seconds): the smoke test's run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0 1)")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5], help="unstructured levels, one column each (default 0.5), beside 2:4")
    parser.add_argument("--methods", nargs="+", default=None, help="labels or sparsifier names to run (default: all)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sequences (default 32; --quick: 8)")
    parser.add_argument("--calibration-batch", type=int, default=8, help="sequences per calibration batch")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows scored (default 64; --quick: 16)")
    parser.add_argument("--cache-dir", default="out/quality", help="where trained dense weights are kept (default out/quality)")
    parser.add_argument("--no-cache", action="store_true", help="train every model afresh and keep nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    parser.add_argument("--json", metavar="PATH", help="also write every run and the summary as JSON")
    parser.add_argument("--verbose", action="store_true", help="print training progress and each run")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if args.calibration is None:
        args.calibration = 8 if args.quick else 32
    if args.eval_windows is None:
        args.eval_windows = 16 if args.quick else 64
    if not all(0.0 < level < 1.0 for level in args.levels):
        parser.error(f"--levels: each must lie strictly between 0 and 1, got {args.levels}")
    if args.methods is not None:
        known = {m.label for m in METHODS} | {m.sparsifier for m in METHODS}
        unknown = sorted(set(args.methods) - known)
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(markdown(result["table"], result["skipped"]))
    trained_now = [t for t in result["training"] if not t.get("cached")]
    print(
        f"\nperplexity per byte on {result['eval']['windows']} held-out windows of {result['eval']['length']} bytes; "
        f"mean ± std over seeds {result['seeds']}; {len(trained_now)} model(s) trained now; {result['wall_s']} s"
    )
    if result["increase_over_dense"]:
        print("\nincrease over each seed's own dense model (paired; mean ± std over seeds):\n")
        print(markdown(result["increase_over_dense"], result["skipped"], notes=False))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    bad = [r for r in result["runs"] if not math.isfinite(r["ppl"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
