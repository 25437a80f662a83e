"""Frozen-feature cache: each (encoders, data) pair is encoded once by a Ray Data actor pool.

A cache entry is a folder of Parquet files in the project's schema, each modality column holding
its encoder's tokens back to back (float32, tokens x dim), named by a key over the data's
fingerprint and every encoder's identity. It is built under a temporary name, its manifest is
written last and the folder renamed into place, so a half-written entry is never read.
"""
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import FEATURES_MANIFEST, REQUIRED, DataError, MultiModalData, read_manifest


class EncodeBatch:
    """Ray Data actor: holds the encoders, turns a batch of raw modalities into feature tokens."""

    def __init__(self, specs: dict[str, str], tokens: int, threads: int, nullable: list[str]):
        import torch

        from models.encoders import create_encoder
        torch.set_num_threads(threads)
        self.encoders = {col: create_encoder(spec, tokens) for col, spec in specs.items()}
        self.nullable = set(nullable)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = {c: batch[c] for c in [*REQUIRED, "group"] if c in batch.column_names}
        rates = batch["sample_rate"].to_pylist() if "sample_rate" in batch.column_names else None
        for col in batch.column_names:
            if col in out or col == "sample_rate":
                continue
            if col not in self.encoders:  # a vector: passes through as one token
                values = batch[col].to_pylist()
                dim = next((len(v) for v in values if v is not None), 0)
                out[col] = _vectors([None if v is None else np.asarray(v, np.float32) for v in values], dim,
                                    col in self.nullable)
                continue
            encoder = self.encoders[col]
            values = batch[col].to_pylist()
            present = [i for i, v in enumerate(values) if v is not None]
            unique = {}  # encode each distinct value once (paired data sets repeat them)
            for i in present:
                unique.setdefault(_hashable(values[i]), i)
            firsts = list(unique.values())
            kwargs = {"sample_rates": [rates[i] for i in firsts]} if encoder.kind == "audio" and rates else {}
            encoded = encoder.encode([values[i] for i in firsts], **kwargs) if firsts else []
            by_value = {k: e.reshape(-1) for k, e in zip(unique, encoded)}
            rows = [by_value[_hashable(v)] if v is not None else None for v in values]
            out[col] = _vectors(rows, encoder.tokens * (encoder.dim or 0), col in self.nullable)
        return pa.table(out)


def _hashable(value):
    if isinstance(value, (bytes, str)):
        return value
    array = np.asarray(value, dtype=np.float32)  # samples, or a series' steps x channels
    return array.shape, array.tobytes()


def _width(column) -> int:
    """Floats per row of an encoded column (its encoder's tokens x dim)."""
    return len(column.drop_null()[0])


def _vectors(rows: list, width: int, nullable: bool) -> pa.Array:
    """Fixed-size lists (read back as 2-D arrays), or plain lists for a column with nulls: Parquet
    does not read back fixed-size lists with nulls (pyarrow 25)."""
    if nullable:
        return pa.array([None if r is None else r.astype(np.float32) for r in rows], type=pa.list_(pa.float32()))
    flat = np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def encoder_specs(data: MultiModalData, chosen: dict[str, str]) -> dict[str, str]:
    """Modality column -> encoder spec: the config's choice, else the default for the column's kind."""
    from models.encoders import DEFAULTS, encoder_kind

    unknown = set(chosen) - set(data.kinds)
    if unknown:
        raise DataError(f"encoders given for columns not in {data.path}: {', '.join(sorted(unknown))}")
    specs = {}
    for col, kind in data.kinds.items():
        if kind == "vector":
            continue
        spec = chosen.get(col, DEFAULTS[kind])
        if encoder_kind(spec) != kind:
            raise DataError(f"{data.path}, column '{col}': encoder '{spec}' is for {encoder_kind(spec)}, "
                            f"the column holds {kind}")
        specs[col] = spec
    return specs


def cache_key(data_fingerprint: str, specs: dict[str, str], tokens: int) -> tuple[str, dict]:
    """The entry's key and the encoders' identities."""
    from models.encoders import encoder_identity

    identities = {col: {"spec": spec, **encoder_identity(spec, tokens)} for col, spec in specs.items()}
    blob = json.dumps({"data": data_fingerprint, "encoders": identities}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], identities


def entry_folder(cache_dir: Path, data_path: str, key: str) -> Path:
    return Path(cache_dir) / f"{Path(data_path).stem}-{key}"


def build_features(data: MultiModalData, data_fingerprint: str, chosen: dict[str, str], tokens: int,
                   cache_dir: str | Path, actors: int = 0, batch_size: int = 32, log=print) -> Path:
    """The cache folder for `data` under its encoders, encoding it first if no complete entry exists."""
    import ray
    import ray.data

    specs = encoder_specs(data, chosen)
    key, identities = cache_key(data_fingerprint, specs, tokens)
    folder = entry_folder(cache_dir, data.path, key)
    if read_manifest(folder):
        log(f"Features: cache hit {folder}")
        return folder
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = actors or max(1, cpus // 2)
    tmp = Path(cache_dir) / f".building-{folder.name}-{uuid.uuid4().hex[:8]}"
    log(f"Features: encoding {data.table.num_rows} rows ({', '.join(f'{c}: {s}' for c, s in specs.items())}) "
        f"with {actors} actor(s) into {folder}")
    started = time.time()
    options = ray.data.DataContext.get_current().execution_options
    ordered, options.preserve_order = options.preserve_order, True  # the features in the data file's row order
    try:
        blocks = max(4 * actors, data.table.num_rows // (8 * batch_size) or 1)  # the table is one block: spread it
        # The rows go out from the driver and the features come back to it, so that only the driver's
        # node needs the data file and the cache folder: a cluster's nodes share no disk.
        ds = ray.data.from_arrow(data.table).repartition(min(blocks, data.table.num_rows)).map_batches(
            EncodeBatch, fn_constructor_kwargs={"specs": specs, "tokens": tokens, "threads": 1, "nullable": [
                c for c in data.kinds if data.table[c].null_count]},
            batch_size=batch_size, batch_format="pyarrow", concurrency=actors, num_cpus=1)
        tmp.mkdir(parents=True)
        writer, widths = None, {}
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer = writer or pq.ParquetWriter(tmp / "features.parquet", batch.schema)
            writer.write_table(batch)
            widths.update({c: _width(batch[c]) for c in specs if c not in widths and batch[c].null_count < len(batch)})
        writer.close()
        modalities = {c: {"kind": "vector", "dim": len(data.table[c].drop_null()[0]), "tokens": 1}
                      for c, k in data.kinds.items() if k == "vector"}
        modalities.update({c: {"kind": data.kinds[c], "dim": widths.get(c, 0) // tokens, "tokens": tokens,
                               "encoder": identities[c]} for c, s in specs.items()})
        manifest = {"key": key, "source": str(Path(data.path).resolve()), "source_fingerprint": data_fingerprint,
                    "rows": data.table.num_rows, "modalities": modalities, "seconds": round(time.time() - started, 1),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / FEATURES_MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:  # another build finished first; its entry is as good as ours
            if not read_manifest(folder):
                raise
    finally:
        options.preserve_order = ordered
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Features: {data.table.num_rows} rows encoded in {time.time() - started:.0f}s")
    return folder


def list_entries(cache_dir: str | Path) -> list[dict]:
    """Complete entries (with their manifests) and unfinished builds (manifest None)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    out = []
    for folder in sorted(cache_dir.iterdir()):
        if folder.is_dir():
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            out.append({"folder": str(folder), "manifest": read_manifest(folder), "bytes": size})
    return out


def clear_entries(cache_dir: str | Path, keys: list[str] = ()) -> list[str]:
    """Removes the entries whose folder name or key matches one of `keys` (all when empty)."""
    removed = []
    for entry in list_entries(cache_dir):
        name = Path(entry["folder"]).name
        if not keys or any(k in name for k in keys):
            shutil.rmtree(entry["folder"])
            removed.append(entry["folder"])
    return removed
