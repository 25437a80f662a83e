"""Every registered method runs a short class-IL sequence (in-process executor); the analytic head
gives the same results through Ray Train's data-parallel workers as in-process."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.methods import METHODS
from pipeline.config import load_config
from pipeline.driver import run_sequence


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """6 classes in two vector modalities, well separated: 30 train and 10 test rows per class."""
    rng = np.random.default_rng(0)
    rows = {k: [] for k in ("sample_id", "label", "label_name", "domain", "split", "a", "b")}
    means = {m: rng.normal(0, 3, (6, d)) for m, d in (("a", 8), ("b", 5))}
    for c in range(6):
        for i in range(40):
            rows["sample_id"].append(f"{c}-{i}")
            rows["label"].append(c)
            rows["label_name"].append(str(c))
            rows["domain"].append("d0" if i % 2 else "d1")
            rows["split"].append("test" if i < 10 else "train")
            for m in ("a", "b"):
                rows[m].append((means[m][c] + rng.normal(0, 1, len(means[m][c]))).astype(np.float32).tolist())
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def run(path, out, method, *overrides):
    cfg = load_config(None, [f"data={path}", f"method={method}", "num_tasks=3", "train.epochs=2", "executor=local",
                             "tracking.enabled=false", f"output_dir={out}", "model.projection=256", *overrides])
    return run_sequence(cfg, log=lambda *_: None)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_learns_each_task(method, synthetic, tmp_path):
    result = run(synthetic, tmp_path, method)
    matrix = result["acc_matrix"]
    assert len(matrix) == 3 and all(matrix[i][i] > 0.8 for i in range(3)), matrix  # chance 0.5 within a task
    if method in ("ranpac", "simplecil", "joint"):
        assert result["avg_acc"] > 0.85, matrix  # nothing to forget, or every task's data
    if method == "finetune":
        assert result["forgetting"] > 0.3, matrix  # the recency bias the other methods are measured against


@pytest.mark.slow
def test_ridge_head_through_ray_train_matches_the_in_process_executor(synthetic, tmp_path, ray_local):
    local = run(synthetic, tmp_path / "local", "ranpac", "num_tasks=2")
    distributed = run(synthetic, tmp_path / "ray", "ranpac", "num_tasks=2", "executor=ray")
    assert np.allclose(np.array(local["acc_matrix"], dtype=float), np.array(distributed["acc_matrix"], dtype=float),
                       equal_nan=True), (local["acc_matrix"], distributed["acc_matrix"])
