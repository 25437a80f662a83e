"""A sweep's trials side by side on validation: `python benchmarks/sweep_table.py runs/tune/sweep-XXXX [LABEL=DIR ...]`.

Each Tune trial folder holds its parameters and one result per task; the last is the sequence's
validation summary. Trials that differ only in `seed` are one row (mean over seeds), and each row
is paired, seed by seed, with the first row (a tie when the mean difference is within its spread).
`LABEL=DIR` names the trials of one folder (sweeps of two versions of the code, say). Test
numbers are not shown: nothing is chosen on them. Prints Markdown.
"""
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.bench import verdict


def trials(folder: Path, label: str) -> list[dict]:
    out = []
    for trial in sorted(folder.glob("run_trial_*")):
        lines = (trial / "result.json").read_text().splitlines()
        params = json.loads((trial / "params.json").read_text())
        if lines:
            last = json.loads(lines[-1])
            out.append({"params": params, "label": label, "task": last["task"], "val_avg_acc": last["val_avg_acc"],
                        "val_avg_inc_acc": last["val_avg_inc_acc"]})
    return out


def main(args: list[str]) -> None:
    found = []
    for arg in args:
        label, _, folder = arg.rpartition("=")
        found += trials(Path(folder), label)
    finished = max(t["task"] for t in found)
    rows = {}
    for t in found:
        if t["task"] == finished:
            name = ", ".join([*([t["label"]] if t["label"] else []),
                              *(f"{k}={v}" for k, v in t["params"].items() if k != "seed")])
            rows.setdefault(name, {})[t["params"].get("seed", 0)] = t
    reference, *_ = rows
    print(f"| trial | seeds | val avg acc | val avg inc acc | minus {reference} (paired) | by seed |")
    print("|---|---|---|---|---|---|")
    for name, by_seed in rows.items():
        seeds = sorted(set(by_seed) & set(rows[reference]))
        acc = np.array([by_seed[s]["val_avg_acc"] for s in seeds])
        diff = acc - np.array([rows[reference][s]["val_avg_acc"] for s in seeds])
        spread = diff.std(ddof=1) if len(diff) > 1 else 0.0
        paired = "-" if name == reference else (
            f"{diff.mean():+.3f} ± {spread:.3f} {verdict(diff.mean(), spread, len(diff))}")
        inc = np.mean([by_seed[s]["val_avg_inc_acc"] for s in seeds])
        print(f"| {name} | {len(seeds)} | {acc.mean():.3f} | {inc:.3f} | {paired} | "
              f"{', '.join(f'{d:+.3f}' for d in diff)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
