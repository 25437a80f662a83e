"""The project's Parquet schema (docs/data.md), its validator, and loading a data set for the pipeline.

One row per sample: `sample_id`, `label` (int), `label_name`, `domain`, `split` (train|val|test),
and one column per modality, its kind found from its type: image (encoded image bytes), audio
(WAV/FLAC/OGG bytes, or float samples in a column named `audio` or `*_audio` with a
`sample_rate` column), text (string), vector (list<float>, fixed length) or timeseries
(list<list<float>>: time steps, each with the same channels). Any modality may be null in a row, but
not all of them.
"""
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REQUIRED = {"sample_id": "string", "label": "integer", "label_name": "string", "domain": "string", "split": "string"}
RESERVED = {"sample_rate": "integer",  # per-row rate of audio given as samples
            "group": "string"}  # rows that share one are never split between train and val
LABELS_METADATA = b"mmcl.labels"  # optional schema metadata: JSON list of label names, index = label
FEATURES_MANIFEST = "_mmcl_features.json"  # written last into a feature cache folder
AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb")
SPLITS = ("train", "val", "test")
MAX_ROWS_LISTED = 5
_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
NUMBERS = re.compile(rf"^\s*\[?\s*{_NUMBER}(\s*[,;\s]\s*{_NUMBER})*\s*\]?\s*$")


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



def save_table(table: pa.Table, out: str | Path, names: list[str] | None = None) -> Path:
    """A table in the schema to Parquet, written atomically (concurrent writers each write their
    own file, then one wins), its label names declared in the metadata: `names`, else from the
    rows' `label_name`."""
    if names is None:
        pairs = dict(zip(table["label"].to_pylist(), table["label_name"].to_pylist()))
        names = [str(pairs.get(i, i)) for i in range(max(pairs) + 1)]
    table = table.replace_schema_metadata({LABELS_METADATA: json.dumps(names).encode()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out

def _is_numeric_list(dtype: pa.DataType) -> bool:
    return _is_list(dtype) and (pa.types.is_floating(dtype.value_type) or pa.types.is_integer(dtype.value_type))


def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype) or pa.types.is_large_list(dtype)


def modality_kind(name: str, dtype: pa.DataType, first_value=None) -> str | None:
    """The modality a column holds, from its type (binary columns: from their first bytes)."""
    if _is_list(dtype) and _is_numeric_list(dtype.value_type):
        return "timeseries"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "text"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return "audio" if first_value is not None and first_value.startswith(AUDIO_MAGIC) else "image"
    if _is_numeric_list(dtype):
        return "audio" if name == "audio" or name.endswith("_audio") else "vector"
    return None


def modality_columns(table: pa.Table) -> dict[str, str]:
    """Column -> kind for every modality column of a table (unsupported types are left out)."""
    out = {}
    for name in table.column_names:
        if name in REQUIRED or name in RESERVED:
            continue
        first = next((v for v in table[name].drop_null().to_pylist()[:1]), None) if pa.types.is_binary(
            table.schema.field(name).type) or pa.types.is_large_binary(table.schema.field(name).type) else None
        kind = modality_kind(name, table.schema.field(name).type, first)
        if kind:
            out[name] = kind
    return out


def _type_ok(dtype: pa.DataType, want: str) -> bool:
    if want == "integer":
        return pa.types.is_integer(dtype)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _rows(mask) -> list[int]:
    return np.flatnonzero(np.asarray(mask)).tolist()


def validate_table(table: pa.Table, file: str, kinds: dict[str, str] | None = None) -> list[Problem]:
    """Every problem found, each naming the file, column and rows (0-based row numbers).

    `kinds` overrides the modality kinds read from the column types (a feature cache's are vectors)."""
    problems: list[Problem] = []
    err = lambda col, rows, msg: problems.append(Problem("error", file, col, rows, msg))  # noqa: E731
    warn = lambda col, rows, msg: problems.append(Problem("warning", file, col, rows, msg))  # noqa: E731
    ok = set()
    for col, want in REQUIRED.items():
        if col not in table.column_names:
            err(col, [], "required column is missing")
        elif not _type_ok(table.schema.field(col).type, want):
            err(col, [], f"must be {want}, found {table.schema.field(col).type}")
        elif table[col].null_count:
            err(col, _rows(table[col].is_null()), "null values in a required column")
        else:
            ok.add(col)
    for col, want in RESERVED.items():
        if col in table.column_names and not _type_ok(table.schema.field(col).type, want):
            err(col, [], f"must be {want}, found {table.schema.field(col).type}")
    if "sample_id" in ok:
        ids = np.asarray(table["sample_id"].to_pylist(), dtype=object)
        _, first, counts = np.unique(ids, return_index=True, return_counts=True)
        repeated = np.isin(ids, ids[first[counts > 1]])
        if repeated.any():
            err("sample_id", _rows(repeated), f"{int((counts > 1).sum())} sample_id value(s) used by several rows")
    if "group" in table.column_names and table["group"].null_count:
        err("group", _rows(table["group"].is_null()), "null group (give each row one, or drop the column)")
    kinds = kinds if kinds is not None else modality_columns(table)
    for col in table.column_names:
        if col not in REQUIRED and col not in RESERVED and col not in kinds:
            err(col, [], f"type {table.schema.field(col).type} is not a modality (image or audio: binary; "
                         "text: string; vector or audio samples: list<float>; timeseries: "
                         "list<list<float>>)")
    for col, kind in kinds.items():
        arr = table[col].combine_chunks()
        valid = ~np.asarray(arr.is_null())
        if kind == "text" and valid.any() and all(NUMBERS.match(v) for v in arr.drop_null().to_pylist()):
            warn(col, [], "every value is a number written as text, so it is encoded as text; a vector is a "
                          "list<float> column (pa.list_(pa.float32()))")
        if kind == "vector":
            _check_vectors(arr, valid, col, err)
        elif kind == "timeseries":
            _check_series(arr, valid, col, err)
        elif kind == "image":
            _check_decodes(arr, valid, col, err, _decode_image_header)
        elif kind == "audio":
            if "sample_rate" not in table.column_names and not pa.types.is_binary(arr.type):
                err(col, [], "audio given as samples needs a 'sample_rate' column")
            elif pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
                _check_decodes(arr, valid, col, err, _decode_audio_header)
            else:
                _check_vectors(arr, valid, col, err, same_length=False)
        if not valid.all():
            warn(col, _rows(~valid), "modality missing (null); the adapter masks it out")
    if not kinds:
        err(None, [], "no modality column found")
    elif table.num_rows:
        none = np.logical_and.reduce([np.asarray(table[c].is_null()) for c in kinds])
        if none.any():
            err(None, _rows(none), "every modality is null in these rows")
    if {"label", "label_name"} <= ok:
        _check_labels(table, err)
    if "split" in ok:
        splits = np.asarray(table["split"].to_pylist(), dtype=object)
        bad = ~np.isin(splits, SPLITS)
        if bad.any():
            err("split", _rows(bad), f"split must be one of {', '.join(SPLITS)}")
        for s in ("train", "test"):
            if not (splits == s).any():
                err("split", [], f"no '{s}' rows")
        for col, level in (("label", err), ("domain", warn)):
            if col in ok:  # a class (class-IL) or a domain (domain-IL) without train rows is an empty task
                values = np.asarray(table[col].to_pylist(), dtype=object)
                for v in sorted(set(values.tolist()) - set(values[splits == "train"].tolist())):
                    level(col, _rows(values == v), f"{col} {v!r} has no train rows: its task would be empty")
                for v in sorted(set(values[splits == "train"].tolist()) - set(values[splits == "test"].tolist())):
                    warn(col, [], f"{col} {v!r} has no test rows: its accuracy cannot be measured")
    if table.num_rows == 0:
        err(None, [], "the file has no rows")
    return problems


def _check_vectors(arr, valid, col, err, same_length=True):
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if not valid.any():
        return
    if same_length:
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


def _check_series(arr, valid, col, err):
    """Each row a (time steps x channels) series: at least one step, every step with the column's
    channel count, no null steps, finite values. Series may differ in length."""
    steps = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    empty = valid & (np.nan_to_num(steps) == 0)
    if empty.any():
        err(col, _rows(empty), "a series with no time steps")
    inner = arr.flatten()  # one entry per time step, rows back to back
    row_of_step = np.repeat(np.arange(len(arr)), np.where(valid, steps, 0).astype(int))
    if inner.null_count:
        err(col, sorted(set(row_of_step[np.asarray(inner.is_null())].tolist())), "a null time step")
    channels = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    if len(channels):
        expected = int(np.bincount(np.nan_to_num(channels).astype(int)).argmax())
        bad = np.nan_to_num(channels) != expected
        if bad.any():
            err(col, sorted(set(row_of_step[bad].tolist())),
                f"time steps with other than the column's {expected} channels (uneven lengths)")
    values = inner.flatten()
    if pa.types.is_floating(values.type) and len(values):
        finite = np.isfinite(values.to_numpy(zero_copy_only=False))
        if not finite.all():
            step_of = np.repeat(np.arange(len(inner)), np.nan_to_num(channels).astype(int))
            err(col, sorted(set(row_of_step[step_of[~finite]].tolist())), "NaN or infinite values")


def _decode_image_header(data: bytes):
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def _decode_audio_header(data: bytes):
    import soundfile
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    if not np.isfinite(samples).all():
        raise ValueError("NaN or infinite samples")


def _check_decodes(arr, valid, col, err, decode):
    failed, reasons = [], {}
    for r, value in enumerate(arr.to_pylist()):
        if value is None:
            continue
        try:
            decode(value)
        except Exception as e:  # each library raises its own types
            failed.append(r)
            reasons.setdefault(type(e).__name__ + ": " + str(e)[:80], r)
    if failed:
        err(col, failed, "cannot be decoded (" + "; ".join(list(reasons)[:2]) + ")")


def _check_labels(table, err):
    labels = table["label"].to_numpy(zero_copy_only=False)
    names = np.asarray(table["label_name"].to_pylist(), dtype=object)
    if (labels < 0).any():
        err("label", _rows(labels < 0), "labels must be non-negative integers")
    meta = (table.schema.metadata or {}).get(LABELS_METADATA)
    if meta is not None:
        declared = json.loads(meta)
        bad = (labels < 0) | (labels >= len(declared))
        if bad.any():
            err("label", _rows(bad), f"label outside the declared set 0..{len(declared) - 1} ({LABELS_METADATA.decode()})")
        named = ~bad
        wrong = named.copy()
        wrong[named] = names[named] != np.asarray(declared, dtype=object)[labels[named]]
        if wrong.any():
            err("label_name", _rows(wrong), "label_name differs from the declared name of its label")
        return
    for label in np.unique(labels):
        rows = labels == label
        if len(set(names[rows].tolist())) > 1:
            err("label_name", _rows(rows), f"label {label} has several names: {sorted(set(names[rows].tolist()))}")


@dataclass
class MultiModalData:
    """A validated data set held as an Arrow table.

    `kinds`: modality column -> image|audio|text|vector. `modalities`: column -> per-token feature
    size, for columns the model reads directly (vectors, or a feature cache's encoded columns,
    whose rows hold `tokens[column]` tokens back to back).
    """
    path: str
    table: pa.Table
    kinds: dict[str, str]
    modalities: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def needs_encoding(self) -> bool:
        return any(k != "vector" for k in self.kinds.values())

    def column(self, name) -> np.ndarray:
        return self.table[name].to_numpy(zero_copy_only=False)


def read_parquet(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        if "Expected all lists to be of size" in str(e):
            raise DataError(_null_in_fixed_size_list(path)) from e
        raise DataError(f"{path}: not a readable Parquet file or folder: {e}") from e


def _null_in_fixed_size_list(path: Path) -> str:
    """pyarrow writes nulls in a fixed_size_list column but cannot read them back."""
    columns = [f.name for f in pq.read_schema(path) if pa.types.is_fixed_size_list(f.type)]
    bad = []
    for name in columns:
        try:
            pq.read_table(path, columns=[name])
        except pa.ArrowInvalid:
            bad.append(name)
    return (f"{path}, column{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad or columns))}: a fixed-size list "
            "with null rows, which pyarrow cannot read back; write the column as list<float> "
            "(pa.list_(pa.float32())), where null rows are allowed")


def read_manifest(path: str | Path) -> dict | None:
    """A feature cache folder's manifest, None for anything else."""
    manifest = Path(path) / FEATURES_MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def load_data(path: str | Path) -> MultiModalData:
    table = read_parquet(path)
    manifest = read_manifest(path)
    encoded = manifest["modalities"] if manifest else None
    errors = [p for p in validate_table(table, str(path), encoded and {m: "vector" for m in encoded})
              if p.level == "error"]
    if errors:
        listed = "\n  ".join(map(str, errors))
        raise DataError(f"{path}: {len(errors)} problem(s); run `mmcl data validate {path}` for all:\n  {listed}")
    if encoded:
        return MultiModalData(str(path), table, {m: e["kind"] for m, e in encoded.items()},
                              {m: e["dim"] for m, e in encoded.items()}, {m: e["tokens"] for m, e in encoded.items()})
    kinds = modality_columns(table)
    vectors = [m for m, k in kinds.items() if k == "vector"]
    dims = {}
    for m in vectors:
        arr = table[m].drop_null()
        dims[m] = len(arr[0]) if len(arr) else 0
    return MultiModalData(str(path), table, kinds, dims, {m: 1 for m in vectors})


def batch_to_arrays(batch: dict, modalities: dict[str, int]):
    """A batch (column -> numpy) to dense features, a present mask and labels.

    A column whose rows are wider than the modality's feature size holds tokens back to back:
    it becomes (n, tokens, size). Null modality entries become zeros with present=False.
    """
    n = len(batch["label"])
    feats, present = {}, np.zeros((n, len(modalities)), dtype=bool)
    for i, (m, dim) in enumerate(modalities.items()):
        col = batch[m]
        if isinstance(col, np.ndarray) and col.dtype != object and col.ndim == 2:
            out = col.astype(np.float32, copy=False)
            present[:, i] = True
        else:
            width = next((len(v) for v in col if v is not None), dim)
            out = np.zeros((n, width), dtype=np.float32)
            for r, v in enumerate(col):
                if v is not None:
                    out[r] = v
                    present[r, i] = True
        feats[m] = out.reshape(n, -1, dim) if out.shape[1] != dim else out
    return feats, present, np.asarray(batch["label"], dtype=np.int64)
