"""A small real sweep: Ray Tune trials that each run a whole sequence of Ray Train fits."""
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config

pytestmark = pytest.mark.slow


def test_sweep_nests_trials_records_failures_and_writes_a_runnable_best_config(ray_local, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "num_tasks": 2, "train": {"epochs": 1}, "model": {"num_experts": 2, "projection": 256},
        "sweep": {"samples": 1, "scheduler": "fifo", "space": {
            "model.top_k": {"grid": [1, 2, 3]},  # 3 > num_experts: that trial's config is rejected
            "loss.align": {"uniform": [0.0, 0.5]}}},
    }))
    best = tmp_path / "best.yaml"
    assert main(["sweep", "--config", str(config), "--best-out", str(best), f"output_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "3 trials: 1 failed" in printed and "on the test split" in printed

    best_cfg = load_config(best)  # what `mmcl run --config best.yaml` reads
    assert best_cfg.model.top_k in (1, 2) and best_cfg.num_tasks == 2 and best_cfg.tracking.parent_run_id is None

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mfeat")
    runs = client.search_runs([exp.experiment_id])
    sweep = next(r for r in runs if r.data.tags.get("mmcl.sweep") == "true")
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["failed"] == 1
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(trials) == 3
    assert sorted(r.info.status for r in trials) == ["FAILED", "FINISHED", "FINISHED"]
    for trial in (r for r in trials if r.info.status == "FINISHED"):
        tasks = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert sorted(r.data.tags["mmcl.task_index"] for r in tasks) == ["0", "1"]
        assert trial.data.params["train.val_fraction"] == "0.1"
    assert "best.yaml" in {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()  # not ./mlruns wherever it was started


def test_a_local_executor_sweep_trains_each_trial_in_its_own_process(ray_local, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "num_tasks": 2, "executor": "local", "train": {"epochs": 1}, "model": {"projection": 256},
        "sweep": {"samples": 1, "scheduler": "fifo", "space": {"loss.align": {"grid": [0.0, 0.5]}}},
    }))
    best = tmp_path / "best.yaml"
    assert main(["sweep", "--config", str(config), "--best-out", str(best), f"output_dir={tmp_path}"]) == 0
    assert "2 trials: 0 failed" in capsys.readouterr().out
    assert load_config(best).loss.align in (0.0, 0.5) and load_config(best).executor == "local"
