"""Does it help? movement vs magnitude while fine-tuning, and snip vs magnitude/random at initialisation.

On scikit-learn's digits (bundled, no download), an MLP 64-128-128-10, a few seeds:

- fine-tuning: a dense network trained to convergence is pruned during further training with a
  cubic schedule, by ``movement`` or by ``magnitude``; test accuracy at the end.
- transfer: the same, from a network trained on another task (the parity of the digit), which is
  the paper's setting (a pretrained network fine-tuned and pruned on a new task).
- at initialisation: the fresh network is pruned once by ``snip`` (from the gradients of a few
  training batches), ``magnitude`` or ``random``, then trained with its masks kept.

    python plugins/sparsity-plugin-movement/examples/digits.py     # a few minutes of CPU
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from sparsity_core import SparsityController


def data(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    to = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return to((xtr - mean) / std), torch.tensor(ytr), to((xte - mean) / std), torch.tensor(yte)


def network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, seed: int,
          controller: SparsityController | None = None) -> None:
    """SGD with momentum, minibatches of 64; with a controller, its masks follow its schedule
    (progress in epochs) and are kept after every step, then squashed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if controller is not None:
        # Gradients to the sparsifier before each step (for a schedule still to come), masks after it.
        controller.attach(optimizer, gradients=controller.levels != controller.final_levels)
        controller.step(0)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            optimizer.step()
        if controller is not None:
            controller.step(epoch + 1)
    if controller is not None:
        controller.squash()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fine_tune(method: str, level: float, seed: int, dense: dict[str, torch.Tensor], split: tuple[torch.Tensor, ...]) -> float:
    xtr, ytr, xte, yte = split
    model = network(seed)
    model.load_state_dict(dense)
    controller = SparsityController(model, method, {"sparsity_level": level}, "cubic", {"start": 0, "end": 15})
    train(model, xtr, ytr, 20, seed + 1, controller)
    return accuracy(model, xte, yte)


def at_init(method: str, level: float, seed: int, split: tuple[torch.Tensor, ...]) -> float:
    xtr, ytr, xte, yte = split
    model = network(seed)
    scope = "global" if method.endswith("global") else "layer"
    name = method.split("-")[0]
    controller = SparsityController(model, name, {"sparsity_level": level, "scope": scope})
    if name == "snip":  # gradients of the loss over 4 training batches, at initialisation
        gen = torch.Generator().manual_seed(seed)
        batches = [(xtr[i], ytr[i]) for i in torch.randperm(len(xtr), generator=gen)[:256].split(64)]
        controller.calibrate(batches, loss_fn=nn.functional.cross_entropy)
    controller.step()  # pruned once, at initialisation; the masks are kept while training
    train(model, xtr, ytr, 30, seed + 1, controller)
    return accuracy(model, xte, yte)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows: dict[tuple[str, str, float], list[float]] = {}
    for seed in range(args.seeds):
        split = data(seed)
        dense_model = network(seed)
        train(dense_model, split[0], split[1], 30, seed)
        dense = {k: v.clone() for k, v in dense_model.state_dict().items()}
        rows.setdefault(("dense", "-", 0.0), []).append(accuracy(dense_model, split[2], split[3]))
        parity_model = network(seed)
        train(parity_model, split[0], split[1] % 2, 30, seed)
        parity = {k: v.clone() for k, v in parity_model.state_dict().items()}
        for level in args.levels:
            for method in ("movement", "magnitude"):
                rows.setdefault(("fine-tune", method, level), []).append(fine_tune(method, level, seed, dense, split))
                rows.setdefault(("transfer", method, level), []).append(fine_tune(method, level, seed, parity, split))
            for method in ("snip", "snip-global", "magnitude", "random"):
                rows.setdefault(("at init", method, level), []).append(at_init(method, level, seed, split))

    print(f"test accuracy, mean (min..max) over {args.seeds} seeds")
    print("| setting | method | level | accuracy |\n|---|---|---|---|")
    for (setting, method, level), accs in sorted(rows.items(), key=lambda r: (r[0][0], r[0][2])):
        print(f"| {setting} | {method} | {level:g} | {statistics.mean(accs):.3f} ({min(accs):.3f}..{max(accs):.3f}) |")


if __name__ == "__main__":
    main()
