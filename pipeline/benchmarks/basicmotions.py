"""basicmotions: a smart watch's accelerometer and gyroscope (UEA BasicMotions, 4 activities, 80 series)."""
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import DataError, save_table

FILES = ("BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts")
SENSORS = {"accelerometer": slice(0, 3), "gyroscope": slice(3, 6)}  # the file's six dimensions, in order


def basicmotions_folder(explicit: str | Path | None = None) -> Path:
    """The folder with the two .ts files: given, else the copy the `aeon` package ships."""
    candidates = [Path(explicit)] if explicit else []
    if not explicit:
        spec = importlib.util.find_spec("aeon")  # its data folder only: importing aeon pulls numba
        if spec is not None:
            candidates.append(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "BasicMotions")
    for folder in candidates:
        if all((folder / f).is_file() for f in FILES):
            return folder
    raise DataError(f"BasicMotions not found (looked in {', '.join(map(str, candidates)) or 'no folder'}). "
                    "`pip install --no-deps aeon==1.6.0` ships it, or point --source at a folder with "
                    f"{' and '.join(FILES)} from the UEA/UCR archive.")


def read_ts(path: Path) -> tuple[list[np.ndarray], list[str], list[str]]:
    """A .ts file (sktime/aeon format) -> (series as steps x dimensions, labels, the declared labels)."""
    series, labels, declared, in_data = [], [], [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.lower().startswith("@classlabel"):
                declared = line.split()[2:]
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        try:
            values = [[float("nan") if v == "?" else float(v) for v in d.split(",")] for d in dims]
        except ValueError as e:
            raise DataError(f"{path}, line {n}: {e}") from None
        if len({len(v) for v in values}) != 1:
            raise DataError(f"{path}, line {n}: dimensions of different lengths")
        series.append(np.asarray(values, dtype=np.float32).T)
        labels.append(label.strip())
    if not series:
        raise DataError(f"{path}: no series after @data")
    return series, labels, declared or sorted(set(labels))


def build_basicmotions(out: Path, source: str | Path | None = None) -> Path:
    """One row per recording: `accelerometer` and `gyroscope` timeseries (100 steps x 3 axes, 10 Hz),
    the archive's train/test split, one domain."""
    folder = basicmotions_folder(source)
    rows = {k: [] for k in ("sample_id", "label", "label_name", "domain", "split", *SENSORS)}
    names = None
    for split, name in zip(("train", "test"), FILES):
        series, labels, declared = read_ts(folder / name)
        names = names or declared
        for i, (x, label) in enumerate(zip(series, labels)):
            if label not in names:
                raise DataError(f"{folder / name}: series {i} has label '{label}', not one of {names}")
            rows["sample_id"].append(f"{split}-{i}")
            rows["label"].append(names.index(label))
            rows["label_name"].append(label)
            rows["domain"].append("basicmotions")
            rows["split"].append(split)
            for sensor, dims in SENSORS.items():
                rows[sensor].append(x[:, dims].tolist())
    series_type = pa.list_(pa.list_(pa.float32()))
    table = pa.table({k: pa.array(v, type=series_type if k in SENSORS else None) for k, v in rows.items()})
    return save_table(table, out, names)


BENCHMARKS = {"basicmotions": build_basicmotions}
