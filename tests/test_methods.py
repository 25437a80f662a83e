"""Every registered method runs a short class-IL sequence (in-process executor); `mmcl bench` runs
its sequences on Ray Train side by side."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from models.methods import METHODS, settings_read
from pipeline.bench import sequence_configs
from pipeline.checkpoint import load_model
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.driver import run_sequence


def run(path, out, method, *overrides):
    small = ["model.projection=256"] if "model.projection" in settings_read(METHODS[method].family) else []
    cfg = load_config(None, [f"data={path}", f"method={method}", "num_tasks=3", "train.epochs=2", "executor=local",
                             "tracking.enabled=false", f"output_dir={out}", *small, *overrides])
    return run_sequence(cfg, log=lambda *_: None)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_learns_each_task(method, synthetic, tmp_path):
    result = run(synthetic, tmp_path, method)
    matrix = result["acc_matrix"]
    assert len(matrix) == 3 and all(matrix[i][i] > 0.8 for i in range(3)), matrix  # chance 0.5 within a task
    if method in ("ranpac", "simplecil", "joint", "cmoe", "cmoe-joint", "cmoe-joint-gaussians", "joint-logistic"):
        assert result["avg_acc"] > 0.85, matrix  # nothing to forget, old classes' Gaussians, or every task's data
    if method == "finetune":
        assert result["forgetting"] > 0.3, matrix  # the recency bias the other methods are measured against


@pytest.mark.parametrize("method", ["cmoe-joint", "cmoe-joint-gaussians"])
def test_cmoe_joint_holds_every_train_row_once_through_its_final_adapter(method, synthetic, tmp_path):
    """The joint references' analytic head: the statistics of rows seen in earlier tasks are dropped
    when those rows come again, so the last head is the ridge fit of all rows under the last adapter
    (no drawn rows), and each class keeps one Gaussian, of all its rows."""
    run(synthetic, tmp_path, method)
    model = load_model(next(tmp_path.glob("*/task-2")))[0].eval()
    train = pq.read_table(synthetic).filter(pc.equal(pc.field("split"), "train"))
    if model.gaussians is not None:
        assert sorted(model.gaussians.labels.tolist()) == list(range(6)) and model.gaussians.counts.tolist() == [30] * 6
    feats = {m: torch.tensor(train.column(m).to_pylist()) for m in ("a", "b")}
    with torch.no_grad():
        phi = model.ridge.features(model.ridge_input(feats, torch.ones(len(train), 2, dtype=torch.bool)))
    torch.testing.assert_close(model.ridge.gram + model.ridge.gram_val, phi.T @ phi, rtol=1e-4, atol=1e-4)


def chosen_strength(ridge) -> float:
    """The grid strength whose refit on every row is the head's weight."""
    from models.methods.analytic import RIDGE_GRID
    gram, cross = ridge.gram + ridge.gram_val, ridge.cross + ridge.cross_val
    eye = torch.eye(len(gram), dtype=gram.dtype)
    gap = lambda lam: float((torch.linalg.solve(gram + lam * eye, cross) - ridge.weight).abs().max())  # noqa: E731
    return min(RIDGE_GRID, key=gap)


def test_the_ridge_strength_is_chosen_on_held_out_groups_not_on_copies_of_fitted_rows(tmp_path):
    """As in tuxpaint, each picture is in six rows (its own text each) and the labels belong to the
    pictures at random, so nothing generalises from one picture to the next: held out by group, the
    fit sees none of a held-out picture's rows and the largest strengths win; rows held out one by
    one (no group column) have copies in the fit, which a weak ridge memorises."""
    rng = np.random.default_rng(0)
    pictures = np.repeat(np.arange(120), 6)
    label = rng.integers(0, 6, 120)[pictures]
    columns = {"sample_id": [f"r{i}" for i in range(len(pictures))], "group": [f"p{g}" for g in pictures],
               "label": label, "label_name": [str(c) for c in label], "domain": ["d0"] * len(pictures),
               "split": np.where(pictures < 100, "train", "test"),
               "a": list(rng.normal(size=(120, 16)).astype(np.float32)[pictures]),
               "b": list(rng.normal(size=(len(pictures), 4)).astype(np.float32))}
    pq.write_table(pa.table(columns), tmp_path / "grouped.parquet")
    pq.write_table(pa.table(columns).drop_columns(["group"]), tmp_path / "rows.parquet")
    strengths = {}
    for name in ("grouped", "rows"):
        run(tmp_path / f"{name}.parquet", tmp_path / name, "ranpac")
        strengths[name] = chosen_strength(load_model(next((tmp_path / name).glob("*/task-2")))[0].ridge)
    assert strengths["grouped"] >= 100 and strengths["rows"] <= 1, strengths


@pytest.mark.slow
def test_joint_logistic_is_scikit_learns_fit_of_every_train_row_on_one_or_two_workers(synthetic, tmp_path, ray_local):
    """Its last head is scikit-learn's default logistic regression on all train rows (tokens
    pooled, features standardised), whether one process holds the rows or two Ray workers do."""
    run(synthetic, tmp_path / "local", "joint-logistic")
    run(synthetic, tmp_path / "ray", "joint-logistic", "executor=ray", "train.num_workers=2", "train.cpus_per_worker=0.5")
    local, on_ray = (load_model(next((tmp_path / d).glob("*/task-2")))[0] for d in ("local", "ray"))
    torch.testing.assert_close(on_ray.weight, local.weight, rtol=1e-4, atol=1e-4)
    train = pq.read_table(synthetic).filter(pc.equal(pc.field("split"), "train")).to_pandas()
    x = StandardScaler().fit_transform(np.hstack([np.stack(train[m]) for m in ("a", "b")]))
    tasks = json.loads(next((tmp_path / "local").glob("*/state.json")).read_text())["tasks"]
    head_row_of_class = np.argsort([c for t in tasks for c in t["classes"]])
    reference = LogisticRegression(max_iter=3000, tol=1e-8).fit(x, train.label)
    np.testing.assert_allclose(local.weight.T.numpy()[head_row_of_class], reference.coef_, rtol=1e-2, atol=1e-2)


def test_each_bench_sequence_gets_its_own_methods_settings():
    config_for = lambda m: load_config(None, ["method=finetune", "train.epochs=4", f"method={m}"])  # noqa: E731
    configs = {c.method: c for c in sequence_configs(config_for, ["cmoe", "finetune"], 1, "x.parquet", 5)}
    assert configs["cmoe"].loss.kd == 1.0 and configs["finetune"].loss.kd == 0.0  # nothing leaks between methods
    assert configs["cmoe"].train.epochs == 4 and not configs["cmoe"].tracking.enabled


@pytest.mark.slow
def test_bench_writes_json_and_markdown_with_paired_differences(synthetic, tmp_path, ray_local):
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(synthetic), "--tasks", "3", "--methods", "simplecil,finetune",
                 "--seeds", "2", "--out", str(out), f"output_dir={tmp_path}", "train.epochs=2"]) == 0
    summary = json.loads(out.read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["simplecil", "finetune"] and len(summary["runs"]) == 4
    for r in rows.values():
        assert {"avg_acc_mean", "avg_acc_std", "avg_inc_acc_mean", "forgetting_mean", "forgetting_std",
                "seconds_mean"} <= set(r) and r["seeds"] == [0, 1]
    runs = {(r["method"], r["seed"]): r["avg_acc"] for r in summary["runs"]}
    paired = [runs["finetune", s] - runs["simplecil", s] for s in (0, 1)]
    assert rows["finetune"]["avg_acc_diff_vs_simplecil_mean"] == pytest.approx(np.mean(paired))
    assert rows["finetune"]["avg_acc_mean"] < rows["simplecil"]["avg_acc_mean"]  # finetune forgets
    table = out.with_suffix(".md").read_text()
    assert "| method | avg acc |" in table and "vs simplecil (paired)" in table and "| finetune |" in table
    sequences = [d for d in (tmp_path / "bench").iterdir() if d.is_dir() and d.name.startswith("synthetic")]
    assert len(sequences) == 4  # each keeps only its last task's model (a 15-method table was 13 GB)
    assert all([p.name for p in d.glob("task-*")] == ["task-2"] for d in sequences)

    # A changed method reruns alone and a new one joins; the others' runs join as they were, in the
    # earlier table's order and against its reference. (In-process: one worker gives the Ray path's
    # numbers, tests/test_distributed.py.)
    merged = tmp_path / "merged.json"
    assert main(["bench", "--data", str(synthetic), "--tasks", "3", "--methods", "simplecil,lwf", "--seeds", "2",
                 "--merge", str(out), "--out", str(merged), f"output_dir={tmp_path}", "train.epochs=2",
                 "--executor", "local"]) == 0
    again = json.loads(merged.read_text())
    assert [r["method"] for r in again["rows"]] == ["simplecil", "finetune", "lwf"]
    assert again["reference"] == "simplecil" and "avg_acc_diff_vs_simplecil_mean" in again["rows"][2]
    kept = {(r["method"], r["seed"]): r["avg_acc"] for r in again["runs"] if r["method"] != "lwf"}
    assert kept == runs  # simplecil is deterministic
    assert again["carried_over"]["methods"] == ["finetune"]
    assert "carried over from" in merged.with_suffix(".md").read_text()
    assert main(["bench", "--data", str(synthetic), "--tasks", "2", "--methods", "simplecil", "--seeds", "2",
                 "--merge", str(out), "--out", str(merged), f"output_dir={tmp_path}"]) == 2  # other tasks: refused
