"""Where a sequence's time goes: `python benchmarks/sequence_timing.py [key=value ...]`.

Runs one sequence (embedded defaults plus the overrides) and prints, per task, the seconds spent
in the training loop (the workers' own clock) against the wall time of the whole task (fit
start-up, evaluation, MLflow), then the totals and the accuracy summary.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.driver import run_sequence


def main(overrides: list[str]) -> None:
    out = tempfile.mkdtemp(prefix="mmcl-bench-")
    cfg = load_config(None, [f"output_dir={out}", *overrides])
    marks = [time.time()]
    result = run_sequence(cfg, log=lambda *_: None, on_task_end=lambda _: marks.append(time.time()))
    state = json.loads(next(Path(out).glob("*/state.json")).read_text())
    print(f"config overrides: {' '.join(overrides) or '(defaults)'}")
    print("task  train_loop_s  task_wall_s")
    loop_total = 0.0
    for t, (a, b) in zip(state["tasks"], zip(marks, marks[1:])):
        loop = t["history"][-1]["seconds"]
        loop_total += loop
        print(f"{t['index']:>4}  {loop:>12.1f}  {b - a:>11.1f}")
    print(f"total wall {result['seconds']:.1f}s, in training loops {loop_total:.1f}s "
          f"({loop_total / result['seconds']:.0%}); avg_acc {result['avg_acc']:.3f}, "
          f"forgetting {result['forgetting']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
