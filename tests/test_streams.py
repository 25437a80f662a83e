"""The data path on a real local Ray: the modality checks run as Ray Data tasks and name the file
and row within a folder, each stream holds exactly the rows the plan gives it, and two workers
share a task's epoch."""
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data import DataIterator

from pipeline.data import DataError, load_data, parquet_parts
from pipeline.streams import EVAL, ROWS, Stream, StreamSplits, may_hold, read_parts, sequence_streams, train_stream
from test_data import good_columns, table

pytestmark = pytest.mark.slow


def test_the_modules_ray_data_tasks_run_import_without_torch():
    """Every read task's worker imports them; torch would add seconds to each new worker."""
    code = ("import sys, pipeline.streams, pipeline.data, pipeline.cache; "
            "print(sorted({'torch', 'scipy', 'transformers', 'mlflow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bad_row_in_the_second_file_of_a_folder_is_named_by_the_ray_data_checks(tmp_path, ray_local):
    folder = tmp_path / "data"
    folder.mkdir()
    first, second = good_columns(), good_columns()
    second["sample_id"] = [f"t{i}" for i in range(6)]
    second["image"][4] = b"\x89PNG truncated"
    pq.write_table(table(first), folder / "part-0.parquet")
    pq.write_table(table(second), folder / "part-1.parquet", row_group_size=2)  # three parts: rows 4-5 the last
    with pytest.raises(DataError, match=r"part-1.parquet, column 'image', row 4: cannot be decoded") as e:
        load_data(folder)
    assert "part-0.parquet" not in str(e.value)
    second["image"][4] = first["image"][4]
    pq.write_table(table(second), folder / "part-1.parquet", row_group_size=2)
    data = load_data(folder)
    assert data.table.column_names == ["sample_id", "label", "label_name", "domain", "split"]  # no modality read
    assert data.table.num_rows == 12 and data.kinds["image"] == "image"


def test_each_stream_holds_the_rows_the_plan_gives_it_reading_only_row_groups_that_may_hold_them(
        synthetic, ray_local, tmp_path):
    full = pq.read_table(synthetic)
    pq.write_table(full, tmp_path / "by-class.parquet", row_group_size=40)  # a row group per class
    ids, labels, split = (full[c].to_numpy(zero_copy_only=False) for c in ("sample_id", "label", "split"))
    val_ids = [str(i) for i in ids[split == "train"][::5]]
    plan = {"data": {"path": str(tmp_path / "by-class.parquet"), "val_ids": val_ids, "eval_splits": ["val", "test"]},
            "tasks": [{"index": 0, "train": ("label", [0, 1])}, {"index": 1, "train": ("label", [2, 3, 4])}],
            "first_task": 1, "seed": 0, "spec": {"modalities": {"a": 0, "b": 0}},
            "train": {"hold_mb": 0, "read_tasks": 2}}
    parts = parquet_parts(plan["data"]["path"])
    assert [p["row_group"] for p in may_hold(parts, {"split": ["train"], "label": [4, 2, 3]})] == [2, 3, 4]
    assert may_hold(parts, {"label": [7]}) == parts[:1]
    streams = sequence_streams(plan)
    assert sorted(streams) == [EVAL, train_stream(1)]  # a resumed sequence reads no finished task

    def rows(name):  # through Ray Data, as a Train worker streams it
        return pa.concat_tables(list(streams[name].dataset.iter_batches(batch_size=None, batch_format="pyarrow")))

    held_out = np.isin(ids, val_ids)
    train = rows(train_stream(1))
    want = (split == "train") & ~held_out & np.isin(labels, [2, 3, 4])
    assert train.num_rows == want.sum() and set(train["split"].to_pylist()) == {"train"}
    assert sorted(train["a"].to_pylist()) == sorted(full.filter(pa.array(want))["a"].to_pylist())  # row groups: seeded order
    evaluated = rows(EVAL)
    assert evaluated.num_rows == held_out.sum() + (split == "test").sum()
    assert evaluated["split"].to_pylist().count("val") == len(val_ids)
    assert pa.concat_tables(streams[EVAL].iter_batches()).equals(evaluated)  # a whole pass read straight


def test_a_stream_runs_at_most_read_tasks_reads_at_once(synthetic, ray_local, tmp_path):
    """Its reads reserve no CPU, so nothing else bounds them: unbounded, Ray Data ran all 36 at once
    here, a new worker process each."""
    from ray.util.state import list_tasks

    pq.write_table(pq.read_table(synthetic), tmp_path / "small-groups.parquet", row_group_size=5)
    plan = {"data": {"path": str(tmp_path / "small-groups.parquet"), "val_ids": [], "eval_splits": ["test"]},
            "tasks": [{"index": 0, "train": ("label", list(range(6)))}], "first_task": 0, "seed": 0,
            "spec": {"modalities": {"a": 0}}, "train": {"hold_mb": 0, "read_tasks": 2}}
    name = f"MapBatches({read_parts.__name__})"

    def reads():  # (start, end) of every ended read task that started after `since` (ms)
        tasks = list_tasks(filters=[("name", "=", name)], detail=True, limit=10_000)
        return [(t.start_time_ms, t.end_time_ms) for t in tasks if t.end_time_ms and (t.start_time_ms or 0) >= since]

    stream, since = sequence_streams(plan)[train_stream(0)], time.time() * 1000
    parts = len(stream.parts)  # 36 of the 48 row groups hold train rows
    assert sum(b.num_rows for b in stream.dataset.iter_batches(batch_size=None, batch_format="pyarrow")) == 180
    for _ in range(100):  # task events reach the state API a moment after the tasks end
        runs = reads()
        if len(runs) >= parts:
            break
        time.sleep(0.2)
    assert len(runs) == parts
    assert max(sum(s <= start < e for s, e in runs) for start, _ in runs) == 2  # running at each start


def two_workers(plan: dict, name: str, epoch_seed, nodes=None):
    """Rank 0's and rank 1's rows of one epoch of stream `name`, as (label, feature 'a') arrays,
    read concurrently as two Train workers on `nodes` (default: this one) read them."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.worker import shards_of

    streams = sequence_streams(plan)
    splits = StreamSplits(streams.get(ROWS)).configure({n: s.dataset for n, s in streams.items()}, 2, None, nodes)

    def epoch(rank):
        shard = shards_of(splits[rank], plan, rank, 2)(name)
        batches = list(shard.batches(16, epoch_seed, select=True))
        return (np.concatenate([b[3]["label"] for b in batches]),
                np.concatenate([b[0]["a"].numpy() for b in batches]))

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(epoch, [0, 1]))


@pytest.mark.parametrize("hold_mb", [1024, 0], ids=["held", "streamed"])
def test_two_workers_share_an_epoch_of_a_task_and_a_held_one_mixes_every_class(synthetic, ray_local, hold_mb):
    full = pq.read_table(synthetic)  # one row group, sorted by class
    labels, split = full["label"].to_numpy(), full["split"].to_numpy(zero_copy_only=False)
    mine = (split == "train") & np.isin(labels, [0, 1, 2])
    plan = {"data": {"path": str(synthetic), "val_ids": [], "eval_splits": ["test"], "train_rows": 180,
                     "eval_rows": 60, "row_bytes": 60},
            "tasks": [{"index": 0, "train": ("label", [0, 1, 2])}], "first_task": 0,
            "seed": 0, "train": {"hold_mb": hold_mb, "read_tasks": 2}, "spec": {"modalities": {"a": 8, "b": 5}},
            "class_index": list(range(6))}
    (labels_0, a_0), (labels_1, a_1) = two_workers(plan, train_stream(0), [0, 0, 1])
    assert len(labels_0) == len(labels_1) == mine.sum() // 2  # equal steps; 90 rows: none left out
    got = np.concatenate([a_0, a_1])
    want = full.filter(pa.array(mine))["a"].combine_chunks().flatten().to_numpy().reshape(-1, 8)
    assert sorted(map(tuple, got)) == sorted(map(tuple, want))  # every row once
    if hold_mb:  # held: a seeded permutation of the whole task, so each worker's rows mix its three classes
        assert set(labels_0) == set(labels_1) == {0, 1, 2}
        assert not np.array_equal(labels_0, two_workers(plan, train_stream(0), [0, 0, 2])[0][0])
        # A worker on another node than the local file's gets the same rows through Ray Data.
        nodes = [ray_local.get_runtime_context().get_node_id(), "another-node"]
        streams = sequence_streams(plan)
        splits = StreamSplits(streams[ROWS]).configure({ROWS: streams[ROWS].dataset}, 2, None, nodes)
        assert isinstance(splits[0][ROWS], Stream) and isinstance(splits[1][ROWS], DataIterator)
        elsewhere = two_workers(plan, train_stream(0), [0, 0, 1], nodes)[1]
        assert np.array_equal(elsewhere[0], labels_1) and np.array_equal(elsewhere[1], a_1)
