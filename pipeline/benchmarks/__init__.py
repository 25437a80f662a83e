"""Packaged benchmarks, built once into the project's Parquet schema (docs/data.md says how).

A benchmark is a file here with its builders, `build(out, source=None) -> out`, and one line in
BENCHMARKS. `source` is the folder of a data set the user downloaded (None: the builder's default
places); label names come from the table's `label_name` column.
"""
from pathlib import Path

from pipeline.benchmarks import av_digits, basicmotions, mfeat, tuxpaint
from pipeline.data import DataError

BENCHMARKS = {
    **mfeat.BENCHMARKS,
    **av_digits.BENCHMARKS,
    **basicmotions.BENCHMARKS,
    **tuxpaint.BENCHMARKS,
}


def benchmark_path(name: str, data_dir: str | Path) -> Path:
    """The benchmark's Parquet file, built on first use."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    out = Path(data_dir) / f"{name}.parquet"
    if not out.is_file():
        BENCHMARKS[name](out)
    return out
