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
from pipeline.driver import _quiet, init_ray, prepare_data, run_sequence

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


def one_cpu_each(cfg: RunConfig) -> None:
    """Many sequences side by side: unless set, each gets one Ray Train worker of one CPU."""
    cfg.train.num_workers = cfg.train.num_workers or 1
    cfg.train.cpus_per_worker = cfg.train.cpus_per_worker or 1


def _run_one(cfg: RunConfig) -> dict:
    import torch
    torch.set_num_threads(1)
    return run_sequence(cfg, log=lambda *_: None, fresh=True)


def run_bench(config_for, methods: list[str], seeds: int, log=print, merge: str | None = None) -> dict:
    """`merge`: an earlier bench JSON of the same benchmark, scenario, tasks and seeds, whose other
    methods' runs join the table as they were (so that a changed method reruns alone)."""
    _quiet(False)
    if not methods:
        raise ConfigError("--methods: no methods given")
    base = config_for(methods[0])
    for m in methods[1:]:
        config_for(m)  # an unknown method or a bad setting stops the bench before anything runs
    raw_path = prepare_data(base, log)[1]  # checked, built and encoded once, before sequences run side by side
    carried = carried_runs(merge, base, methods, seeds) if merge else []
    configs = sequence_configs(config_for, methods, seeds, str(Path(raw_path).resolve()), base.num_tasks)
    started = time.time()
    if base.executor == "local":
        import ray
        init_ray(base, verbose=False)
        remote = ray.remote(num_cpus=1)(_run_one)
        pending = {remote.remote(cfg): cfg for cfg in configs}
        results = []
        while pending:
            done, _ = ray.wait(list(pending))
            cfg = pending.pop(done[0])
            results.append(ray.get(done[0]))
            log(f"  {cfg.method} seed {cfg.seed}: average accuracy {results[-1]['avg_acc']:.4f} "
                f"({len(results)}/{len(configs)}, {time.time() - started:.0f}s)")
    else:
        import ray
        from concurrent.futures import ThreadPoolExecutor, as_completed

        init_ray(base, verbose=False)
        per_sequence = configs[0].train.num_workers * configs[0].train.cpus_per_worker
        side_by_side = max(1, int(ray.cluster_resources().get("CPU", 1) // per_sequence))
        results = []
        with ThreadPoolExecutor(side_by_side) as pool:  # each thread drives one Ray Train fit
            futures = {pool.submit(run_sequence, cfg, log=lambda *_: None, fresh=True): cfg for cfg in configs}
            for future in as_completed(futures):
                cfg = futures[future]
                results.append(future.result())
                log(f"  {cfg.method} seed {cfg.seed}: average accuracy {results[-1]['avg_acc']:.4f} "
                    f"({len(results)}/{len(configs)}, {time.time() - started:.0f}s)")
    carried_methods = list(dict.fromkeys(r["method"] for r in carried))
    summary = summarize_bench(base, [*methods, *carried_methods], seeds, results + carried, time.time() - started)
    if carried:
        summary["carried_over"] = {"from": str(merge), "methods": carried_methods}
    return summary


def carried_runs(path: str, base: RunConfig, methods: list[str], seeds: int) -> list[dict]:
    """The runs of an earlier bench's methods that are not run again."""
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
    return carried


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


def paired_verdict(row: dict, reference: str) -> str:
    """`win`/`loss` when the mean paired difference exceeds its spread over seeds, else `tie`."""
    key = f"avg_acc_diff_vs_{reference}"
    if f"{key}_mean" not in row:
        return "reference"
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if len(row["seeds"]) < 2:
        return "(one seed)"
    if abs(mean) <= std:
        return "tie"
    return "better" if mean > 0 else "worse"


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
