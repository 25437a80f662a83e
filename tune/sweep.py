"""Ray Tune over whole task sequences: a trial is a sequence, reporting after every task."""
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ray.tune import Callback

from pipeline.config import ConfigError, RunConfig, config_from_dict, method_conflicts, read_yaml
from pipeline.tracking import Tracker, tracking_uri

METRIC = "val_avg_inc_acc"
# What shapes cmoe's adapter, which trains on every task.
DEFAULT_SPACE = {
    "model.num_experts": {"choice": [2, 4, 8]},
    "model.top_k": {"choice": [1, 2]},
    "loss.align": {"loguniform": [0.01, 1.0]},
    "loss.bal": {"loguniform": [0.001, 0.1]},
    "loss.kd": {"loguniform": [0.1, 10.0]},
    "loss.rel": {"loguniform": [0.1, 10.0]},
    "train.lr": {"loguniform": [3e-4, 5e-3]},
    "train.epochs": {"choice": [5, 15, 30]},
}


@dataclass
class SweepConfig:
    samples: int = 8
    scheduler: str = "asha"  # asha | fifo
    search: str = "random"  # random | optuna
    val_fraction: float = 0.1  # used when the data has no 'val' rows
    max_concurrent: int | None = None  # default: as many sequences as the cluster's CPUs hold
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))


def load_sweep(path: str | None, overrides: list[str] = (), **options) -> tuple[RunConfig, SweepConfig]:
    """The run config and the `sweep:` section of one YAML file; `options` override the section."""
    values = read_yaml(path) if path else {}
    section = values.pop("sweep", None) or {}
    unknown = set(section) - {f.name for f in dataclasses.fields(SweepConfig)}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}")
    sweep = SweepConfig(**{**section, **{k: v for k, v in options.items() if v is not None}})
    if sweep.scheduler not in ("asha", "fifo") or sweep.search not in ("random", "optuna"):
        raise ConfigError("sweep.scheduler must be asha|fifo and sweep.search random|optuna")
    cfg = config_from_dict(values, overrides, path or "config")
    unknown = [key for key in sweep.space if key not in cfg.flat()]
    if unknown:
        raise ConfigError(f"sweep.space: unknown config keys {unknown}")
    grid = sweep.space.get("method")
    methods = next(iter(grid.values())) if isinstance(grid, dict) and grid else [cfg.method]
    swept = {k: object() for k in sweep.space if k[:5] in ("model", "loss.")}
    for method in methods if isinstance(methods, list) else [cfg.method]:
        for key, why in method_conflicts(method, {**cfg.given, **swept}).items():
            if key in swept:
                raise ConfigError(f"{path or 'sweep'}: sweep.space.{key}: {why}; a sweep over it changes nothing")
            raise ConfigError(f"{path or 'sweep'}: {key}: {why} (a trial of method {method})")
    return cfg, sweep


def tune_space(space: dict) -> dict:
    from ray import tune

    kinds = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda b: tune.uniform(*b),
             "loguniform": lambda b: tune.loguniform(*b), "randint": lambda b: tune.randint(*b)}
    out = {}
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds):
            raise ConfigError(f"sweep.space.{key}: expected one of {sorted(kinds)} with its values, got {spec!r}")
        kind, values = next(iter(spec.items()))
        out[key] = kinds[kind](values)
    return out


def run_trial(params: dict, base: dict):
    """One Tune trial: the whole sequence with `params` applied, reporting after every task."""
    from ray import tune

    from pipeline.driver import run_sequence

    if base["executor"] == "local":
        import torch
        torch.set_num_threads(1)  # the trial trains in its own process, on its one CPU
    overrides = [f"{k}={v}" for k, v in params.items()]
    try:
        cfg = config_from_dict(base, overrides, "trial")
    except ConfigError as e:
        cfg = config_from_dict(base)
        Tracker(cfg).record_invalid_trial(cfg.tracking.parent_run_id, params, e)
        raise

    def report(task):
        val, test = task.val_summary or {}, task.summary
        tune.report({"task": task.index + 1, METRIC: val.get("avg_inc_acc", math.nan),
                     "val_avg_acc": val.get("avg_acc", math.nan), "test_avg_acc": test["avg_acc"],
                     "test_avg_inc_acc": test["avg_inc_acc"], "test_forgetting": test["forgetting"]})

    run_sequence(cfg, log=lambda *_: None, on_task_end=report, fresh=True)  # a trial reports every task


def run_sweep(cfg: RunConfig, sweep: SweepConfig, best_out: str, verbose: bool = False, log=print) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.driver import check_locations, prepare_data
    from pipeline.executors import EXECUTORS, one_cpu_each
    from pipeline.runtime import init_ray, quiet_logs

    quiet_logs(verbose)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())  # trials run in other processes
    cfg.tracking.uri = tracking_uri(cfg)
    check_locations(cfg)
    init_ray(cfg, verbose)  # Tune's trials are Ray actors, whichever executor trains them
    prepare_data(cfg, log, verbose)  # built and encoded once, not by every trial
    if cfg.train.val_fraction == 0:
        cfg.train.val_fraction = sweep.val_fraction
    tracker = Tracker(cfg)
    sweep_id = tracker.start_sweep(f"sweep-{cfg.method}", dataclasses.asdict(sweep))
    cfg.tracking.parent_run_id = sweep_id

    executor = EXECUTORS[cfg.executor]
    executor.start(cfg, verbose)
    one_cpu_each(cfg)
    resources, concurrent = executor.trial_resources(cfg, ray.cluster_resources().get("CPU", 1))
    concurrent = sweep.max_concurrent or concurrent
    # Trials read the prepared data and write their state under output_dir: on this node's disk.
    resources[f"node:{ray.util.get_node_ip_address()}"] = 0.001
    scheduler = (ASHAScheduler(time_attr="task", max_t=cfg.num_tasks, grace_period=1, reduction_factor=2)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    search = None
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search = OptunaSearch(seed=cfg.seed)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, base=cfg.user_dict()), resources),
        param_space=tune_space(sweep.space),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=search,
                                    num_samples=sweep.samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"sweep-{sweep_id[:8]}",
                                  storage_path=cfg.storage_path or str(Path(cfg.output_dir) / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                  callbacks=[TrialPrinter(log, cfg.num_tasks)]),
    )
    grid = tuner.fit()
    tracker.end_stopped_trials(sweep_id)
    finished = [r for r in grid if r.error is None and r.metrics.get("task") == cfg.num_tasks]
    failed = [r for r in grid if r.error is not None]
    summary = {"sweep_run_id": sweep_id, "trials": len(grid), "failed": len(failed),
               "stopped_early": len(grid) - len(finished) - len(failed)}
    if not finished:
        tracker.fail_sequence(sweep_id)
        raise RuntimeError(f"no trial of the sweep finished its sequence ({len(failed)} failed)")
    best = max(finished, key=lambda r: r.metrics[METRIC])
    best_cfg = config_from_dict(cfg.user_dict(), [f"{k}={v}" for k, v in best.config.items()])
    best_cfg.tracking.parent_run_id = None
    Path(best_out).write_text(yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    summary.update(best_params=best.config, **{f"best_{k}": best.metrics[k] for k in
                                               (METRIC, "test_avg_acc", "test_avg_inc_acc", "test_forgetting")})
    tracker.finish_sweep(sweep_id, summary, best_out)
    return summary


class TrialPrinter(Callback):
    """One line per trial report, on the driver."""

    def __init__(self, log, num_tasks: int):
        self.log, self.num_tasks = log, num_tasks

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.log(f"  trial {trial.trial_id}: task {result['task']}/{self.num_tasks} "
                 f"val avg inc acc {result[METRIC]:.3f}  {trial.config}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"  trial {trial.trial_id} failed: {trial.config}")
