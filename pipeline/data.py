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
from pyarrow.fs import FileType

from pipeline import storage

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
    kinds = kinds if kinds is not None else modality_columns(table)
    problems = check_columns(table, table.schema, file, kinds)
    found = check_modalities(table, file, kinds, expected_widths(table, kinds))
    return problems + found["problems"] + numbers_as_text(file, kinds, [found])


def check_columns(table: pa.Table, schema: pa.Schema, file: str, kinds: dict[str, str]) -> list[Problem]:
    """The checks of the schema and of the plan's columns (`table` holds at least those of them
    the file has): required columns, ids, groups, labels, splits."""
    problems: list[Problem] = []
    err = lambda col, rows, msg: problems.append(Problem("error", file, col, rows, msg))  # noqa: E731
    warn = lambda col, rows, msg: problems.append(Problem("warning", file, col, rows, msg))  # noqa: E731
    ok = set()
    for col, want in REQUIRED.items():
        if col not in schema.names:
            err(col, [], "required column is missing")
        elif not _type_ok(schema.field(col).type, want):
            err(col, [], f"must be {want}, found {schema.field(col).type}")
        elif table[col].null_count:
            err(col, _rows(table[col].is_null()), "null values in a required column")
        else:
            ok.add(col)
    for col, want in RESERVED.items():
        if col in schema.names and not _type_ok(schema.field(col).type, want):
            err(col, [], f"must be {want}, found {schema.field(col).type}")
    if "sample_id" in ok:
        ids = np.asarray(table["sample_id"].to_pylist(), dtype=object)
        _, first, counts = np.unique(ids, return_index=True, return_counts=True)
        repeated = np.isin(ids, ids[first[counts > 1]])
        if repeated.any():
            err("sample_id", _rows(repeated), f"{int((counts > 1).sum())} sample_id value(s) used by several rows")
    if "group" in table.column_names and table["group"].null_count:
        err("group", _rows(table["group"].is_null()), "null group (give each row one, or drop the column)")
    for col in schema.names:
        if col not in REQUIRED and col not in RESERVED and col not in kinds:
            err(col, [], f"type {schema.field(col).type} is not a modality (image or audio: binary; "
                         "text: string; vector or audio samples: list<float>; timeseries: "
                         "list<list<float>>)")
    for col, kind in kinds.items():
        dtype = schema.field(col).type
        if kind == "audio" and "sample_rate" not in schema.names and not (
                pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)):
            err(col, [], "audio given as samples needs a 'sample_rate' column")
    if not kinds:
        err(None, [], "no modality column found")
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


def expected_widths(table: pa.Table, kinds: dict[str, str]) -> dict[str, int]:
    """The length every vector (and every time step of a series) of a column should have: the most
    common one in `table` (all rows, or the first rows of a large file)."""
    out = {}
    for col, kind in kinds.items():
        if kind not in ("vector", "timeseries"):
            continue
        arr = table[col].combine_chunks().drop_null()
        if kind == "timeseries":
            arr = arr.flatten().drop_null()
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        out[col] = int(np.bincount(lengths.astype(int)).argmax()) if len(lengths) else 0
    return out


def check_modalities(table: pa.Table, file: str, kinds: dict[str, str], widths: dict[str, int],
                     offset: int = 0) -> dict:
    """The checks of the modality columns of some rows of `file`, the first being row `offset`:
    {"problems", "numbers": text columns whose every value here is a number, "nulls": per column}."""
    problems: list[Problem] = []
    at = lambda rows: [r + offset for r in rows]  # noqa: E731
    err = lambda col, rows, msg: problems.append(Problem("error", file, col, at(rows), msg))  # noqa: E731
    warn = lambda col, rows, msg: problems.append(Problem("warning", file, col, at(rows), msg))  # noqa: E731
    numbers, nulls = [], {}
    for col, kind in kinds.items():
        arr = table[col].combine_chunks()
        valid = ~np.asarray(arr.is_null())
        nulls[col] = int((~valid).sum())
        if kind == "text" and valid.any() and all(NUMBERS.match(v) for v in arr.drop_null().to_pylist()):
            numbers.append(col)
        if kind == "vector":
            _check_vectors(arr, valid, col, err, widths.get(col))
        elif kind == "timeseries":
            _check_series(arr, valid, col, err, widths.get(col))
        elif kind == "image":
            _check_decodes(arr, valid, col, err, _decode_image_header)
        elif kind == "audio":
            if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
                _check_decodes(arr, valid, col, err, _decode_audio_header)
            elif "sample_rate" in table.column_names:
                _check_vectors(arr, valid, col, err, None)
        if not valid.all():
            warn(col, _rows(~valid), "modality missing (null); the adapter masks it out")
    if kinds and table.num_rows:
        none = np.logical_and.reduce([np.asarray(table[c].is_null()) for c in kinds])
        if none.any():
            err(None, _rows(none), "every modality is null in these rows")
    return {"problems": problems, "numbers": numbers, "nulls": nulls}


def numbers_as_text(file: str, kinds: dict[str, str], found: list[dict]) -> list[Problem]:
    """The warning for a text column whose every value, in every part checked, is a number."""
    return [Problem("warning", file, col, [], "every value is a number written as text, so it is encoded as text; "
                                              "a vector is a list<float> column (pa.list_(pa.float32()))")
            for col, kind in kinds.items() if kind == "text" and all(col in f["numbers"] for f in found)]


def _check_vectors(arr, valid, col, err, expected: int | None):
    """`expected`: the length every vector must have (None: any)."""
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if not valid.any():
        return
    if expected is not None:
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


def _check_series(arr, valid, col, err, expected: int):
    """Each row a (time steps x channels) series: at least one step, every step with `expected`
    channels, no null steps, finite values. Series may differ in length."""
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
    nullable: list[str] = field(default_factory=list)  # modality columns null in some row

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


def _null_in_fixed_size_list(path: str) -> str:
    """pyarrow writes nulls in a fixed_size_list column but cannot read them back."""
    source = storage.parquet_file(parquet_files(path)[0])
    columns = [f.name for f in source.schema_arrow if pa.types.is_fixed_size_list(f.type)]
    bad = []
    for name in columns:
        try:
            source.read(columns=[name])
        except pa.ArrowInvalid:
            bad.append(name)
    return (f"{path}, column{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad or columns))}: a fixed-size list "
            "with null rows, which pyarrow cannot read back; write the column as list<float> "
            "(pa.list_(pa.float32())), where null rows are allowed")


def read_manifest(path: str | Path) -> dict | None:
    """A feature cache folder's manifest, None for anything else (one request on object storage)."""
    try:
        return json.loads(storage.read_text(storage.join(path, FEATURES_MANIFEST)))
    except (FileNotFoundError, NotADirectoryError):
        return None


def load_data(path: str | Path) -> MultiModalData:
    """A checked data set, holding only the plan's columns (`check_source`); a DataError lists its errors."""
    data, problems = check_source(path)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        listed = "\n  ".join(map(str, errors[:20]))
        raise DataError(f"{path}: {len(errors)} problem(s); run `mmcl data validate {path}` for all:\n  {listed}")
    return data


PART_ROWS = 1024  # rows a check task holds at once
HEAD_ROWS = 1024  # rows whose vectors set the length every vector of the column should have


def parquet_files(path: str | Path) -> list[str]:
    """The Parquet files of a file or folder (a local path or a URI), in order (names starting with
    _ or . left out, as pyarrow does)."""
    if problem := storage.unreachable(path):
        raise DataError(f"{path}: {problem}")
    found = storage.info(path)
    if found.is_file:
        return [str(path)]
    if found.type != FileType.Directory:
        raise DataError(f"data file not found: {path}")
    base = str(path).rstrip("/") + "/"
    return [f for f, _ in storage.files_under(path) if f.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in f[len(base):].split("/"))]


def parquet_parts(path: str | Path | list[str]) -> list[dict]:
    """The row groups of a Parquet file, folder or list of files, in order: file, row group, its
    first row's number in the file, its rows."""
    parts = []
    for file in path if isinstance(path, list) else parquet_files(path):
        meta, offset = storage.parquet_file(file).metadata, 0
        for g in range(meta.num_row_groups):
            parts.append({"file": file, "row_group": g, "offset": offset, "rows": meta.row_group(g).num_rows})
            offset += meta.row_group(g).num_rows
    return parts


def check_source(path: str | Path) -> tuple[MultiModalData, list[Problem]]:
    """Every problem of a file or folder, reading only the schema and the plan's columns here: the
    modality columns are checked part by part (a row group each), as Ray Data tasks when there are
    several and this is a Ray driver, else in this process. Rows are numbered within each file."""
    files, label = parquet_files(path), str(path)
    try:
        source = storage.parquet_dataset(files)
        schema = source.schema
        table = source.to_table(columns=[c for c in PLAN_COLUMNS if c in schema.names])
        table = table.replace_schema_metadata(schema.metadata)
        manifest = read_manifest(path)
        encoded = manifest["modalities"] if manifest else None
        head = first_rows(files, schema, [f.name for f in schema if f.name not in REQUIRED
                                          and f.name not in RESERVED and _is_list(f.type)], HEAD_ROWS)
        firsts = {f.name: first_valid(files, f.name)
                  for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    except (pa.ArrowInvalid, OSError) as e:
        if "Expected all lists to be of size" in str(e):
            raise DataError(_null_in_fixed_size_list(files[0])) from e
        raise DataError(f"{path}: not a readable Parquet file or folder: {e}") from e
    if encoded:
        kinds = {m: "vector" for m in encoded}
    else:
        kinds = {}
        for f in schema:
            if f.name not in REQUIRED and f.name not in RESERVED:
                first = firsts[f.name][0].as_py() if len(firsts.get(f.name, [])) else None
                kind = modality_kind(f.name, f.type, first)
                if kind:
                    kinds[f.name] = kind
    problems = check_columns(table, schema, label, kinds)
    widths = expected_widths(head, kinds)
    parts = parquet_parts(files)
    starts = np.cumsum([0] + [sum(p["rows"] for p in parts if p["file"] == f) for f in files]).tolist()
    names = {f: label if len(files) == 1 else f for f in files}
    found = _check_parts(parts, kinds, widths, "sample_rate" in schema.names, names, label)
    problems = _per_file(problems, files, starts, names) + [p for f in found for p in f["problems"]]
    problems += numbers_as_text(label, kinds, found)
    nulls = [m for m in kinds if sum(f["nulls"].get(m, 0) for f in found)]
    if encoded:
        return encoded_data(label, table, encoded, nulls), problems
    vectors = {m: widths[m] for m, k in kinds.items() if k == "vector"}
    return MultiModalData(label, table, kinds, vectors, {m: 1 for m in vectors}, nulls), problems


def first_rows(files: list[str], schema: pa.Schema, columns: list[str], rows: int) -> pa.Table:
    """The first `rows` rows of `columns`, read a row group at a time (pyarrow's Dataset.head reads
    batches of 131,072 rows several files ahead: gigabytes of features in the driver)."""
    tables, n = [], 0
    for file in files:
        source = storage.parquet_file(file)
        for g in range(source.num_row_groups):
            tables.append(source.read_row_group(g, columns=columns))
            n += tables[-1].num_rows
            if n >= rows:
                return pa.concat_tables(tables).slice(0, rows)
    return pa.concat_tables(tables) if tables else schema.empty_table().select(columns)


def first_valid(files: list[str], column: str, batch_rows: int = 16) -> pa.Array:
    """The column's first non-null value (a length-1 array; empty if it has none), read a few rows at
    a time: each may be a whole image or recording."""
    for file in files:
        source = storage.parquet_file(file)
        for g in range(source.num_row_groups):
            for batch in source.iter_batches(batch_rows, row_groups=[g], columns=[column]):
                valid = batch.column(0).drop_null()
                if len(valid):
                    return valid[:1]
    return pa.array([])


def check_part(part: dict, kinds: dict[str, str], widths: dict[str, int], rates: bool, names: dict) -> dict:
    """`check_modalities` over one row group, PART_ROWS at a time; the problems as dicts."""
    file, found = part["file"], {"problems": [], "numbers": list(kinds), "nulls": {}}
    columns = [*kinds, *(["sample_rate"] if rates else [])]
    offset = part["offset"]
    try:
        batches = storage.parquet_file(file).iter_batches(PART_ROWS, row_groups=[part["row_group"]], columns=columns)
        for batch in batches:
            one = check_modalities(pa.Table.from_batches([batch]), names[file], kinds, widths, offset)
            found["problems"] += one["problems"]
            found["numbers"] = [c for c in found["numbers"] if c in one["numbers"]]
            for c, n in one["nulls"].items():
                found["nulls"][c] = found["nulls"].get(c, 0) + n
            offset += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        message = _null_in_fixed_size_list(file) if "Expected all lists to be of size" in str(e) else \
            f"{file}: not a readable Parquet file: {e}"
        found["problems"].append(Problem("error", names[file], None, [], message))
    found["problems"] = [vars(p) for p in found["problems"]]
    return {"found": json.dumps(found)}


def _check_parts(parts: list[dict], kinds, widths, rates: bool, names: dict, label: str) -> list[dict]:
    import ray

    kwargs = {"kinds": kinds, "widths": widths, "rates": rates, "names": names}
    # Several parts, in the driver only: one part is checked here sooner than a Ray Data job starts,
    # and a sequence that is itself a Ray task (`mmcl bench` with executor=local) holds a CPU, so
    # tasks asking for the others could wait on its siblings for ever.
    if len(parts) > 1 and ray.is_initialized() and ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        import ray.data

        from pipeline.streams import on_this_node

        ds = ray.data.from_items(parts, override_num_blocks=len(parts)).map(
            check_part, fn_kwargs=kwargs, num_cpus=1, **on_this_node(label))
        results = ds.take_all()
    else:
        results = [check_part(p, **kwargs) for p in parts]
    found = [json.loads(r["found"]) for r in results]
    for f in found:
        f["problems"] = [Problem(**p) for p in f["problems"]]
    return found


def _per_file(problems: list[Problem], files: list[str], starts: list[int], names: dict) -> list[Problem]:
    """Problems of the whole table with their rows numbered within each file."""
    if len(files) == 1:
        return problems
    out = []
    for p in problems:
        if not p.rows:
            out.append(p)
            continue
        rows = np.asarray(p.rows)
        which = np.searchsorted(starts, rows, side="right") - 1
        for i in np.unique(which):
            out.append(Problem(p.level, names[files[i]], p.column, (rows[which == i] - starts[i]).tolist(), p.message))
    return out


PLAN_COLUMNS = [*REQUIRED, "group"]


def vector_widths(path: str | Path) -> dict[str, int]:
    """Floats per row of each list<number> column of a Parquet file or folder (a feature cache's
    columns), from its schema (fixed-size lists) or its first non-null row (lists)."""
    source, widths = storage.parquet_dataset(str(path)), {}
    for f in source.schema:
        if f.name in REQUIRED or f.name in RESERVED or not _is_numeric_list(f.type):
            continue
        if pa.types.is_fixed_size_list(f.type):
            widths[f.name] = f.type.list_size
        else:
            first = first_valid(parquet_files(path), f.name)
            widths[f.name] = len(first[0]) if len(first) else 0
    return widths


def plan_data(path: str | Path) -> MultiModalData:
    """A feature cache entry with only the columns a plan reads in its table; the modalities come
    from its manifest, and no feature is read."""
    source = storage.parquet_dataset(str(path))
    table = source.to_table(columns=[c for c in PLAN_COLUMNS if c in source.schema.names])
    return encoded_data(str(path), table, read_manifest(path)["modalities"])


def encoded_data(path: str, table: pa.Table, encoded: dict, nullable: list[str] = ()) -> MultiModalData:
    """A feature cache entry's data, its modalities as its manifest gives them."""
    return MultiModalData(path, table, {m: e["kind"] for m, e in encoded.items()},
                          {m: e["dim"] for m, e in encoded.items()}, {m: e["tokens"] for m, e in encoded.items()},
                          list(nullable))


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
