"""Data kept on S3 (a real S3 server, moto, on 127.0.0.1) is checked as a local file is: a problem
names the object, column and row; a bucket that is not there stops a run before Ray starts; an
update starts from a version staged on S3. The whole sequence on S3 (data, feature cache,
checkpoints, MLflow artifacts) runs in test_cluster.py."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def mmcl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_data_on_s3_is_checked_like_a_local_file(s3_server, synthetic, tmp_path):
    table = pq.read_table(synthetic)
    vectors = table["a"].to_pylist()
    vectors[120 + 3][0] = float("nan")  # row 3 of the folder's second file
    table = table.set_column(table.schema.get_field_index("a"), "a", pa.array(vectors, table.schema.field("a").type))
    for i, part in enumerate((table.slice(0, 120), table.slice(120))):
        pq.write_table(part, tmp_path / f"part-{i}.parquet")
        s3_server.client.upload_file(str(tmp_path / f"part-{i}.parquet"), "mmcl", f"data/part-{i}.parquet")

    checked = mmcl(s3_server.env, "data", "validate", "s3://mmcl/data")
    assert checked.returncode != 0
    assert "s3://mmcl/data/part-1.parquet, column 'a', row 3: NaN or infinite values" in checked.stdout, checked.stdout
    assert "part-0.parquet" not in checked.stdout

    out = tmp_path / "out"
    run = mmcl(s3_server.env, "run", "--data", "s3://mmcl/data", "cache.dir=s3://missing/cache",
               "tracking.enabled=false", f"output_dir={out}")
    assert run.returncode != 0 and run.stderr.strip().splitlines() == ["mmcl: cache.dir: s3://missing not found"]
    assert not out.exists()


@pytest.mark.slow
def test_an_update_on_ray_starts_from_the_version_staged_to_s3(s3_server, synthetic, tmp_path):
    """On a cluster the nodes share no disk: `mmcl update` copies the registered version's checkpoint
    to storage_path, where Ray Train's workers start the new task from, and frees it when done."""
    table = pq.read_table(synthetic)
    for name, labels in (("first", [0, 1, 2]), ("second", [3, 4, 5])):
        pq.write_table(table.filter(pc.is_in(table["label"], pa.array(labels, table["label"].type))),
                       tmp_path / f"{name}.parquet")
    where = ["storage_path=s3://mmcl/ray", f"output_dir={tmp_path / 'out'}", "train.epochs=1", "model.projection=64"]
    first = mmcl(s3_server.env, "update", "--new", "--model", "m", "--data", str(tmp_path / "first.parquet"),
                 "executor=local", *where)  # (in-process: only the second update's start is checked)
    assert first.returncode == 0, first.stdout + first.stderr
    second = mmcl(s3_server.env, "update", "--model", "m", "--data", str(tmp_path / "second.parquet"), *where)
    assert second.returncode == 0 and "m version 2 (continued from version 1)" in second.stdout, \
        second.stdout + second.stderr
    state = json.loads(next((tmp_path / "out" / "updates").glob("m-from-v1-*/state.json")).read_text())
    staged = state["tasks"][0]["checkpoint"]
    assert staged.startswith("s3://mmcl/ray/mmcl-updates/m-from-v1-") and staged.endswith("/parent")
    assert not s3_server.keys(staged.removeprefix("s3://mmcl/"))  # freed once the version was registered
