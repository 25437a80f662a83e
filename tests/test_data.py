"""`mmcl data validate`: every class of bad input is reported with its file, column and rows."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data import LABELS_METADATA, validate_table


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float = 0.1) -> bytes:
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, np.sin(np.arange(int(8000 * seconds)) / 3).astype(np.float32), 8000, format="WAV")
    return buf.getvalue()


def good_columns(n=6) -> dict:
    """Three classes, each with a train and a test row, and one column of every modality kind."""
    return {
        "sample_id": [f"s{i}" for i in range(n)], "label": [i // 2 for i in range(n)],
        "label_name": [f"c{i // 2}" for i in range(n)], "domain": ["d"] * n, "split": ["train", "test"] * (n // 2),
        "image": [png(10 * i) for i in range(n)], "audio": [wav() for _ in range(n)],
        "caption": [f"a digit {i}" for i in range(n)], "v": [[float(i), 1.0] for i in range(n)],
        "motion": [[[float(i), 0.5, -1.0]] * (3 + i) for i in range(n)],  # steps x 3 channels, lengths differ
    }


def table(cols, labels=None):
    t = pa.table({k: pa.array(v, type=pa.binary() if k in ("image", "audio") else None) for k, v in cols.items()})
    return t.replace_schema_metadata({LABELS_METADATA: json.dumps(labels).encode()}) if labels else t


def test_a_good_table_of_every_modality_kind_passes():
    assert validate_table(table(good_columns(), ["c0", "c1", "c2"]), "f.parquet") == []


def _set(col, row, value):
    def change(cols):
        cols[col][row] = value
    return change


def _drop(col):
    return lambda cols: cols.pop(col)


def _all_null(row):
    def change(cols):
        for m in ("image", "audio", "caption", "v", "motion"):
            cols[m][row] = None
    return change


def _no_train_for_class(cols):
    cols["split"][2] = "test"  # class 1's train row becomes test: its class-IL task is empty


def _wrong_type(cols):
    cols["label"] = [str(v) for v in cols["label"]]


def _null_group(cols):
    cols["group"] = ["a", "a", "b", None, "c", "c"]


def _no_test(cols):
    cols["split"] = ["train"] * len(cols["split"])


def _numbers_as_text(cols):
    cols["caption"] = [",".join(map(str, v)) for v in cols["v"]]


@pytest.mark.parametrize("change, expected", [
    (_drop("domain"), "error: f.parquet, column 'domain': required column is missing"),
    (_wrong_type, "error: f.parquet, column 'label': must be integer, found string"),
    (_set("image", 3, b"\x89PNG truncated"), "error: f.parquet, column 'image', row 3: cannot be decoded"),
    (_set("audio", 4, b"RIFF\x00\x00not a wave"), "error: f.parquet, column 'audio', row 4: cannot be decoded"),
    (_set("v", 1, [float("nan"), 1.0]), "error: f.parquet, column 'v', row 1: NaN or infinite values"),
    (_set("v", 5, [float("inf"), 1.0]), "error: f.parquet, column 'v', row 5: NaN or infinite values"),
    (_set("v", 2, [1.0]), "error: f.parquet, column 'v', row 2: vector length differs"),
    (_set("motion", 2, [[0.0, 1.0, 2.0], [0.0, 1.0]]),
     "error: f.parquet, column 'motion', row 2: time steps with other than the column's 3 channels"),
    (_set("motion", 1, [[0.0, float("nan"), 2.0]] * 4), "error: f.parquet, column 'motion', row 1: NaN or infinite"),
    (_set("motion", 4, []), "error: f.parquet, column 'motion', row 4: a series with no time steps"),
    (_set("motion", 3, [[0.0, 1.0, 2.0], None]), "error: f.parquet, column 'motion', row 3: a null time step"),
    (_set("label", 5, 7), "error: f.parquet, column 'label', row 5: label outside the declared set 0..2"),
    (_set("label_name", 0, "cat"), "error: f.parquet, column 'label_name', row 0: label_name differs"),
    (_set("label", 1, -1), "error: f.parquet, column 'label', row 1: labels must be non-negative"),
    (_set("split", 3, "holdout"), "error: f.parquet, column 'split', row 3: split must be one of"),
    (_no_test, "error: f.parquet, column 'split': no 'test' rows"),
    (_no_train_for_class, "error: f.parquet, column 'label', rows 2, 3: label 1 has no train rows"),
    (_all_null(4), "error: f.parquet, row 4: every modality is null in these rows"),
    (_null_group, "error: f.parquet, column 'group', row 3: null group"),
    (_set("sample_id", 4, "s1"), "error: f.parquet, column 'sample_id', rows 1, 4: 1 sample_id value(s) used"),
    (_set("caption", 2, None), "warning: f.parquet, column 'caption', row 2: modality missing (null)"),
    (_numbers_as_text, "warning: f.parquet, column 'caption': every value is a number written as text"),
], ids=["missing-column", "wrong-type", "bad-image", "bad-audio", "nan", "inf", "ragged-vector",
        "series-uneven-channels", "series-nan", "series-empty", "series-null-step",
        "label-outside-declared", "label-name-mismatch", "negative-label", "bad-split", "empty-split",
        "empty-task", "all-modalities-null", "null-group", "duplicate-sample-id", "null-modality-warning",
        "numbers-as-text-warning"])
def test_each_bad_input_is_reported_with_file_column_and_rows(change, expected):
    cols = good_columns()
    change(cols)
    problems = [str(p) for p in validate_table(table(cols, ["c0", "c1", "c2"]), "f.parquet")]
    assert any(p.startswith(expected) for p in problems), problems
    if expected.startswith("warning"):
        assert not any(p.startswith("error") for p in problems), problems


def test_validate_command_lists_every_problem_and_exits_non_zero(tmp_path, capsys):
    cols = good_columns()
    cols["image"][1] = b"not an image"
    cols["v"][3] = [float("nan"), 0.0]
    pq.write_table(table(cols), tmp_path / "bad.parquet")
    assert main(["data", "validate", str(tmp_path / "bad.parquet")]) == 1
    out = capsys.readouterr().out
    assert "bad.parquet, column 'image', row 1: cannot be decoded" in out
    assert "bad.parquet, column 'v', row 3: NaN or infinite values" in out
    assert "2 error(s)" in out
    pq.write_table(table(good_columns()), tmp_path / "good.parquet")
    assert main(["data", "validate", str(tmp_path / "good.parquet")]) == 0


def test_audio_as_samples_needs_a_sample_rate():
    cols = good_columns()
    cols["audio"] = [[0.0, 0.1, -0.1]] * 6
    t = pa.table({k: pa.array(v, type=pa.binary() if k == "image" else None) for k, v in cols.items()})
    assert any("needs a 'sample_rate' column" in str(p) for p in validate_table(t, "f.parquet"))
    t = t.append_column("sample_rate", pa.array([8000] * 6))
    assert validate_table(t, "f.parquet") == []


def test_a_null_in_a_fixed_size_list_column_is_named(tmp_path, capsys):
    cols = good_columns()
    t = table(cols)
    v = pa.array([None if i == 3 else r for i, r in enumerate(cols["v"])], type=pa.list_(pa.float32(), 2))
    pq.write_table(t.set_column(t.schema.get_field_index("v"), "v", v), tmp_path / "fsl.parquet")
    assert main(["data", "validate", str(tmp_path / "fsl.parquet")]) == 1
    out = capsys.readouterr().out
    assert "fsl.parquet, column 'v': a fixed-size list with null rows" in out and "list<float>" in out


def test_the_drivers_check_reads_the_modality_columns_a_row_group_at_a_time(tmp_path):
    """Four files of 16 MiB of vectors in row groups of 2 MiB: the check in the driver (no Ray: its
    parts in this process too) allocates a few row groups' worth (14 MiB), not the files' (134 MiB
    when the first rows were read with pyarrow's Dataset.head)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for f in range(4):
        n = 8192
        cols = {"sample_id": [f"s{f}-{i}" for i in range(n)], "label": (np.arange(n) % 3).tolist(),
                "label_name": [f"c{i % 3}" for i in range(n)], "domain": ["d"] * n, "split": ["train"] * n,
                "v": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 512).astype(np.float32)), 512)}
        pq.write_table(pa.table(cols), tmp_path / f"part-{f}.parquet", row_group_size=1024)
    probe = ("import sys, pyarrow as pa; from pipeline.data import check_source; "
             "data, problems = check_source(sys.argv[1]); assert data.modalities == {'v': 512}, data.modalities; "
             "print(pa.default_memory_pool().max_memory())")
    peak = int(subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB"
