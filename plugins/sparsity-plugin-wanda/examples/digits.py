"""Wanda vs magnitude, one shot, on scikit-learn's digits: test accuracy at each sparsity level.

    python plugins/sparsity-plugin-wanda/examples/digits.py [--seeds 5] [--out wanda_digits.png]

The demo task's MLP (64 -> 128 -> 10) is trained in plain torch (well under a second per seed),
then, per level, a copy is sparsified once with `magnitude` and once with `wanda` (calibrated on 8
training batches of 64), without retraining. Accuracies are averaged over seeds (data split,
initialisation and training order), for standardised inputs (the usual preprocessing) and for
raw pixel intensities scaled to [0, 1].
"""

from __future__ import annotations

import argparse
import copy
from statistics import mean

import torch
from torch import nn

from sparsity_core import sparsify

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
METHODS = ("magnitude", "wanda")


def load(seed: int = 0, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    if standardize:  # as sklearn's StandardScaler, fitted on the training split
        mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    return x_tr, torch.tensor(y_tr), x_te, torch.tensor(y_te)


def train(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 20) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def compare(
    levels: tuple[float, ...] = LEVELS,
    seeds: tuple[int, ...] = (0,),
    standardize: bool = True,
    args: dict[str, object] | None = None,
) -> dict[str, list[list[float]]]:
    """Per method ("dense", "magnitude", "wanda"): [per level: [per seed: test accuracy]].
    ``args``: further sparsifier arguments given to both methods (e.g. ``{"scope": "global"}``)."""
    out: dict[str, list[list[float]]] = {m: [[] for _ in levels] for m in ("dense", *METHODS)}
    for seed in seeds:
        x_tr, y_tr, x_te, y_te = load(seed, standardize)
        model = train(x_tr, y_tr, seed)
        calibration = list(x_tr[:512].split(64))
        dense = accuracy(model, x_te, y_te)
        for i, level in enumerate(levels):
            out["dense"][i].append(dense)
            for method in METHODS:
                pruned = copy.deepcopy(model)
                sparsify(pruned, method, {"sparsity_level": level, **(args or {})}, calibration=calibration)
                out[method][i].append(accuracy(pruned, x_te, y_te))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="average over seeds 0..N-1")
    parser.add_argument("--out", help="write the figure here (PNG)")
    args = parser.parse_args()
    seeds = tuple(range(args.seeds))
    panels = {}
    for standardize in (True, False):
        title = "standardised inputs" if standardize else "raw pixels / 16"
        result = panels[title] = compare(LEVELS, seeds, standardize)
        print(f"{title}: mean test accuracy over seeds {list(seeds)} (dense {mean(result['dense'][0]):.4f})")
        print("  level  magnitude  wanda   wanda wins")
        for i, level in enumerate(LEVELS):
            wins = sum(w >= m for w, m in zip(result["wanda"][i], result["magnitude"][i]))
            print(f"  {level:5.2f}  {mean(result['magnitude'][i]):9.4f}  {mean(result['wanda'][i]):.4f}  {wins}/{len(seeds)}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for ax, (title, result) in zip(axes, panels.items()):
            ax.plot(LEVELS, [mean(v) for v in result["dense"]], "k--", label="dense")
            for method, marker in zip(METHODS, "os"):
                ax.plot(LEVELS, [mean(v) for v in result[method]], marker + "-", label=f"{method} (one shot)")
            ax.set(title=f"digits MLP 64-128-10, {title}", xlabel="sparsity of every Linear weight")
        axes[0].set_ylabel(f"test accuracy (mean of {len(seeds)} seeds)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
