"""What a hostile but fair user tries: bad arguments, two runs on one folder or one store, servers that
are not there or go away, a finished sequence run again. Runs are real processes on real stores;
the sequences run in-process (`executor=local`): what is tested here is the driver, not Ray Train."""
import json
import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, kill_tree, listening, start_mlflow_server, stop_server
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import load_data
from pipeline.driver import check_tasks, run_sequence

LOCAL = "executor=local"
SMALL = "model.projection=256"  # the ridge heads' solves at 2048 are most of a task end


def mmcl(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, start_new_session=True,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def lock_holder(folder) -> int | None:
    for lock in folder.glob("*/lock"):
        text = lock.read_text()
        if text:
            return json.loads(text)["pid"]
    return None


def store(folder) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("synthetic")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def sequences(runs) -> list:
    return [r for r in runs if "mmcl.config_fingerprint" in r.data.tags]


@pytest.mark.parametrize("args, expected", [
    (["run", "--tasks", "7"], "num_tasks: class-il: 7 tasks but only 6 classes"),
    (["run", "--scenario", "domain-il", "--tasks", "3"], "num_tasks: domain-il: 3 tasks but only 2 domains"),
    (["run", "--scenario", "domain-il", "TEXT"], "domain-il: the data has one domain ('d0')"),
    (["run", "train.lr=-0.5"], "train.lr must be above 0"),
    (["run", "train.epochs=2.9"], "'epochs' must be a whole number, not 2.9"),
    (["run", "tracking.uri=http://127.0.0.1:PORT"], "tracking.uri: http://127.0.0.1:PORT does not answer"),
    (["bench", "--methods", "cmoe", "--out", "OUT/b.json", "--tasks", "7"], "7 tasks but only 6 classes"),
    (["sweep", "num_tasks=7"], "7 tasks but only 6 classes"),
], ids=["run-tasks", "run-domains", "run-one-domain", "lr", "epochs", "closed-port", "bench-tasks", "sweep-tasks"])
def test_a_user_error_is_one_line_and_leaves_nothing(args, expected, synthetic, synthetic_text, tmp_path, capsys):
    """Before any Ray task or MLflow run: no store, no run folder, no feature cache."""
    port = str(free_port())
    data = str(synthetic_text if "TEXT" in args else synthetic)
    args = [a.replace("OUT", str(tmp_path)) for a in args if a != "TEXT"]
    flag = ["--data", data] if args[0] != "sweep" else [f"data={data}"]
    assert main([args[0], *flag, *args[1:], f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().replace(port, "PORT")
    assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_read_only_commands_never_create_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model-uri", "models:/m/1", "--input", "x.parquet", "--out", "p.csv"]) == 2
    assert main(["lineage", "m"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow store at {tmp_path / 'runs' / 'mlflow.db'} (the default store)" in err
    assert not (tmp_path / "runs").exists()


def test_domain_il_defaults_to_one_task_per_domain(synthetic):
    cfg = load_config(None, ["scenario=domain-il"])
    check_tasks(cfg, load_data(synthetic))
    assert cfg.num_tasks == 2
    cfg = load_config(None, [])
    check_tasks(cfg, load_data(synthetic))
    assert cfg.num_tasks == 5


@pytest.mark.slow
def test_one_writer_per_run_folder_and_a_killed_writer_is_taken_over(synthetic, tmp_path):
    args = ["run", "--data", str(synthetic), "--tasks", "2", LOCAL, "train.epochs=3000", f"output_dir={tmp_path}"]
    first = mmcl(*args)
    try:
        deadline = time.time() + 300
        while lock_holder(tmp_path) != first.pid:
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.5)
        started = set().union(*listening(first.pid).values())
        assert not started & {"gcs_server", "raylet"}, started  # held data in-process: no Ray of its own
        second = mmcl(*args)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and f"is in use by PID {first.pid} on " in err, err
        assert first.poll() is None, "the first run ended before the second could be refused"
    finally:
        kill_tree(first)
    third = mmcl(*args)
    try:
        line = ""
        while "Taking over" not in line:
            line = third.stdout.readline()
            assert line or third.poll() is None, third.stderr.read()
        assert f"from PID {first.pid} on " in line and "no longer running" in line
        while lock_holder(tmp_path) != third.pid:
            time.sleep(0.2)
    finally:
        kill_tree(third)


@pytest.mark.slow
def test_runs_side_by_side_on_one_store_and_a_finished_sequence_is_not_trained_again(synthetic, tmp_path, capsys):
    def command(seed, *more):
        return ["run", "--data", str(synthetic), "--tasks", "2", "--seed", str(seed), *more, LOCAL, SMALL,
                "train.epochs=2", f"output_dir={tmp_path}"]

    # Two configs on a fresh store; then the same config twice at once.
    for pair in ((0, 1), (2, 2)):
        procs = [mmcl(*command(seed)) for seed in pair]
        outcomes = [(*p.communicate(timeout=600), p.returncode) for p in procs]
        for out, err, rc in outcomes:
            assert rc == 0 or (pair[0] == pair[1] and rc == 2 and "is in use by PID" in err), err
        assert any(rc == 0 and "Accuracy matrix" in out for out, _, rc in outcomes)
    client, runs = store(tmp_path)
    parents = sequences(runs)
    assert sorted(r.data.params["seed"] for r in parents) == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions("name = 'synthetic-class-il-cmoe'")
    assert len(versions) == 6
    for parent in parents:  # each sequence's chain is its own
        chain = sorted((v for v in versions if v.tags["mmcl.sequence_run_id"] == parent.info.run_id),
                       key=lambda v: int(v.tags["mmcl.task_index"]))
        assert [v.tags["mmcl.task_index"] for v in chain] == ["0", "1"]
        assert chain[1].tags["mmcl.continued_from_version"] == str(chain[0].version)

    out = tmp_path / "again.json"
    capsys.readouterr()
    assert main(command(1, "--out", str(out))) == 0
    printed = capsys.readouterr().out
    seed1 = next(r for r in parents if r.data.params["seed"] == "1")
    assert f"Already finished: {tmp_path}" in printed and seed1.info.run_id in printed
    assert "Accuracy matrix" in printed and json.loads(out.read_text())["mlflow_run_id"] == seed1.info.run_id
    assert len(sequences(store(tmp_path)[1])) == 3 and len(client.search_model_versions("")) == 6

    assert main(command(1, "--force", "--out", str(out))) == 0
    assert "Already finished" not in capsys.readouterr().out
    assert json.loads(out.read_text())["mlflow_run_id"] != seed1.info.run_id
    assert len(sequences(store(tmp_path)[1])) == 4 and len(client.search_model_versions("")) == 8


@pytest.mark.slow
def test_a_tracking_server_lost_mid_sequence_loses_nothing(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proc, url = start_mlflow_server(tmp_path)
    lines = []
    try:
        cfg = load_config(None, [f"data={synthetic}", LOCAL, SMALL, "num_tasks=3", "train.epochs=2",
                                 f"tracking.uri={url}", f"output_dir={tmp_path / 'out'}"])
        result = run_sequence(cfg, log=lines.append, on_task_end=lambda task: task.index == 0 and stop_server(proc))
    finally:
        stop_server(proc)
    assert len(result["acc_matrix"]) == 3
    assert any(f"MLflow at {url} failed" in line and "logs them" in line for line in lines), lines
    run_dir = next((tmp_path / "out").glob("*/state.json")).parent
    state = json.loads((run_dir / "state.json").read_text())
    assert [t["logged"] for t in state["tasks"]] == [True, False, False]
    assert (run_dir / "task-1").is_dir() and (run_dir / "task-2").is_dir()  # kept until logged

    proc, url = start_mlflow_server(tmp_path)  # the same store, back on another port
    try:
        out = tmp_path / "again.json"
        again = mmcl("run", "--data", str(synthetic), "--tasks", "3", "--out", str(out), LOCAL, SMALL, "train.epochs=2",
                     f"tracking.uri={url}", f"output_dir={tmp_path / 'out'}")
        printed, err = again.communicate(timeout=600)
        assert again.returncode == 0 and "Already finished" in printed, err
        assert json.loads(out.read_text())["acc_matrix"] == result["acc_matrix"]
        client = MlflowClient(url)
        parent = client.get_run(result["mlflow_run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["seq/avg_acc"] == pytest.approx(result["avg_acc"], abs=1e-4)
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.data.tags["mmcl.task_index"] for r in children) == ["0", "1", "2"]  # each once
        versions = client.search_model_versions("name = 'synthetic-class-il-cmoe'")
        assert sorted(v.tags["mmcl.task_index"] for v in versions) == ["0", "1", "2"]
    finally:
        stop_server(proc)
