"""Frozen-feature cache: each (encoders, data) pair is encoded once by a Ray Data actor pool.

A cache entry is a folder of Parquet files in the project's schema, each modality column holding
its encoder's tokens back to back (float32, tokens x dim), named by a key over the data's
fingerprint and every encoder's identity. It is built under a temporary name, its manifest is
written last and the folder renamed into place, so a half-written entry is never read.
"""
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.data import FEATURES_MANIFEST, REQUIRED, DataError, MultiModalData, read_manifest, vector_widths

FILE_ROWS = 16_384  # rows per file of a cache entry, at least (a write task's last file may hold fewer)


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


def entry_folder(cache_dir: str, data_path: str, key: str) -> str:
    return storage.join(cache_dir, f"{Path(storage.name(data_path)).stem}-{key}")


def build_features(data: MultiModalData, data_fingerprint: str, chosen: dict[str, str], tokens: int,
                   cache_dir: str, actors: int = 0, batch_size: int = 32, log=print) -> str:
    """The cache folder for `data` under its encoders, encoding it first if no complete entry exists.
    Ray Data reads the data file, the actor pool encodes, write tasks write the entry's files: no row
    passes through this process."""
    import ray
    import ray.data

    from pipeline.streams import on_this_node

    specs = encoder_specs(data, chosen)
    key, identities = cache_key(data_fingerprint, specs, tokens)
    folder = entry_folder(cache_dir, data.path, key)
    if read_manifest(folder):
        log(f"Features: cache hit {folder}")
        return folder
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = actors or max(1, cpus // 2)
    rows = data.table.num_rows
    tmp = storage.join(cache_dir, f".building-{storage.name(folder)}-{uuid.uuid4().hex[:8]}")
    log(f"Features: encoding {rows} rows ({', '.join(f'{c}: {s}' for c, s in specs.items())}) "
        f"with {actors} actor(s) into {folder}")
    started = time.time()
    try:
        # Blocks of a few batches, so that every actor has work and the stream keeps moving.
        block = max(1, min(8 * batch_size, -(-rows // (4 * actors))))
        ds = ray.data.read_parquet(data.path, file_extensions=["parquet"], **on_this_node(data.path)).repartition(
            target_num_rows_per_block=block).map_batches(
            EncodeBatch, fn_constructor_kwargs={"specs": specs, "tokens": tokens, "threads": 1,
                                                "nullable": data.nullable},
            batch_size=batch_size, batch_format="pyarrow", concurrency=actors, num_cpus=1)
        ds.context.execution_options.preserve_order = True  # the files in the data file's row order
        storage.make_dirs(tmp)
        ds.write_parquet(tmp, min_rows_per_file=FILE_ROWS, ray_remote_args=on_this_node(tmp))
        widths = vector_widths(tmp)
        modalities = {c: {"kind": "vector", "dim": data.modalities[c], "tokens": 1}
                      for c, k in data.kinds.items() if k == "vector"}
        modalities.update({c: {"kind": data.kinds[c], "dim": widths.get(c, 0) // tokens, "tokens": tokens,
                               "encoder": identities[c]} for c, s in specs.items()})
        source = data.path if storage.is_uri(data.path) else str(Path(data.path).resolve())
        manifest = {"key": key, "source": source, "source_fingerprint": data_fingerprint,
                    "rows": rows, "modalities": modalities, "seconds": round(time.time() - started, 1),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        publish(tmp, folder, json.dumps(manifest, indent=1))
    finally:
        storage.remove_tree(tmp)
    log(f"Features: {rows} rows encoded in {time.time() - started:.0f}s")
    return folder


def publish(tmp: str, folder: str, manifest: str) -> None:
    """Puts a built entry in place, its manifest last. A local folder is renamed (atomic); on object
    storage, which has no rename, its files move one by one under fixed names before the manifest.
    Another build that finished first wins: its entry is as good as ours."""
    if not storage.is_uri(folder):
        storage.write_text(storage.join(tmp, FEATURES_MANIFEST), manifest)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not read_manifest(folder):
                raise
        return
    if read_manifest(folder):
        return
    for i, (file, _) in enumerate(storage.files_under(tmp)):
        storage.move(file, storage.join(folder, f"part-{i:05d}.parquet"))
    storage.write_text(storage.join(folder, FEATURES_MANIFEST), manifest)


def list_entries(cache_dir: str | Path) -> list[dict]:
    """Complete entries (with their manifests) and unfinished builds (manifest None)."""
    out = []
    for folder in storage.folders_in(cache_dir):
        size = sum(size for _, size in storage.files_under(folder))
        out.append({"folder": folder, "manifest": read_manifest(folder), "bytes": size})
    return out


def clear_entries(cache_dir: str | Path, keys: list[str] = ()) -> list[str]:
    """Removes the entries whose folder name or key matches one of `keys` (all when empty)."""
    removed = []
    for entry in list_entries(cache_dir):
        if not keys or any(k in storage.name(entry["folder"]) for k in keys):
            storage.remove_tree(entry["folder"])
            removed.append(entry["folder"])
    return removed
