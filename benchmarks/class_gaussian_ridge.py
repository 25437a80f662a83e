"""Can class Gaussians stand in for old rows? `python benchmarks/class_gaussian_ridge.py [--benchmark av-digits]`.

RanPAC's head (a random ReLU projection and a ridge head; joint, not continual) on the cached frozen
features, pooled and scaled per modality as the methods do, fitted once on the real train rows and
once on rows drawn from each class's Gaussian (its mean and a rank-r covariance plus an isotropic
rest, fitted on those rows). Test accuracy as Markdown. If the Gaussians do as well, an adapter
that keeps training could refit its head from stored class statistics instead of stored rows.
"""
import numpy as np

from modality_accuracy import pooled_features, scaled_per_modality  # this folder's script

RIDGES = (0.1, 1.0, 10.0, 100.0)


def class_gaussian_samples(x, labels, rank, per_class, rng):
    out, out_labels = [], []
    for c in np.unique(labels):
        rows = x[labels == c]
        mean, centred = rows.mean(0), rows - rows.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        rest = (s[rank:] ** 2).sum() / len(rows) / x.shape[1]
        draw = (rng.standard_normal((per_class, rank)) * s[:rank] / np.sqrt(len(rows))) @ vt[:rank]
        out.append(mean + draw + rng.standard_normal((per_class, x.shape[1])) * np.sqrt(rest))
        out_labels.append(np.full(per_class, c))
    return np.concatenate(out), np.concatenate(out_labels)


def main() -> None:
    name, pooled, labels, split, _ = pooled_features(__doc__)
    train, test = split == "train", split == "test"
    x = scaled_per_modality(pooled, train)
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((x.shape[1], 2048)) / np.sqrt(x.shape[1])
    classes = int(labels.max()) + 1

    def test_accuracy(fit_x, fit_y, ridge):
        phi = np.maximum(fit_x @ projection, 0)
        w = np.linalg.solve(phi.T @ phi + ridge * np.eye(phi.shape[1]), phi.T @ np.eye(classes)[fit_y])
        return ((np.maximum(x[test] @ projection, 0) @ w).argmax(1) == labels[test]).mean()

    print(f"| {name}: ridge head fitted on | " + " | ".join(f"ridge {r:g}" for r in RIDGES) + " |")
    print("|---|" + "---|" * len(RIDGES))
    print("| the real train rows | " + " | ".join(f"{test_accuracy(x[train], labels[train], r):.3f}"
                                               for r in RIDGES) + " |")
    for rank in (0, 16, 64):
        fx, fy = class_gaussian_samples(x[train], labels[train], rank, 2000, rng)
        print(f"| class Gaussians, rank {rank} | " + " | ".join(f"{test_accuracy(fx, fy, r):.3f}" for r in RIDGES) + " |")


if __name__ == "__main__":
    main()
