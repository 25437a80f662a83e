"""`mmcl`: a thin face over the driver and the data tools."""
import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def _run(args) -> int:
    from pipeline.data import DataError
    from pipeline.driver import run_sequence
    from pipeline.evaluate import format_matrix
    from pipeline.tracking import ui_command

    overrides = list(args.overrides)
    for flag, key in (("benchmark", "benchmark"), ("data", "data"), ("scenario", "scenario"), ("tasks", "num_tasks"),
                      ("method", "method"), ("seed", "seed"), ("address", "ray_address")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = load_config(args.config, overrides)
        result = run_sequence(cfg, verbose=args.verbose)
    except (ConfigError, DataError) as e:
        print(f"mmcl: {e}", file=sys.stderr)
        return 2
    print(f"\nAccuracy matrix (row i: after task i; column j: task j's test rows)\n{format_matrix(result['acc_matrix'])}")
    print(f"average accuracy {result['avg_acc']:.4f}  average incremental accuracy {result['avg_inc_acc']:.4f}  "
          f"forgetting {result['forgetting']:.4f}  ({result['seconds']:.0f}s)")
    print(f"MLflow run {result['mlflow_run_id']}; browse with:\n  {ui_command(cfg)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _validate(args) -> int:
    from pipeline.data import DataError, read_parquet, validate_table

    try:
        table = read_parquet(args.path)
    except DataError as e:
        print(f"error: {e}")
        return 1
    problems = validate_table(table, args.path)
    for p in problems:
        print(p)
    errors = sum(p.level == "error" for p in problems)
    print(f"{args.path}: {table.num_rows} rows, {errors} error(s), {len(problems) - errors} warning(s)")
    return 1 if errors else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmcl", description="Multi-modal continual learning on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a continual-learning sequence")
    run.add_argument("--config", help="YAML config; embedded defaults otherwise")
    run.add_argument("--out", help="write the result JSON here")
    run.add_argument("--benchmark", help="packaged benchmark (default mfeat)")
    run.add_argument("--data", help="Parquet file or folder in the project's schema")
    run.add_argument("--scenario", choices=["class-il", "domain-il"])
    run.add_argument("--tasks", type=int, help="number of tasks")
    run.add_argument("--method")
    run.add_argument("--seed", type=int)
    run.add_argument("--address", help="Ray cluster address (default: a local Ray started on demand)")
    run.add_argument("--verbose", action="store_true", help="show Ray's and DeepSpeed's own logs")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=5 model.num_experts=8")
    run.set_defaults(func=_run)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    validate = data.add_parser("validate", help="check a Parquet file or folder against the schema")
    validate.add_argument("path")
    validate.set_defaults(func=_validate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
