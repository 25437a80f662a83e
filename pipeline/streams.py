"""The rows a sequence trains on, as Ray Data streams over the training source (a feature cache
folder, or a data file of vectors): one stream of each task's train rows and one of every val and
test row, which Ray Train splits across its workers (`StreamSplits`). When every row the sequence
reads fits `train.hold_mb`, they are instead one stream that each worker reads whole, once, and
keeps (pipeline/worker.py). The local executor reads the same streams in its own process. The
driver builds them from the plan and never reads a row."""
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from models.holdout import held_out_groups
from pipeline import storage
from ray.train import DataConfig

EVAL = "eval"
ROWS = "rows"  # the one stream of a held sequence
DROP = "drop"  # `mmcl update`'s chains: each row's drop (its task), from the file it was read from
READ_ROWS = 4096  # rows a read task holds at once


def train_stream(t: int) -> str:
    return f"train-{t}"


def on_this_node(path: str) -> dict:
    """The Ray Data placement of tasks that read or write `path` (`label_selector`): a local path is
    read and written on this process's node (a cluster's nodes may share no disk; blocks reach the
    others through the object store); a URI (s3://, gs://, ...) from any node."""
    import ray

    if all("://" in str(p) for p in (path if isinstance(path, list) else [path])):
        return {}
    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def select_rows(batch: pa.Table, splits: list[str], column: str | None, values: list, val_ids: pa.Array) -> pa.Table:
    """The batch's rows in `splits` (the plan's splits: rows held out for validation are 'val') whose
    `column` is one of `values` (every row when `column` is None), with `holdout`: the rows that
    choose the analytic heads' ridge strength, whole groups (`group`, else `sample_id`) at a time."""
    split = batch["split"]
    if len(val_ids):
        ids = val_ids.cast(batch.schema.field("sample_id").type)
        split = pc.if_else(pc.is_in(batch["sample_id"], value_set=ids), "val", split)
    keep = pc.is_in(split, value_set=pa.array(splits))
    if column is not None:
        keep = pc.and_(keep, pc.is_in(batch[column], value_set=pa.array(values, batch.schema.field(column).type)))
    rows = batch.drop_columns(["split"]).append_column("split", split).filter(keep)
    key = "group" if "group" in rows.column_names else "sample_id"
    holdout = held_out_groups(rows[key].to_numpy(zero_copy_only=False))
    dropped = [c for c in ("sample_id", "group") if c in rows.column_names]
    return rows.drop_columns(dropped).append_column("holdout", pa.array(holdout))


def may_hold(parts: list[dict], wanted: dict[str, list], metadata: dict | None = None) -> list[dict]:
    """The parts (row groups) whose Parquet statistics allow a row with each `wanted` column among
    its values: a task of data sorted or partitioned by class reads only its own row groups.
    `metadata`: file -> its Parquet metadata, filled as files are opened (shared by callers)."""
    metadata, kept = {} if metadata is None else metadata, []
    for p in parts:
        meta = metadata.setdefault(p["file"], storage.parquet_file(p["file"]).metadata)
        group, names = meta.row_group(p["row_group"]), meta.schema.names
        for column, values in wanted.items():
            stats = group.column(names.index(column)).statistics if column in names else None
            if stats is not None and stats.has_min_max and not any(
                    stats.min <= type(stats.min)(v) <= stats.max for v in values):
                break
        else:
            kept.append(p)
    return kept or parts[:1]  # a stream of no rows still has a schema


def held(plan: dict) -> bool:
    """Whether every train, val and test row fits `train.hold_mb` in a worker's memory (0: never)."""
    data, limit = plan["data"], plan["train"]["hold_mb"] * 2**20
    return limit > 0 and (data["train_rows"] + data["eval_rows"]) * data["row_bytes"] <= limit


def stream_names(plan: dict) -> list[str]:
    if held(plan):
        return [ROWS]
    return [train_stream(t["index"]) for t in plan["tasks"][plan["first_task"]:]] + [EVAL]


def read_parts(parts: dict, columns: list[str], types: dict | None = None, **select) -> Iterator[pa.Table]:
    """Ray Data: the selected rows of some row groups, READ_ROWS at a time. A chain's drops
    (`DROP`) may store a modality as a list in one file and a fixed-size list in another: `types`
    casts each to the first drop's type."""
    drops = parts.get(DROP, [None] * len(parts["file"]))
    for file, group, drop in zip(parts["file"], parts["row_group"], drops):
        for batch in storage.parquet_file(file).iter_batches(READ_ROWS, row_groups=[int(group)], columns=columns):
            table = pa.Table.from_batches([batch])
            if drop is not None:
                table = table.append_column(DROP, pa.array(np.full(table.num_rows, int(drop))))
                for m, kind in (types or {}).items():
                    if table.schema.field(m).type != kind:
                        table = table.set_column(table.schema.get_field_index(m), m, table[m].cast(kind))
            yield select_rows(table, **select)


class Stream:
    """Some row groups, what a stream selects of them and where they are read (`placement`, Ray Data
    task options). Its Ray Data dataset is made on first use; a whole pass (the held rows' one read)
    is read straight from the files instead, part by part in the stream's order, with no Ray Data job:
    by the local executor (which then starts no Ray at all), and by a Train worker on a node that can
    read the files."""

    def __init__(self, parts: list[dict], select: dict, placement: dict, read_tasks: int):
        self.parts, self.select, self.placement, self.read_tasks = parts, select, placement, read_tasks
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            import ray.data

            # No CPU reserved: by default the Train workers hold every CPU, and a read that waited for
            # one would wait for ever. Reading and filtering Parquet is light beside a training step. With
            # no CPU to bound them, the read tasks are bounded by count: unbounded, Ray Data ran one (and
            # started one worker process, ~0.2 GiB) per row group in flight, 71 at 1M rows (BENCHMARKS.md).
            self._dataset = ray.data.from_items(self.parts, override_num_blocks=len(self.parts)).map_batches(
                read_parts, fn_kwargs=self.select, batch_size=1, batch_format="numpy", num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=self.read_tasks), **self.placement)
            self._dataset.context.execution_options.preserve_order = True  # one worker reads the source's order
        return self._dataset

    def readable_on(self, node: str | None) -> bool:
        """Whether a process on `node` (None: this process's) can read the files straight: a URI
        from any node, a local path from the node that planned the stream."""
        mine = self.placement.get("label_selector", {}).get("ray.io/node-id")
        return None in (mine, node) or node == mine

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **kwargs):
        if batch_size is not None:
            yield from self.dataset.iter_batches(batch_size=batch_size, batch_format=batch_format, **kwargs)
            return
        for p in self.parts:
            yield from read_parts({k: [v] for k, v in p.items()}, **self.select)


def sequence_streams(plan: dict) -> dict[str, Stream]:
    """Stream name -> Stream, for the tasks from `plan['first_task']` on, and the eval stream (a held
    sequence: the one stream of every row). A train stream reads the row groups that may hold its
    rows, in a seeded order, so that data sorted by class reaches every worker mixed."""
    import ray

    from pipeline.data import parquet_parts

    data = plan["data"]
    parts = parquet_parts(data["path"])
    for p in parts if "drop_of_file" in data else ():
        p[DROP] = data["drop_of_file"][p["file"]]
    metadata = {parts[0]["file"]: storage.parquet_file(parts[0]["file"]).metadata}  # each footer read once
    first = metadata[parts[0]["file"]].schema.to_arrow_schema()
    grouped = "group" in first.names
    columns = ["sample_id", *(["group"] if grouped else []), "label", "domain", "split", *plan["spec"]["modalities"]]
    val_ids = pa.array(data["val_ids"], pa.string())
    types = {m: first.field(m).type for m in plan["spec"]["modalities"]} if "drop_of_file" in data else None
    placement = on_this_node(data["path"]) if ray.is_initialized() else {}  # no Ray: read in this process

    def stream(parts, splits, column=None, values=()):
        select = {"columns": columns, "types": types, "splits": splits, "column": column, "values": list(values),
                  "val_ids": val_ids}
        return Stream(parts, select, placement, plan["train"]["read_tasks"])

    def train(task):
        column, values = task["train"]
        mine = [p for p in parts if p[DROP] in values] if column == DROP else parts
        mine = may_hold(mine, {"split": ["train"], column: values}, metadata)
        order = np.random.default_rng([plan["seed"], task["index"]]).permutation(len(mine))
        return stream([mine[i] for i in order], ["train"], column, values)

    def evaluated():  # rows held out for validation are train rows by the source's split column
        return stream(parts if len(val_ids) else may_hold(parts, {"split": data["eval_splits"]}, metadata),
                      data["eval_splits"])

    if held(plan):
        return {ROWS: stream(parts, ["train", *data["eval_splits"]])}
    tasks = {train_stream(t["index"]): t for t in plan["tasks"]}
    return {name: train(tasks[name]) if name != EVAL else evaluated() for name in stream_names(plan)}


class StreamSplits(DataConfig):
    """Every stream split across the workers, in order: train streams into equal shares (every worker
    takes the same number of optimizer steps; up to world-1 rows of a pass are left out), the eval
    stream into unequal ones so that every row is predicted once. The held sequence's one stream
    (`held_rows`, a Stream) reaches every worker whole, with no coordinator between them: read straight
    from the files by a worker on a node that can read them, else through its dataset."""

    def __init__(self, held_rows: Stream | None = None):
        super().__init__()
        self.held_rows = None if held_rows is None else Stream(  # a copy without its dataset
            held_rows.parts, held_rows.select, held_rows.placement, held_rows.read_tasks)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        nodes = worker_node_ids or [None] * world_size  # None: this process's node
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            ds.context.execution_options.preserve_order = True
            if name == ROWS:
                rows = self.held_rows
                splits = [rows if rows and rows.readable_on(node) else ds.iterator() for node in nodes]
            else:
                splits = ds.streaming_split(world_size, equal=name != EVAL, locality_hints=worker_node_ids)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output


def row_bytes(modalities: dict[str, int], tokens: dict[str, int]) -> int:
    """Bytes of one row as a worker holds it (float32 features, a label and a present flag each)."""
    return sum(4 * d * tokens.get(m, 1) + 1 for m, d in modalities.items()) + 8


def chosen(split: np.ndarray, columns: dict[str, np.ndarray], splits: list[str], column=None, values=()) -> np.ndarray:
    """The rows (a mask) in `splits` whose `column` is one of `values` (every row when `column` is None)."""
    keep = np.isin(split, splits)
    return keep & np.isin(columns[column], values) if column is not None else keep
