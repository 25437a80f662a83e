"""The data path on a real local Ray: the modality checks run as Ray Data tasks and name the file
and row within a folder, and each stream holds exactly the rows the plan gives it."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, load_data
from pipeline.streams import EVAL, sequence_streams, train_stream
from test_data import good_columns, table

pytestmark = pytest.mark.slow


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


def test_each_stream_holds_the_rows_the_plan_gives_it(synthetic, ray_local):
    full = pq.read_table(synthetic)
    ids, labels, split = (full[c].to_numpy(zero_copy_only=False) for c in ("sample_id", "label", "split"))
    val_ids = [str(i) for i in ids[split == "train"][::5]]
    plan = {"data": {"path": str(synthetic), "val_ids": val_ids, "eval_splits": ["val", "test"]},
            "tasks": [{"index": 0, "train": ("label", [0, 1])}, {"index": 1, "train": ("label", [2, 3, 4])}],
            "first_task": 1, "spec": {"modalities": {"a": 0, "b": 0}}}
    streams = sequence_streams(plan)
    assert sorted(streams) == [EVAL, train_stream(1)]  # a resumed sequence reads no finished task

    def rows(name):
        return pa.concat_tables(streams[name].iter_batches(batch_size=None, batch_format="pyarrow"))

    held_out = np.isin(ids, val_ids)
    train = rows(train_stream(1))
    want = (split == "train") & ~held_out & np.isin(labels, [2, 3, 4])
    assert train.num_rows == want.sum() and set(train["split"].to_pylist()) == {"train"}
    assert np.array_equal(train["a"].combine_chunks().flatten().to_numpy(),
                          full.filter(pa.array(want))["a"].combine_chunks().flatten().to_numpy())
    evaluated = rows(EVAL)
    assert evaluated.num_rows == held_out.sum() + (split == "test").sum()
    assert evaluated["split"].to_pylist().count("val") == len(val_ids)
