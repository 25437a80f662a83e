"""The project's Parquet schema, its validator, and loading a data set for the pipeline.

One row per sample: `sample_id`, `label` (int), `label_name`, `domain`, `split` (train|val|test),
and one column per modality. A modality column is found from its type; here `vector`
(list<float>, fixed length). Any modality may be null in a row, but not all of them.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REQUIRED = {"sample_id": "string", "label": "integer", "label_name": "string", "domain": "string", "split": "string"}
SPLITS = ("train", "val", "test")
MAX_ROWS_LISTED = 5


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, and the row and column if known."""


@dataclass
class Problem:
    level: str  # "error" | "warning"
    file: str
    column: str | None
    rows: list[int]
    message: str

    def __str__(self):
        where = self.file + (f", column '{self.column}'" if self.column else "")
        if self.rows:
            shown = ", ".join(map(str, self.rows[:MAX_ROWS_LISTED]))
            more = f" and {len(self.rows) - MAX_ROWS_LISTED} more" if len(self.rows) > MAX_ROWS_LISTED else ""
            where += f", row{'s' if len(self.rows) > 1 else ''} {shown}{more}"
        return f"{self.level}: {where}: {self.message}"


def modality_kind(dtype: pa.DataType) -> str | None:
    if (pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype) or pa.types.is_large_list(dtype)) and (
        pa.types.is_floating(dtype.value_type) or pa.types.is_integer(dtype.value_type)
    ):
        return "vector"
    return None


def _type_ok(dtype: pa.DataType, want: str) -> bool:
    if want == "integer":
        return pa.types.is_integer(dtype)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _rows(mask) -> list[int]:
    return np.flatnonzero(np.asarray(mask)).tolist()


def validate_table(table: pa.Table, file: str) -> list[Problem]:
    """Every problem found, each naming the file, column and rows (0-based row numbers)."""
    problems: list[Problem] = []
    err = lambda col, rows, msg: problems.append(Problem("error", file, col, rows, msg))  # noqa: E731
    warn = lambda col, rows, msg: problems.append(Problem("warning", file, col, rows, msg))  # noqa: E731
    for col, want in REQUIRED.items():
        if col not in table.column_names:
            err(col, [], "required column is missing")
        elif not _type_ok(table.schema.field(col).type, want):
            err(col, [], f"must be {want}, found {table.schema.field(col).type}")
        elif table[col].null_count:
            err(col, _rows(table[col].is_null()), "null values in a required column")
    modalities = []
    for col in table.column_names:
        if col in REQUIRED:
            continue
        if modality_kind(table.schema.field(col).type) is None:
            err(col, [], f"type {table.schema.field(col).type} is not a supported modality (vector: list<float>)")
            continue
        modalities.append(col)
        arr = table[col].combine_chunks()
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        valid = ~np.asarray(arr.is_null())
        if valid.any():
            expected = int(np.bincount(lengths[valid].astype(int)).argmax())
            bad = valid & (lengths != expected)
            if bad.any():
                err(col, _rows(bad), f"vector length differs from the column's {expected}")
            flat = arr.flatten()
            if pa.types.is_floating(flat.type):
                finite = np.isfinite(flat.to_numpy(zero_copy_only=False))
                if not finite.all():
                    offsets = np.concatenate([[0], np.cumsum(np.where(valid, lengths, 0))])
                    row_of = np.searchsorted(offsets, np.flatnonzero(~finite), side="right") - 1
                    err(col, sorted(set(row_of.tolist())), "NaN or infinite values")
        if not valid.all():
            warn(col, _rows(~valid), "modality missing (null); the adapter masks it out")
    if not modalities:
        err(None, [], "no modality column (a list<float> vector column) found")
    elif table.num_rows:
        none = np.logical_and.reduce([np.asarray(table[c].is_null()) for c in modalities])
        if none.any():
            err(None, _rows(none), "every modality is null in these rows")
    if "split" in table.column_names and _type_ok(table.schema.field("split").type, "string"):
        splits = np.asarray(table["split"].to_pylist(), dtype=object)
        bad = ~np.isin(splits, SPLITS)
        if bad.any():
            err("split", _rows(bad), f"split must be one of {', '.join(SPLITS)}")
        for s in ("train", "test"):
            if not (splits == s).any():
                err("split", [], f"no '{s}' rows")
    if table.num_rows == 0:
        err(None, [], "the file has no rows")
    return problems


@dataclass
class MultiModalData:
    """A validated data set held as an Arrow table; modality columns and their feature sizes."""
    path: str
    table: pa.Table
    modalities: dict[str, int] = field(default_factory=dict)

    def column(self, name) -> np.ndarray:
        return self.table[name].to_numpy(zero_copy_only=False)


def read_parquet(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file or folder: {e}") from e


def load_data(path: str | Path) -> MultiModalData:
    table = read_parquet(path)
    errors = [p for p in validate_table(table, str(path)) if p.level == "error"]
    if errors:
        listed = "\n  ".join(map(str, errors))
        raise DataError(f"{path}: {len(errors)} problem(s); run `mmcl data validate {path}` for all:\n  {listed}")
    modalities = {}
    for col in table.column_names:
        if col not in REQUIRED:
            arr = table[col].drop_null()
            modalities[col] = len(arr[0]) if len(arr) else 0
    return MultiModalData(str(path), table, modalities)


def batch_to_arrays(batch: dict, modalities: dict[str, int]):
    """A batch (column -> numpy) to dense features, a present mask and labels.

    Null modality entries become zeros with present=False.
    """
    n = len(batch["label"])
    feats, present = {}, np.zeros((n, len(modalities)), dtype=bool)
    for i, (m, dim) in enumerate(modalities.items()):
        col = batch[m]
        out = np.zeros((n, dim), dtype=np.float32)
        if isinstance(col, np.ndarray) and col.dtype != object and col.ndim == 2:
            out[:] = col
            present[:, i] = True
        else:
            for r, v in enumerate(col):
                if v is not None:
                    out[r] = v
                    present[r, i] = True
        feats[m] = out
    return feats, present, np.asarray(batch["label"], dtype=np.int64)
