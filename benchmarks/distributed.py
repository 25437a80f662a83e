"""The Ray Train path against the in-process loop:
`python benchmarks/distributed.py [--repeats N] [--sections 1,2,3,4,5]`.

Each section's table is kept in results/distributed.json as it finishes (a rerun of some sections
keeps the others), and all of them are written to results/distributed.md and into BENCHMARKS.md
between the `distributed:begin/end` markers. Sections:
1. whole sequence: default `mmcl run` (mfeat) on Ray and with `executor=local`, alternating;
2. steady-state training throughput on a synthetic feature table (plain loop, 1 and 2 workers,
   ZeRO stages 0-2, bucket size and overlap_comm);
3. fixed costs: time to the first training step and what each task adds beyond its training loop;
4. growth: a 10-task sequence (one digit per task), time and the worker's memory per task;
5. communication: bytes all-reduced per step and a projection to 8 and 64 GPU workers.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
MMCL = [sys.executable, "-m", "pipeline.cli"]


def timed_run(args: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of `mmcl run ARGS` and its console lines with their arrival times."""
    start, lines = time.time(), []
    proc = subprocess.Popen([*MMCL, "run", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        lines.append((time.time() - start, line.rstrip()))
    if proc.wait():
        raise RuntimeError("\n".join(text for _, text in lines[-20:]))
    return time.time() - start, lines


def fixed_costs(lines) -> dict:
    """From a run's console: seconds to the end of the first epoch minus that epoch, and per task
    the wall time between task ends minus its training loop."""
    epoch = re.compile(r"task (\d+)/\d+ epoch (\d+)/(\d+) .* (\d+)s$")
    ends, loops, first = [], {}, None
    for t, text in lines:
        m = epoch.search(text)
        if m:
            loops[int(m[1])] = float(m[4])
            if first is None:
                first = t - float(m[4])
        if "accuracy on tasks seen so far" in text:
            ends.append(t)
    rest = [round(b - a - loops[i + 2], 1) for i, (a, b) in enumerate(zip(ends, ends[1:]))]
    return {"first_step_s": round(first, 1), "task_remainder_s": rest, "loops_s": [loops[k] for k in sorted(loops)]}


def whole_sequence(repeats: int, out: Path) -> tuple[str, dict]:
    times, costs = {"ray": [], "local": []}, []
    for r in range(repeats):
        for executor in ("ray", "local"):
            seconds, lines = timed_run([f"executor={executor}", f"output_dir={out / f'{executor}-{r}'}"])
            times[executor].append(seconds)
            if executor == "ray":
                costs.append(fixed_costs(lines))
    ratios = [a / b for a, b in zip(times["ray"], times["local"])]
    table = ["| | Ray Train + DeepSpeed (default) | in-process loop (`executor=local`) | ratio |", "|---|---|---|---|"]
    for r, (a, b) in enumerate(zip(times["ray"], times["local"])):
        table.append(f"| repeat {r + 1} | {a:.0f} s | {b:.0f} s | {a / b:.2f}x |")
    table.append(f"| median | {statistics.median(times['ray']):.0f} s | {statistics.median(times['local']):.0f} s "
                 f"| {statistics.median(ratios):.2f}x |")
    return "\n".join(table), {"times": times, "costs": costs}


def synthetic_table(path: Path, rows: int, dims=(256, 128), classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    cols = {"sample_id": [str(i) for i in range(rows)], "label": labels, "label_name": labels.astype(str),
            "domain": ["d"] * rows,
            "split": np.where(np.arange(rows) % 20 == 0, "test", "train")}
    for i, d in enumerate(dims):
        centres = rng.normal(0, 1, (classes, d)).astype(np.float32)
        x = centres[labels] + rng.normal(0, 2, (rows, d)).astype(np.float32)
        cols[f"m{i}"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
    pq.write_table(pa.table(cols), path)
    return path


def throughput(settings: dict, data: Path, out: Path, epochs: int = 3) -> dict:
    """Samples per second after the first epoch, for each named list of overrides (one task)."""
    from pipeline.config import load_config
    from pipeline.driver import run_sequence

    rows = pq.read_table(data, columns=["split"])["split"].to_numpy()
    train_rows = int((rows == "train").sum())
    result = {}
    for name, overrides in settings.items():
        cfg = load_config(None, [f"data={data}", "num_tasks=1", f"train.epochs={epochs}", "tracking.enabled=false",
                                 f"output_dir={out / name}", *overrides])
        run_sequence(cfg, log=lambda *_: None)
        state = json.loads(next((out / name).glob("*/state.json")).read_text())
        history = state["tasks"][0]["history"]
        result[name] = train_rows * (epochs - 1) / (history[-1]["seconds"] - history[0]["seconds"])
    return result


def throughput_table(rates: dict, rows: int) -> str:
    """Each setting against the plain loop at the same CPUs, given the faster of its thread counts
    (one thread is faster than two on this adapter)."""
    plain = {1: rates["plain loop, 1 thread"], 2: max(rates["plain loop, 1 thread"], rates["plain loop, 2 threads"])}
    lines = [f"### 2. Steady-state training throughput (synthetic table, {rows:,} rows, 2 modalities of 256 and 128 "
             "features, cmoe, batch 32 per worker, epochs 2-3)", "",
             "| setting | CPUs | samples/s | vs the plain loop at the same CPUs |", "|---|---|---|---|"]
    for name, rate in rates.items():
        cpus = 2 if "2 threads" in name or "2 CPUs" in name or "2 workers" in name else 1
        lines.append(f"| {name} | {cpus} | {rate:.0f} | {rate / plain[cpus]:.2f}x |")
    return "\n".join(lines)


def growth(out: Path, method: str) -> list[dict]:
    """A 10-task mfeat sequence on Ray: per task, wall seconds, its training loop, and the worker's
    resident memory."""
    import psutil
    import ray
    from ray.util.state import list_actors

    from pipeline.config import load_config
    from pipeline.driver import run_sequence

    marks, rows, loop = [time.time()], [], {}
    epoch = re.compile(r"task \d+/\d+ epoch (\d+)/(\d+) .* (\d+)s$")

    def log(line: str) -> None:
        m = epoch.search(line)
        if m and m[1] == m[2]:
            loop["seconds"] = float(m[3])
        if "accuracy on tasks seen so far" in line:
            marks.append(time.time())
            pids = [a.pid for a in list_actors(  # this cluster's (another Ray may run here); the limit applies before filters
                ray.get_runtime_context().gcs_address, limit=10_000,
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
            rss = sum(psutil.Process(p).memory_info().rss for p in pids if psutil.pid_exists(p))
            peak = max(int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{p}/status").read_text())[1]) for p in pids)
            rows.append({"task": len(rows) + 1, "seconds": marks[-1] - marks[-2], "loop_s": loop.pop("seconds", 0.0),
                         "rss_mb": rss / 2**20, "peak_mb": peak / 1024})

    cfg = load_config(None, ["num_tasks=10", f"method={method}", "tracking.enabled=false", f"output_dir={out}"])
    run_sequence(cfg, log=log)
    return rows


def communication(step_s: float) -> str:
    """ZeRO 0 all-reduces every trainable gradient once per step (fp32): ring all-reduce moves
    2 (N-1)/N of it through each worker's link."""
    from models.methods import create_model
    from pipeline.config import load_config

    cfg = load_config(None, [])
    model = create_model("cmoe", {f"m{i}": d for i, d in enumerate((76, 216, 64, 240, 47, 6))}, 0, vars(cfg.model))
    model.begin_task(2)
    params = sum(p.numel() for p in model.trainable_parameters())
    size = params * 4
    link = 100e9 / 8  # bytes per second
    lines = [f"Trainable adapter on mfeat: {params:,} parameters, {size / 2**20:.2f} MiB of fp32 gradients "
             f"all-reduced per step. Measured compute per step (one worker, batch 32): {step_s * 1000:.1f} ms.", "",
             "| GPU workers | ring all-reduce per step at 100 Gb/s | + 2 (N-1) x 10 us latency | share of a step |",
             "|---|---|---|---|"]
    for n in (8, 64):
        transfer = 2 * (n - 1) / n * size / link
        latency = 2 * (n - 1) * 10e-6
        comm = transfer + latency
        lines.append(f"| {n} | {transfer * 1000:.2f} ms | {comm * 1000:.2f} ms | {comm / (comm + step_s):.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10000, help="rows of the synthetic throughput table")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run (3 comes with 1, 5 with 2)")
    args = parser.parse_args()
    wanted = set(args.sections.split(","))
    sys.path.insert(0, str(ROOT))
    out = Path(tempfile.mkdtemp(prefix="mmcl-distributed-"))
    saved_path = ROOT / "results" / "distributed.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    saved.setdefault("sections", {})
    saved["machine"] = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
                        f"command: `.venv/bin/python benchmarks/distributed.py` (defaults: --repeats 3, --rows 10000; "
                        f"sections last run {time.strftime('%Y-%m-%d')}).")

    def keep(section: str, text: str, **data) -> None:
        saved["sections"][section] = text
        saved.update(data)
        saved_path.write_text(json.dumps(saved, indent=1))

    if wanted & {"1", "3"}:
        table, whole = whole_sequence(args.repeats, out / "whole")
        keep("1", "\n".join(["### 1. Whole sequence (default `mmcl run`: mfeat, class-IL 5 x 2, 15 epochs)", "",
                             table]), whole=whole)
        lines = ["### 3. Fixed costs (the Ray runs of section 1)", "",
                 "| repeat | `mmcl run` to the first training step | per task after the first: wall minus training loop |",
                 "|---|---|---|"]
        lines += [f"| {r + 1} | {c['first_step_s']} s | {', '.join(f'{x} s' for x in c['task_remainder_s'])} |"
                  for r, c in enumerate(whole["costs"])]
        keep("3", "\n".join(lines))

    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    os.environ.setdefault("RAY_TMPDIR", str(out / "ray"))
    init_ray(load_config(), verbose=False)
    if wanted & {"2", "5"}:
        data = synthetic_table(out / "synthetic.parquet", args.rows)
        settings = {
            "plain loop, 2 threads": ["executor=local", "train.cpus_per_worker=2"],
            "1 worker x 2 CPUs": ["train.num_workers=1", "train.cpus_per_worker=2"],
            "plain loop, 1 thread": ["executor=local", "train.cpus_per_worker=1"],
            "1 worker x 1 CPU": ["train.num_workers=1", "train.cpus_per_worker=1"],
            "2 workers x 1 CPU, ZeRO 0 (default)": [],
            "2 workers x 1 CPU, ZeRO 1": ["train.num_workers=2", "train.cpus_per_worker=1", "train.zero_stage=1"],
            "2 workers x 1 CPU, ZeRO 2": ["train.num_workers=2", "train.cpus_per_worker=1", "train.zero_stage=2"],
            "2 workers x 1 CPU, ZeRO 2, overlap_comm": ["train.num_workers=2", "train.cpus_per_worker=1",
                                                        "train.zero_stage=2", "train.overlap_comm=true"],
            "2 workers x 1 CPU, ZeRO 2, 5e6 buckets": ["train.num_workers=2", "train.cpus_per_worker=1",
                                                       "train.zero_stage=2", "train.bucket_size=5000000"],
        }
        rates = throughput(settings, data, out / "throughput")
        keep("2", throughput_table(rates, args.rows), throughput=rates)
        keep("5", "\n".join(["### 5. Communication", "", communication(32 / rates["plain loop, 1 thread"])]))
    if "4" in wanted:
        grown = {m: growth(out / f"growth-{m}", m) for m in ("cmoe", "finetune")}
        lines = ["### 4. Growth (mfeat, 10 tasks of one digit, default settings)", "",
                 "| task | cmoe: wall s | cmoe: training loop s | cmoe: worker peak RSS MB | finetune: wall s "
                 "| finetune: training loop s | finetune: worker peak RSS MB |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {a['task']} | {a['seconds']:.1f} | {a['loop_s']:.0f} | {a['peak_mb']:.0f} | {b['seconds']:.1f} "
                  f"| {b['loop_s']:.0f} | {b['peak_mb']:.0f} |" for a, b in zip(grown["cmoe"], grown["finetune"])]
        keep("4", "\n".join(lines), growth=grown)

    text = "\n\n".join([saved["machine"], *(saved["sections"][k] for k in sorted(saved["sections"]))])
    (ROOT / "results" / "distributed.md").write_text(text + "\n")
    bench = ROOT / "BENCHMARKS.md"
    md = bench.read_text()
    begin, end = "<!-- distributed:begin -->", "<!-- distributed:end -->"
    if begin in md:
        bench.write_text(md[:md.index(begin) + len(begin)] + "\n" + text + "\n" + md[md.index(end):])
    print(text)


if __name__ == "__main__":
    main()
