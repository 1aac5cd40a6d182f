"""Training upkeep: what keeping pruned weights at zero costs per optimizer step.

Two ways, on one model and optimizer, steps interleaved (none / weights / gradients) so that load
on a shared machine hits all three alike:

* ``weights`` (today's default): re-apply every mask after each ``optimizer.step()``;
* ``gradients``: multiply each gradient by its mask as it is accumulated (post-accumulate-grad
  hooks); the optimizer state of pruned entries is zeroed once per mask update (timed apart).

The upkeep's own time is measured inside the real step (the controller's ``apply_masks`` and
gradient hook, timed in place) and printed as a fraction of the step without upkeep. Models: the
demo's MLP (64-256-256-10) on the digits, batch 128, Adam; a stack of Linear layers of about 100M
parameters at batch 32 and 256, with AdamW and SGD with momentum. Pruned to 90% (magnitude).

Run: ``python benchmarks/upkeep.py [--rounds 5] [--width 4096 --depth 6] [--batches 32 256] [--quick]``
(``--width 1024 --depth 96``: the same 100M parameters in layers whose gradient fits in cache).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsity_core import SparsityController

MODES = ("none", "weights", "gradients")


def timed(obj: Any, attr: str, sink: list[float]) -> None:
    """Replace ``obj.attr`` (a bound method) by one that adds its run time to ``sink[0]``."""
    inner = getattr(obj, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink[0] += time.perf_counter() - t0

    setattr(obj, attr, wrapper)


def measure(
    label: str,
    model: nn.Module,
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rounds: int,
) -> None:
    opt = make_opt(list(model.parameters()))
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.9})
    spent = [0.0]
    timed(c, "apply_masks", spent)  # the step post-hook calls it through the instance
    timed(c, "_mask_gradient", spent)  # hooks bind it at attach time: wrap before attaching

    def one_step() -> float:
        x, y = batch()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    one_step()  # dense: the optimizer state exists before the prune, as in gradual pruning
    c.step()
    c.attach(opt, upkeep="gradients")
    t0 = time.perf_counter()
    c._mask_optimizer_state(c.masks)
    state_zeroing = time.perf_counter() - t0
    c.detach()
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    upkeep: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds + 1):  # round 0 warms up
        for mode in MODES:
            c.detach()
            if mode != "none":
                c.attach(opt, upkeep=mode)
            spent[0] = 0.0
            took = one_step()
            if r:
                steps[mode].append(took)
                upkeep[mode].append(spent[0])
    c.detach()
    base = statistics.median(steps["none"])
    w = statistics.median(upkeep["weights"])
    g = statistics.median(upkeep["gradients"])
    print(
        f"{label:<44} step {base * 1e3:8.1f} ms | weights {w * 1e3:7.2f} ms {w / base:6.1%} | "
        f"gradients {g * 1e3:7.2f} ms {g / base:6.1%} | g/w {g / w:5.2f} | state zeroing per update "
        f"{state_zeroing * 1e3:6.1f} ms ({state_zeroing / base:.2f} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per mode and case (medians)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=6, help="Linear layers of width x width (6 x 4096^2: 100.7M)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="batch sizes of the stack")
    parser.add_argument("--quick", action="store_true", help="the demo model only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"upkeep per optimizer step at 90% sparsity, one thread, medians of {args.rounds} interleaved steps "
          f"(demo: {max(args.rounds, 50)});")
    print("fraction = upkeep time inside the step / step time without upkeep")

    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)

    def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x_all), (128,), generator=gen)
        return x_all[idx], y_all[idx]

    demo = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    ce = nn.functional.cross_entropy
    rounds_demo = max(args.rounds, 50)  # sub-millisecond steps: more of them
    measure("demo MLP, batch 128, Adam", demo, lambda p: torch.optim.Adam(p, lr=2e-3), digits_batch, ce, rounds_demo)
    measure("demo MLP, batch 128, SGD momentum", demo, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            digits_batch, ce, rounds_demo)
    if args.quick:
        return
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    stack = nn.Sequential(*layers[:-1])
    n = sum(p.numel() for p in stack.parameters())
    mse = nn.functional.mse_loss
    for bs in args.batches:
        def stack_batch(bs: int = bs) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.randn(bs, args.width), torch.randn(bs, args.width)

        for opt_name, make in (
            ("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01)),
            ("SGD momentum", lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
        ):
            measure(f"{n / 1e6:.1f}M Linear stack, batch {bs}, {opt_name}", stack, make, stack_batch, mse, args.rounds)


if __name__ == "__main__":
    main()
