"""What do class Gaussians cost cmoe's head? `python benchmarks/head_refit.py SEQUENCE [SEQUENCE ...] [--benchmark av-digits]`.

SEQUENCE: the folder of a finished class-IL cmoe sequence, e.g. from `mmcl bench`:
runs/bench/av-digits-class-il-cmoe-seed0-<fingerprint> (it keeps its last task's model). The ridge
head is refitted under the final adapter, once on every train row (an oracle that would keep every
task's rows) and once on rows drawn from the class Gaussians alone; test accuracy over all classes
is printed beside the head as it was trained (earlier classes from their Gaussians, the last
task's from its rows).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.driver import prepare_data
from pipeline.runtime import quiet_logs
from pipeline.evaluate import predict
from pipeline.data import batch_to_arrays
from pipeline.checkpoint import load_model


def refit(model, rows: dict | None, modalities, class_index) -> None:
    """The ridge statistics rebuilt from `rows` (real) or, when None, from the class Gaussians."""
    model.ridge.begin_task(model.head_size)
    model.ridge.forget()
    with torch.no_grad():
        if rows is None:
            model.refit_ridge_inputs()
        else:
            for lo in range(0, len(rows["label"]), 256):
                feats, present, labels = batch_to_arrays({k: v[lo:lo + 256] for k, v in rows.items()}, modalities)
                feats = {m: torch.from_numpy(x) for m, x in feats.items()}
                model.ridge.accumulate(model.ridge_input(feats, torch.from_numpy(present)),
                                       torch.from_numpy(class_index[labels]))
    model.ridge.end_task(lambda t: t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sequences", nargs="+")
    parser.add_argument("--benchmark", default="av-digits")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. cache.dir=runs/cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_logs(False)
    data = prepare_data(load_config(None, [f"benchmark={args.benchmark}", *args.set])).load()
    columns = {c: data.column(c) for c in ["label", *data.modalities]}
    split = data.column("split")
    print("| sequence | head as trained | refit on Gaussian draws | refit on every train row (oracle) |\n|---|---|---|---|")
    for folder in map(Path, args.sequences):
        tasks = json.loads((folder / "state.json").read_text())["tasks"]
        order = [c for t in tasks for c in t["classes"]]
        class_index = np.zeros(max(order) + 1, dtype=np.int64)
        class_index[order] = np.arange(len(order))
        model, spec = load_model(folder / f"task-{len(tasks) - 1}")
        modalities = spec["modalities"]

        def accuracy():
            test = {k: v[split == "test"] for k, v in columns.items()}
            return float((predict(model, test, modalities) == class_index[test["label"]]).mean())

        cells = [accuracy()]
        for rows in (None, {k: v[split == "train"] for k, v in columns.items()}):
            refit(model, rows, modalities, class_index)
            cells.append(accuracy())
        print(f"| {folder.name} | " + " | ".join(f"{a:.3f}" for a in cells) + " |")


if __name__ == "__main__":
    main()
