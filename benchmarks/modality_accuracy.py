"""How much each modality carries on its own: `python benchmarks/modality_accuracy.py [--benchmark av-digits]`.

Encodes the benchmark through the feature cache (a cache hit after the first time), then fits a
joint (non-continual) logistic regression on the train rows of each modality alone and of all
modalities together (tokens mean-pooled, standardised) and prints test accuracy as Markdown.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.benchmarks import benchmark_path
from pipeline.cache import build_features
from pipeline.config import load_config
from pipeline.data import batch_to_arrays, load_data
from pipeline.driver import _quiet, init_ray
from pipeline.tracking import data_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--benchmark", default="av-digits")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, [f"benchmark={args.benchmark}", *args.overrides])
    _quiet(False)
    raw_path = benchmark_path(cfg.benchmark, Path(cfg.output_dir) / "data")
    data = load_data(raw_path)
    started = time.time()
    if data.needs_encoding:
        init_ray(cfg, verbose=False)
        data = load_data(build_features(data, data_fingerprint(raw_path), cfg.encoders, cfg.encoder_tokens,
                                        cfg.cache_dir(), cfg.cache.actors, cfg.cache.batch_size))
    print(f"features ready in {time.time() - started:.1f}s")
    columns = {c: data.column(c) for c in ["label", *data.modalities]}
    feats, _, labels = batch_to_arrays(columns, data.modalities)
    pooled = {m: x.mean(1) if x.ndim == 3 else x for m, x in feats.items()}
    split = data.column("split")
    train, test = split == "train", split == "test"
    views = {**{f"{m} only": [m] for m in pooled}, "fused (all modalities)": list(pooled)}
    print(f"| {cfg.benchmark}: joint logistic regression | test accuracy |\n|---|---|")
    for name, mods in views.items():
        x = np.concatenate([pooled[m] for m in mods], 1)
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x[train]), labels[train])
        print(f"| {name} | {clf.score(scaler.transform(x[test]), labels[test]):.3f} |")


if __name__ == "__main__":
    main()
