"""Which ridge strength do the analytic heads pick? `python benchmarks/ridge_holdout.py --benchmark tuxpaint`.

ranpac's head (a random ReLU projection of the pooled frozen features, scaled per modality as the
methods do) fitted on all train rows, its strength chosen as `RidgeStatistics` chooses it: the
squared error on about a fifth of the train rows held out from the fit. Two ways to hold them
out: by each row's content (what the heads did before) and by the row's `group` (rows that share
a picture or a recording on one side: what the pipeline does now). Prints, per strength, the
held-out error and accuracy of both, and the test accuracy of the head refitted on every train
row, as Markdown; the test column shows what each choice costs and chooses nothing.
"""
import numpy as np
import torch

from models.holdout import held_out_groups
from models.methods.analytic import held_out
from modality_accuracy import pooled_features, scaled_per_modality  # this folder's script

GRID = tuple(10.0**k for k in range(-2, 4))


def main() -> None:
    name, pooled, labels, split, _, group = pooled_features(__doc__, extra="group")
    train, test = split == "train", split == "test"
    x = scaled_per_modality(pooled, train)
    phi = np.maximum(x @ np.random.default_rng(0).standard_normal((x.shape[1], 2048)) / np.sqrt(x.shape[1]), 0)
    y = np.eye(int(labels.max()) + 1)[labels]
    rules = {"by content": held_out(torch.from_numpy(x)).numpy(),
             "by group": held_out_groups(group)}
    cells = {}
    for rule, held in rules.items():
        held, fit = held & train, train & ~held
        gram, cross = phi[fit].T @ phi[fit], phi[fit].T @ y[fit]
        for lam in GRID:
            w = np.linalg.solve(gram + lam * np.eye(len(gram)), cross)
            error = ((phi[held] @ w - y[held]) ** 2).sum() / held.sum()
            cells.setdefault(lam, []).append(f"{error:.3f} | {((phi[held] @ w).argmax(1) == labels[held]).mean():.3f}")
    print(f"| {name}: ridge | " + " | ".join(f"{r}: held-out error | {r}: held-out accuracy" for r in rules)
          + " | test accuracy, fitted on every train row |\n|---|" + "---|---|" * len(rules) + "---|")
    for lam, row in cells.items():
        w = np.linalg.solve(phi[train].T @ phi[train] + lam * np.eye(phi.shape[1]), phi[train].T @ y[train])
        print(f"| {lam:g} | " + " | ".join(row) + f" | {((phi[test] @ w).argmax(1) == labels[test]).mean():.3f} |")


if __name__ == "__main__":
    main()
