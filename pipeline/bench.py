"""`mmcl bench`: methods side by side on one benchmark and scenario, over seeds, as JSON and Markdown.

Each (method, seed) is one whole sequence through `run_sequence`, trained afresh every time, on Ray Train + DeepSpeed
(`executor=ray`, the default), as many side by side as the cluster's CPUs hold (each sequence one
worker of one CPU unless the config says otherwise); `executor=local` runs them in-process as Ray
tasks (one CPU each). Seeds change the class order and the initialisation.
"""
import copy
import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, RunConfig
from pipeline.driver import check_locations, prepare_data, run_sequence
from pipeline.executors import EXECUTORS, one_cpu_each
from pipeline.runtime import quiet_logs

METRICS = ("avg_acc", "avg_inc_acc", "forgetting", "bwt", "seconds")


def sequence_configs(config_for, methods: list[str], seeds: int, data_path: str, num_tasks: int) -> list[RunConfig]:
    """`config_for(method)`: the user's config built with that method, so that each method's own
    settings apply to the user's, not on top of another method's."""
    out = []
    for method in methods:
        for seed in range(seeds):
            cfg = copy.deepcopy(config_for(method))
            cfg.seed, cfg.data, cfg.num_tasks = seed, data_path, num_tasks
            cfg.tracking.enabled = False
            cfg.cache.dir = str(cfg.cache_dir())
            cfg.output_dir = str(Path(cfg.output_dir) / "bench")
            one_cpu_each(cfg)
            out.append(cfg)
    return out


def _run_one(cfg: RunConfig) -> dict:
    return run_sequence(cfg, log=lambda *_: None, fresh=True)


def run_bench(config_for, methods: list[str], seeds: int, log=print, merge: str | None = None) -> dict:
    """`merge`: an earlier bench JSON of the same benchmark, scenario, tasks and seeds, whose other
    methods' runs join the table as they were (so that a changed method reruns alone, or new methods
    are added); the table keeps that file's order and paired reference, new methods last."""
    quiet_logs(False)
    if not methods:
        raise ConfigError("--methods: no methods given")
    configs = {m: config_for(m) for m in methods}  # an unknown method or a bad setting stops the bench here
    base = configs[methods[0]]
    report_ignored(configs, log)
    check_locations(base)
    EXECUTORS[base.executor].start(base, verbose=False)
    source = prepare_data(base, log).source  # checked, built and encoded once, before sequences run side by side
    earlier_order, carried = carried_runs(merge, base, methods, seeds) if merge else ([], [])
    configs = sequence_configs(config_for, methods, seeds, str(Path(source).resolve()), base.num_tasks)
    started = time.time()
    results = []

    def done(cfg: RunConfig, result: dict) -> None:
        results.append(result)
        log(f"  {cfg.method} seed {cfg.seed}: average accuracy {result['avg_acc']:.4f} "
            f"({len(results)}/{len(configs)}, {time.time() - started:.0f}s)")

    EXECUTORS[base.executor].run_many(configs, _run_one, done)
    carried_methods = list(dict.fromkeys(r["method"] for r in carried))
    order = list(dict.fromkeys([*earlier_order, *methods]))
    summary = summarize_bench(base, order, seeds, results + carried, time.time() - started)
    if carried:
        summary["carried_over"] = {"from": str(merge), "methods": carried_methods}
    return summary


def report_ignored(configs: dict[str, RunConfig], log) -> None:
    """A setting no method takes is an error; one that some methods do not take is said, once per method."""
    ignored = {m: getattr(cfg, "ignored", []) for m, cfg in configs.items()}
    for key in {i.split(":")[0] for found in ignored.values() for i in found}:
        if all(any(i.startswith(key + ":") for i in found) for found in ignored.values()):
            raise ConfigError(f"{key}: none of the methods {', '.join(configs)} takes it ("
                              + "; ".join(next(i for i in found if i.startswith(key + ":")).split(": ", 1)[1]
                                          for found in ignored.values()) + ")")
    for method, found in ignored.items():
        for line in found:
            log(f"  {method}: left at its own value, {line}")


def carried_runs(path: str, base: RunConfig, methods: list[str], seeds: int) -> tuple[list[str], list[dict]]:
    """The earlier bench's method order, and the runs of its methods that are not run again."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--merge {path}: cannot read it ({e})") from e
    expected = {"benchmark": Path(base.data).stem if base.data else base.benchmark, "scenario": base.scenario,
                "num_tasks": base.num_tasks, "seeds": seeds}
    for key, value in expected.items():
        if earlier.get(key) != value:
            raise ConfigError(f"--merge {path}: its {key} is {earlier.get(key)!r}, this bench's is {value!r}")
    rows = {r["method"]: r for r in earlier["rows"]}
    carried = []
    for run in earlier["runs"]:
        if run["method"] not in methods:
            row = rows[run["method"]]  # earlier files kept the one-modality accuracies per method only
            only = {k[len("avg_acc_only_"):-len("_mean")]: v for k, v in row.items() if k.startswith("avg_acc_only_")}
            carried.append({"avg_acc_only": only, **run})
    return list(rows), carried


def summarize_bench(base: RunConfig, methods: list[str], seeds: int, results: list[dict], seconds: float) -> dict:
    by_method = {m: sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    reference = methods[0]
    rows = []
    for m in methods:
        runs = by_method[m]
        row = {"method": m}
        for k in METRICS:
            values = np.array([r[k] for r in runs])
            row[f"{k}_mean"], row[f"{k}_std"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0)
        for modality in runs[0].get("avg_acc_only", {}):
            row[f"avg_acc_only_{modality}_mean"] = float(np.mean([r["avg_acc_only"][modality] for r in runs]))
        if m != reference:  # paired over seeds: the same class order and initialisation seed
            diff = np.array([r["avg_acc"] - s["avg_acc"] for r, s in zip(runs, by_method[reference])])
            row[f"avg_acc_diff_vs_{reference}_mean"] = float(diff.mean())
            row[f"avg_acc_diff_vs_{reference}_std"] = float(diff.std(ddof=1) if len(diff) > 1 else 0)
        row["seeds"] = [r["seed"] for r in runs]
        rows.append(row)
    return {"benchmark": Path(base.data).stem if base.data else base.benchmark, "scenario": base.scenario, "num_tasks": base.num_tasks,
            "seeds": seeds, "executor": base.executor, "reference": reference, "seconds": seconds, "rows": rows,
            "runs": [{k: r[k] for k in ("method", "seed", "acc_matrix", *METRICS, "avg_acc_only") if k in r}
                     for r in results]}


def verdict(mean: float, std: float, seeds: int) -> str:
    """`better`/`worse` when a mean paired difference exceeds its spread over seeds, else `tie`;
    `(one seed)` when there is no spread."""
    if seeds < 2:
        return "(one seed)"
    if abs(mean) <= std:
        return "tie"
    return "better" if mean > 0 else "worse"


def paired_verdict(row: dict, reference: str) -> str:
    """A bench row's `verdict` against `reference`; `reference` for the reference itself."""
    key = f"avg_acc_diff_vs_{reference}"
    if f"{key}_mean" not in row:
        return "reference"
    return verdict(row[f"{key}_mean"], row[f"{key}_std"], len(row["seeds"]))


def markdown(summary: dict) -> str:
    ref = summary["reference"]
    modalities = sorted({k[len("avg_acc_only_"):-len("_mean")] for r in summary["rows"] for k in r
                         if k.startswith("avg_acc_only_")})
    head = ["method", "avg acc", "avg inc acc", "forgetting", "bwt", *[f"{m} only" for m in modalities],
            f"vs {ref} (paired)", "seconds"]
    lines = [f"{summary['benchmark']}, {summary['scenario']}, {summary['num_tasks']} tasks, "
             f"{summary['seeds']} seeds (mean ± std), executor {summary['executor']}", "",
             *([f"Rows of {', '.join(summary['carried_over']['methods'])}: carried over from "
                f"{summary['carried_over']['from']}, not rerun.", ""] if "carried_over" in summary else []),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        pm = lambda k: f"{r[k + '_mean']:.3f} ± {r[k + '_std']:.3f}"  # noqa: E731
        diff = (f"{r[f'avg_acc_diff_vs_{ref}_mean']:+.3f} ± {r[f'avg_acc_diff_vs_{ref}_std']:.3f} "
                f"{paired_verdict(r, ref)}" if r["method"] != ref else "-")
        cells = [r["method"], pm("avg_acc"), f"{r['avg_inc_acc_mean']:.3f}", pm("forgetting"), f"{r['bwt_mean']:+.3f}",
                 *[f"{r[f'avg_acc_only_{m}_mean']:.3f}" for m in modalities], diff, f"{r['seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_bench(summary: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    md = out.with_suffix(".md")
    md.write_text(markdown(summary))
    return out, md
