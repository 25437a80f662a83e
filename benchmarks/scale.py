"""Memory and speed as the data grows: `python benchmarks/scale.py [--rows 20000 100000 ...]`.

Per size: a synthetic table in the shape of a feature cache (10 classes, vector modalities of 1,280
and 512 floats, 80% train, a Parquet folder of 8 files) is written under --out, then
`mmcl run --data DIR --tasks 2 train.epochs=2 tracking.enabled=false` runs on it (default two
workers) while the whole process tree is sampled every second. Reported: wall time, peak PSS of
the tree, peak RSS of the driver and of the largest Ray Train worker and their peak USS (private
memory: a worker's RSS also counts the object-store pages it has read blocks from), time to the
first training step, object-store spill (from the raylet's state dumps), and training rows/s in
the second epoch (after warm-up). Tables go to results/scale.md (results/scale-png.md with
`--media png`).

`--media png`: the raw-media case. Each row is one PNG (scikit-learn's 1,797 real 8x8 digits,
scaled to 32x32, shifted and noised per row, so no two rows are alike) with its digit as label; the
run encodes them through the encoder actor pool into a fresh feature cache before training, and
the encoding's time is reported.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"a": 1280, "b": 512}
CLASSES, FILES, CHUNK = 10, 8, 8192


def write_folder(folder: Path, rows: int, chunk) -> None:
    """FILES Parquet files of `rows` rows, written chunk by chunk (never whole in memory);
    `chunk(n)`: the label, split and modality columns of n rows."""
    if (folder / "_done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // FILES)
    for f in range(FILES):
        lo, hi = f * per_file, min(rows, (f + 1) * per_file)
        writer = None
        for start in range(lo, hi, CHUNK):
            n = min(CHUNK, hi - start)
            cols = chunk(n)
            table = pa.table({"sample_id": pa.array([f"s{i}" for i in range(start, start + n)]), **cols,
                              "label_name": pa.array([f"class{c}" for c in cols["label"].to_pylist()]),
                              "domain": pa.array(["d0"] * n)})
            writer = writer or pq.ParquetWriter(folder / f"part-{f}.parquet", table.schema)
            writer.write_table(table)
        writer.close()
    (folder / "_done").write_text("")


def write_table(folder: Path, rows: int, seed: int = 0) -> None:
    """The synthetic folder in the shape of a feature cache."""
    rng = np.random.default_rng(seed)
    means = {m: rng.normal(size=(CLASSES, w)).astype(np.float32) for m, w in WIDTHS.items()}

    def chunk(n: int) -> dict:
        labels = rng.integers(0, CLASSES, n)
        cols = {"label": pa.array(labels), "split": pa.array(np.where(rng.random(n) < 0.8, "train", "test"))}
        for m, w in WIDTHS.items():
            x = means[m][labels] * 0.3 + rng.normal(size=(n, w)).astype(np.float32)
            cols[m] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), w)
        return cols

    write_folder(folder, rows, chunk)


def write_png_table(folder: Path, rows: int, seed: int = 0) -> None:
    """The raw-media folder: real digit images as PNG."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((4, 4)))  # 32x32
    rng = np.random.default_rng(seed)

    def chunk(n: int) -> dict:
        pick, pngs = rng.integers(0, len(images), n), []
        for i, shift in zip(pick, rng.integers(-3, 4, (n, 2))):
            x = np.roll(images[i], tuple(shift), (0, 1)) + rng.normal(0, 0.1, (32, 32))
            buf = io.BytesIO()
            Image.fromarray((x.clip(0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return {"label": pa.array(digits.target[pick]),
                "split": pa.array(np.where(rng.random(n) < 0.8, "train", "test")), "image": pa.array(pngs, pa.binary())}

    write_folder(folder, rows, chunk)


class TreeSampler(threading.Thread):
    """Peak memory of a process and all its descendants, sampled every second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.stop = psutil.Process(pid), threading.Event()
        self.peak = {"tree_pss": 0, "driver_rss": 0, "worker_rss": 0, "driver_uss": 0, "worker_uss": 0}

    def run(self):
        while not self.stop.wait(1.0):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            pss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    pss += info.pss
                    who = "driver" if p.pid == self.root.pid else "worker" if "RayTrainWorker" in " ".join(
                        p.cmdline()) else None
                    if who:
                        self.peak[f"{who}_rss"] = max(self.peak[f"{who}_rss"], info.rss)
                        self.peak[f"{who}_uss"] = max(self.peak[f"{who}_uss"], info.uss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak["tree_pss"] = max(self.peak["tree_pss"], pss)


def spilled(driver_pid: int) -> dict:
    """Object-store spill of the local Ray the run's driver started, from its raylet's state dumps
    (every few seconds in RAY_TMPDIR, default /tmp/ray): spill requests, and the most bytes spilled
    at once."""
    tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray"))
    logs = sorted(tmp.glob(f"session_*_{driver_pid}/logs/raylet.out"))
    text = logs[-1].read_text(errors="replace") if logs else ""
    requests = [int(n) for n in re.findall(r"cumulative spill requests: (\d+)", text)]
    held = [int(n) for n in re.findall(r"num bytes currently spilled: (\d+)", text)]
    return {"spill_requests": max(requests, default=None), "spilled_gib": round(max(held, default=0) / 2**30, 2)}


def measure(folder: Path, out: Path, rows: int, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--data", str(folder), "--tasks", "2", "--force",
           "train.epochs=2", "tracking.enabled=false", f"output_dir={out}", *args]
    start, lines = time.time(), []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sampler = TreeSampler(proc.pid)
    sampler.start()
    for line in proc.stdout:
        lines.append((time.time() - start, line.rstrip()))
    rc, wall = proc.wait(), time.time() - start
    sampler.stop.set()
    sampler.join()
    if rc:
        raise RuntimeError("\n".join(text for _, text in lines[-20:]))
    epoch = re.compile(r"task (\d+)/\d+ epoch (\d+)/\d+ .* (\d+)s$")
    seconds = {(int(m[1]), int(m[2])): (t, float(m[3])) for t, text in lines if (m := epoch.search(text))}
    encoded = [float(m[1]) for _, text in lines if (m := re.search(r"Features: \d+ rows encoded in (\d+)s", text))]
    first_step = seconds[(1, 1)][0] - seconds[(1, 1)][1]
    train_rows = 0.8 * rows / 2  # each task: half the classes' train rows
    second = seconds[(1, 2)][1] - seconds[(1, 1)][1]
    gib = 2**30
    return {"rows": rows, "parquet_gib": round(sum(f.stat().st_size for f in folder.glob("*.parquet")) / gib, 2),
            "wall_s": round(wall), "tree_pss_gib": round(sampler.peak["tree_pss"] / gib, 2),
            **{f"{k}_gib": round(sampler.peak[k] / gib, 2) for k in ("driver_rss", "worker_rss", "driver_uss",
                                                                     "worker_uss")},
            "first_step_s": round(first_step), **({"encode_s": encoded[0]} if encoded else {}), **spilled(proc.pid),
            "rows_per_s": round(train_rows / max(second, 1))}


def table(results: list[dict]) -> str:
    encoded = any("encode_s" in r for r in results)
    head = ("| rows | Parquet GiB | wall s | " + ("encoding s | " if encoded else "") + "peak PSS, all processes GiB | "
            "driver peak RSS / USS GiB | largest worker peak RSS / USS GiB | object-store spill requests / peak GiB | "
            "first step s | epoch-2 rows/s |")
    body = [f"| {r['rows']:,} | {r['parquet_gib']} | {r['wall_s']} | " + (f"{r.get('encode_s', '-')} | " if encoded
                                                                          else "")
            + f"{r['tree_pss_gib']} | {r['driver_rss_gib']} / {r['driver_uss_gib']} | {r['worker_rss_gib']} / "
            f"{r['worker_uss_gib']} | {r['spill_requests']} / {r['spilled_gib']} | {r['first_step_s']} | "
            f"{r['rows_per_s']:,} |" for r in results]
    return "\n".join([head, "|---" * (10 if encoded else 9) + "|", *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000, 300_000])
    parser.add_argument("--out", default=str(ROOT / "runs" / "scale"))
    parser.add_argument("--media", choices=["png"], help="raw images through the encoder pool (see above)")
    parser.add_argument("overrides", nargs="*", help="extra `mmcl run` overrides, e.g. train.hold_mb=0")
    args = parser.parse_args()
    out, results = Path(args.out), []
    for rows in args.rows:
        folder = out / (f"png-{rows}" if args.media else f"data-{rows}")
        (write_png_table if args.media else write_table)(folder, rows)
        cache = [f"cache.dir={out / 'cache' / f'{rows}-{int(time.time())}'}"] if args.media else []  # encoded anew
        results.append(measure(folder, out / "runs", rows, [*cache, *args.overrides]))
        print(json.dumps(results[-1]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    media = f" --media {args.media}" if args.media else ""
    overrides = f" -- {' '.join(args.overrides)}" if args.overrides else ""
    text = (f"`python benchmarks/scale.py --rows {' '.join(map(str, args.rows))}{media} --out {args.out}{overrides}`"
            f" on {machine}\n\n{table(results)}\n")
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / f"scale{'-' + args.media if args.media else ''}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
