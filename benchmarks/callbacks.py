"""The Lightning callbacks on the demo task (digits MLP, 84,480 covered weights), against
Lightning's ``ModelPruning`` at the same final level and a matching schedule.

    python benchmarks/callbacks.py            # about a minute or two
    python benchmarks/callbacks.py --quick    # a smoke run

Time: each repeat fits the same initial model for ``--epochs`` epochs once per case, cases
interleaved so that a noisy neighbour hits them alike; an epoch is timed from
``on_train_epoch_start`` to ``on_train_epoch_end`` after the pruning callbacks (so their epoch-end
work counts). The clock is this process's CPU time (``time.process_time``, one torch thread, no
dataloader workers), so that other jobs on a shared machine do not count; each fit's median
epoch is taken; the table shows the best fit of each case (interference only ever adds time)
and, for the ratio, the median over repeats of each fit against the no-callback fit of the same
repeat (adjacent in time, so drifting load cancels).
Two settings: training only (no validation: the strictest ratio, as the per-step work is all
there is), and the demo's epoch (training + validation on 300 digits).
Cases: no callback; ``TrainingAwareSparsity("magnitude", cubic)`` to 90% (masks re-applied after
every optimizer step, updated at epoch ends); ``ModelPruning("l1_unstructured")`` per layer, with
``amount`` per epoch chosen so that its cumulative level follows the same cubic schedule (it
multiplies weight_orig by the mask in a forward pre-hook at every forward).

Accuracy: for each seed, a dense model is trained for 10 epochs; from that same state each method
prunes for 15 epochs (cubic from epoch 0 to 10, then 5 epochs of fine-tuning) to 90% and 95%, and
the test accuracy (297 held-out digits) is reported as mean and range over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

from sparsity_core import SparsityController  # noqa: E402
from sparsity_core.lightning import TrainingAwareSparsity  # noqa: E402

OVERHEAD_GOAL = 0.03
SCHEDULE_END = 10


def cubic(t: float, level: float, end: float = SCHEDULE_END) -> float:
    return level * (1.0 - (1.0 - min(t, end) / end) ** 3)


def model_pruning(model: DigitsClassifier, level: float) -> ModelPruning:
    """Lightning's ModelPruning with our cubic schedule: at the end of epoch e (0-based) it prunes a
    fraction of the *remaining* weights, so that the cumulative level is cubic(e + 1)."""

    def amount(epoch: int) -> float:
        before, after = cubic(epoch, level), cubic(epoch + 1, level)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)

    layers = [(m, "weight") for m in model.model if isinstance(m, nn.Linear)]
    return ModelPruning(
        "l1_unstructured", parameters_to_prune=layers, amount=amount, use_global_unstructured=False,
        make_pruning_permanent=True, verbose=0,
    )


def ours(level: float) -> TrainingAwareSparsity:
    return TrainingAwareSparsity(
        "magnitude", {"sparsity_level": level}, "cubic", {"start": 0, "end": SCHEDULE_END}, verbose=False
    )


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, *args: Any) -> None:
        self._start = time.process_time()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.times.append(time.process_time() - self._start)


def trainer(epochs: int, callbacks: list[pl.Callback], validate: bool = False) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=None if validate else 0,
    )


def sparsity(model: DigitsClassifier) -> float:
    weights = [m.weight for m in model.model if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class Stopwatch:
    """CPU time spent inside wrapped callables (nested calls counted once)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.process_time() - start
                self._depth -= 1

        return timed


@contextlib.contextmanager
def attributed(callbacks: list[pl.Callback], watch: Stopwatch):
    """Time the per-epoch work of the pruning callbacks: their batch and epoch-end hooks, our mask
    re-application after each optimizer step, torch.nn.utils.prune's forward pre-hooks."""
    for cb in callbacks:
        for hook in ("on_train_batch_end", "on_train_epoch_end"):
            setattr(cb, hook, watch.wrap(getattr(cb, hook)))
    saved = SparsityController.apply_masks, prune.BasePruningMethod.__call__
    SparsityController.apply_masks = watch.wrap(saved[0])  # type: ignore[method-assign]
    prune.BasePruningMethod.__call__ = watch.wrap(saved[1])  # type: ignore[method-assign]
    try:
        yield
    finally:
        SparsityController.apply_masks, prune.BasePruningMethod.__call__ = saved  # type: ignore[method-assign]


def time_cases(
    data: DigitsDataModule, epochs: int, repeat: int, validate: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per case and fit: the median epoch, and the CPU time inside the pruning callback's per-epoch
    work as a fraction of the rest of the epochs (the overhead, attributed)."""
    pl.seed_everything(0, verbose=False)
    initial = DigitsClassifier().state_dict()
    cases = {
        "no callback": lambda m: [],
        "TrainingAwareSparsity": lambda m: [ours(0.9)],
        "ModelPruning": lambda m: [model_pruning(m, 0.9)],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    shares: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeat):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            model = DigitsClassifier()
            model.load_state_dict(initial)
            timer, watch = EpochTimer(), Stopwatch()
            callbacks = cases[name](model)
            with attributed(callbacks, watch):
                trainer(epochs, [*callbacks, timer], validate=validate).fit(model, datamodule=data)
            times[name].append(statistics.median(timer.times[1:]))  # the first epoch pays one-off costs
            shares[name].append(watch.total / (sum(timer.times) - watch.total))
            if name != "no callback" and epochs > SCHEDULE_END:
                assert abs(sparsity(model) - 0.9) < 0.005, (name, sparsity(model))
    return times, shares


def accuracy_cases(data: DigitsDataModule, seeds: list[int], levels: list[float], dense_epochs: int, prune_epochs: int):
    results: dict[tuple[str, float], list[float]] = {}
    reached: dict[tuple[str, float], list[float]] = {}
    dense: list[float] = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        model = DigitsClassifier()
        t = trainer(dense_epochs, [])
        t.fit(model, datamodule=data)
        dense.append(t.test(model, datamodule=data, verbose=False)[0]["test_acc"])
        state = copy.deepcopy(model.state_dict())
        for level in levels:
            for name in ("TrainingAwareSparsity", "ModelPruning"):
                pl.seed_everything(seed + 1000, verbose=False)
                m = DigitsClassifier()
                m.load_state_dict(state)
                cb = ours(level) if name == "TrainingAwareSparsity" else model_pruning(m, level)
                t = trainer(prune_epochs, [cb])
                t.fit(m, datamodule=data)
                results.setdefault((name, level), []).append(t.test(m, datamodule=data, verbose=False)[0]["test_acc"])
                reached.setdefault((name, level), []).append(sparsity(m))
    return dense, results, reached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="fits per case for the timing")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per timed fit")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the accuracy comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, 1 seed")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.seeds = 2, 1
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|smaller than the logging interval).*")

    data = DigitsDataModule(batch_size=32)
    data.setup()
    started = time.perf_counter()
    print(f"Epoch time on the digits MLP ({len(data.train)} samples, batch 32, "
          f"{len(data.train_dataloader())} optimizer steps/epoch), {args.threads} thread(s), "
          f"CPU time, best of {args.repeat} fits of each case (median of {args.epochs - 1} epochs each):")
    print(f"  {'case':<24}{'train ms':>10}{'vs none':>9}{'attrib.':>10}{'train+val ms':>14}{'vs none':>9}{'attrib.':>10}")
    print(f"  {'':<24}{'(best)':>10}{'(median)':>9}{'':>10}{'(best)':>14}{'(median)':>9}")
    measured = {validate: time_cases(data, args.epochs, args.repeat, validate) for validate in (False, True)}
    timings = {v: m[0] for v, m in measured.items()}
    shares = {v: {name: statistics.median(x) for name, x in m[1].items()} for v, m in measured.items()}
    best = {v: {name: min(values) for name, values in t.items()} for v, t in timings.items()}
    # Ratios pair each fit with the no-callback fit of the same repeat (adjacent in time), and the
    # median over repeats is reported: drifting load on a shared machine cancels out.
    ratios = {
        v: {name: statistics.median(x / b for x, b in zip(values, t["no callback"])) for name, values in t.items()}
        for v, t in timings.items()
    }
    for name in best[False]:
        cells = [
            f"{1000 * best[v][name]:>{14 if v else 10}.2f}{ratios[v][name]:>8.3f}x{shares[v][name]:>10.1%}"
            for v in (False, True)
        ]
        print(f"  {name:<24}{cells[0]}{cells[1]}")
    print("  (attributed: CPU time inside the callback's per-epoch work, its mask re-application and, for")
    print("   ModelPruning, torch.nn.utils.prune's forward pre-hooks, over the rest of the epoch; it misses")
    print("   ModelPruning's extra backward through weight_orig * mask)")
    for validate, label in ((False, "training only"), (True, "training + validation")):
        spread = timings[validate]["no callback"]
        print(f"  {label}: the no-callback fits alone ranged {1000 * min(spread):.1f}-{1000 * max(spread):.1f} ms"
              f" per epoch (the noise an end-to-end ratio carries here)")
    for validate, label in ((False, "training only"), (True, "training + validation")):
        overhead = ratios[validate]["TrainingAwareSparsity"] - 1
        share = shares[validate]["TrainingAwareSparsity"]
        verdict = "meets" if max(share, overhead) <= OVERHEAD_GOAL else "MISSES"
        print(f"  {label}: TrainingAwareSparsity {overhead:+.1%} end to end, {share:.1%} attributed "
              f"({verdict} the goal of <= {OVERHEAD_GOAL:.0%}); ModelPruning {ratios[validate]['ModelPruning'] - 1:+.1%}"
              f" end to end, {shares[validate]['ModelPruning']:.1%} attributed")

    seeds = list(range(args.seeds))
    dense, results, reached = accuracy_cases(data, seeds, [0.9, 0.95], dense_epochs=10, prune_epochs=15)
    print()
    print(f"Test accuracy (297 digits), dense 10 epochs then 15 epochs of pruning (cubic to epoch "
          f"{SCHEDULE_END}), mean [min, max] over {len(seeds)} seed(s):")
    print(f"  dense: {statistics.mean(dense):.2%} [{min(dense):.2%}, {max(dense):.2%}]")
    print(f"  {'level':<7}{'TrainingAwareSparsity':>32}{'ModelPruning':>32}")
    for level in (0.9, 0.95):
        cells = []
        for name in ("TrainingAwareSparsity", "ModelPruning"):
            accs, sp = results[(name, level)], reached[(name, level)]
            cells.append(f"{statistics.mean(accs):.2%} [{min(accs):.2%}, {max(accs):.2%}] @{statistics.mean(sp):.1%}")
        print(f"  {level:<7.0%}{cells[0]:>32}{cells[1]:>32}")
    print(f"(@: measured fraction of zero weights)  total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
