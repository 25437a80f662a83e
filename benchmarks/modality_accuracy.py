"""How much each modality carries on its own: `python benchmarks/modality_accuracy.py [--benchmark av-digits]`.

Encodes the benchmark through the feature cache (a cache hit after the first time), then fits a
joint (non-continual) logistic regression on the train rows of each modality alone and of all
modalities together (tokens mean-pooled, standardised) and prints test accuracy as Markdown, with a
column per domain where the data has several.
"""
import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.config import load_config
from pipeline.data import batch_to_arrays
from pipeline.driver import prepare_data
from pipeline.runtime import quiet_logs


def pooled_features(description: str, extra: str | None = None):
    """(benchmark name, {modality: pooled features}, labels, split, domain[, the column `extra`]) for
    the command line's benchmark."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--benchmark", default="av-digits")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, [f"benchmark={args.benchmark}", *args.overrides])
    quiet_logs(False)
    started = time.time()
    data = prepare_data(cfg).load()
    print(f"features ready in {time.time() - started:.1f}s")
    feats, _, labels = batch_to_arrays({c: data.column(c) for c in ["label", *data.modalities]}, data.modalities)
    return (cfg.benchmark, {m: x.mean(1) if x.ndim == 3 else x for m, x in feats.items()}, labels,
            data.column("split"), data.column("domain"), *([data.column(extra)] if extra else []))


def scaled_per_modality(pooled: dict, train: np.ndarray) -> np.ndarray:
    """The methods' input: each modality centred on the train rows and scaled to unit mean squared
    norm there, modalities concatenated."""
    blocks = []
    for x in pooled.values():
        centred = x - x[train].mean(0)
        blocks.append(centred / np.sqrt((centred[train] ** 2).sum(1).mean()))
    return np.concatenate(blocks, 1)


def main() -> None:
    name, pooled, labels, split, domain = pooled_features(__doc__)
    train, test = split == "train", split == "test"
    domains = sorted(set(domain[test]))
    domains = domains if len(domains) > 1 else []
    views = {**{f"{m} only": [m] for m in pooled}, "fused (all modalities)": list(pooled)}
    print(f"| {name}: joint logistic regression | test accuracy |{''.join(f' {d} |' for d in domains)}\n"
          f"|---|---|{'---|' * len(domains)}")
    for view, mods in views.items():
        x = np.concatenate([pooled[m] for m in mods], 1)
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x[train]), labels[train])
        right = clf.predict(scaler.transform(x[test])) == labels[test]
        by_domain = "".join(f" {right[domain[test] == d].mean():.3f} |" for d in domains)
        print(f"| {view} | {right.mean():.3f} |{by_domain}")


if __name__ == "__main__":
    main()
