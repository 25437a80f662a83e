"""`mmcl`: a thin face over the driver and the data tools."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.lock import FolderInUse


def _user_errors():
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError

    return ConfigError, DataError, FolderInUse, CheckpointError


def _fail(e, verbose: bool = False) -> int:
    """A user's error: one line (the traceback too with --verbose), exit status 2."""
    if verbose and isinstance(e, BaseException):
        traceback.print_exception(e)
    print(f"mmcl: {e}", file=sys.stderr)
    return 2


def _run(args) -> int:
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
        result = run_sequence(cfg, verbose=args.verbose, fresh=args.force)
    except _user_errors() as e:
        return _fail(e, args.verbose)
    print(f"\nAccuracy matrix (row i: after task i; column j: task j's test rows)\n{format_matrix(result['acc_matrix'])}")
    print(f"average accuracy {result['avg_acc']:.4f}  average incremental accuracy {result['avg_inc_acc']:.4f}  "
          f"forgetting {result['forgetting']:.4f}  ({result['seconds']:.0f}s)")
    if "avg_acc_only" in result:
        print("average accuracy with one modality seen: "
              + "  ".join(f"{m} only {v:.4f}" for m, v in result["avg_acc_only"].items()))
    if result["mlflow_run_id"]:
        print(f"MLflow run {result['mlflow_run_id']}; browse with:\n  {ui_command(cfg)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _update(args) -> int:
    from pipeline.evaluate import format_matrix
    from pipeline.update import GATE_FAILED, update_model
    from pipeline.watch import watch

    overrides = list(args.overrides)
    for flag, key in (("tracking_uri", "tracking.uri"), ("address", "ray_address")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        user = load_config(args.config, overrides)
        if args.watch:
            results = watch(args.model, args.watch, user, args.config, overrides, args.scenario, args.new,
                            args.verbose, args.poll, args.once)
        else:
            results = [update_model(args.model, args.data, user, args.config, overrides, args.scenario, args.new,
                                    args.verbose)]
    except _user_errors() as e:
        return _fail(e, args.verbose)
    if args.watch:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return 0
    result = results[0]
    print("\nAccuracy matrix (row i: after drop i; column j: drop j's test rows)\n"
          f"{format_matrix(result['acc_matrix'])}")
    gate = result["gate"]
    origin = f"continued from version {result['continued_from']}" if result["continued_from"] else "a new model"
    print(f"{result['model']} version {result['version']} ({origin}): "
          + ("passed the gate, now @champion" if gate["passed"] else "kept as @challenger, the gate failed:"))
    for line in gate["failures"]:
        print(f"  {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if gate["passed"] else GATE_FAILED


def _rollback(args) -> int:
    from pipeline.tracking import CHAMPION, TRACKING_ERRORS, open_client

    try:
        uri = _existing_store(args.tracking_uri)
        client = open_client(uri)
        client.get_model_version(args.name, str(args.to))
        try:
            before = client.get_model_version_by_alias(args.name, CHAMPION).version
        except TRACKING_ERRORS:
            before = None
        client.set_registered_model_alias(args.name, CHAMPION, str(args.to))
    except ConfigError as e:
        return _fail(e)
    except TRACKING_ERRORS as e:
        return _fail(f"{args.name} version {args.to}: {str(e).splitlines()[0]} (store {uri})")
    print(f"{args.name}@{CHAMPION}: version {before or '-'} -> version {args.to}")
    return 0


def _bench(args) -> int:
    from pipeline.bench import markdown, run_bench, write_bench

    overrides = list(args.overrides)
    for flag, key in (("benchmark", "benchmark"), ("data", "data"), ("scenario", "scenario"), ("tasks", "num_tasks"),
                      ("executor", "executor")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        summary = run_bench(lambda method: load_config(args.config, [*overrides, f"method={method}"], lenient=True),
                            methods, args.seeds, merge=args.merge)
    except _user_errors() as e:
        return _fail(e, args.verbose)
    out, md = write_bench(summary, args.out)
    print("\n" + markdown(summary))
    print(f"written to {out} and {md} ({summary['seconds']:.0f}s)")
    return 0


def _sweep(args) -> int:
    from tune.sweep import load_sweep, run_sweep

    try:
        cfg, sweep = load_sweep(args.config, args.overrides, samples=args.samples, scheduler=args.scheduler,
                                search=args.search)
        summary = run_sweep(cfg, sweep, args.best_out, verbose=args.verbose)
    except _user_errors() as e:
        return _fail(e, args.verbose)
    print(f"\n{summary['trials']} trials: {summary['failed']} failed, {summary['stopped_early']} stopped early")
    print(f"best: {summary['best_params']}\n  validation avg incremental accuracy {summary['best_val_avg_inc_acc']:.4f}"
          f"; on the test split: average accuracy {summary['best_test_avg_acc']:.4f}, "
          f"forgetting {summary['best_test_forgetting']:.4f}")
    print(f"best config written to {args.best_out}: mmcl run --config {args.best_out}")
    return 0


def _validate(args) -> int:
    from pipeline.data import DataError, check_source

    try:
        data, problems = check_source(args.path)
    except DataError as e:
        print(f"error: {e}")
        return 1
    for p in problems:
        print(p)
    errors = sum(p.level == "error" for p in problems)
    print(f"{args.path}: {data.table.num_rows} rows, {errors} error(s), {len(problems) - errors} warning(s)")
    return 1 if errors else 0


def _build(args) -> int:
    from pipeline.benchmarks import BENCHMARKS
    from pipeline.data import DataError

    out = Path(args.out or Path("runs") / "data" / f"{args.name}.parquet")
    try:
        BENCHMARKS[args.name](out, args.source)
    except DataError as e:
        print(f"mmcl: {e}", file=sys.stderr)
        return 2
    print(f"{args.name} written to {out}")
    return 0


def _convert(args) -> int:
    from pipeline.converters import CONVERTERS
    from pipeline.data import DataError

    try:
        out = CONVERTERS[args.name](args.source, args.out)
    except DataError as e:
        print(f"mmcl: {e}", file=sys.stderr)
        return 2
    print(f"{args.name} from {args.source} written to {out}; check it with `mmcl data validate {out}`")
    return 0


def _cache_config(args):
    overrides = list(args.overrides)
    for flag, key in (("benchmark", "benchmark"), ("data", "data"), ("dir", "cache.dir")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(args.config, overrides)


def _cache_build(args) -> int:
    from pipeline.benchmarks import benchmark_path
    from pipeline.cache import build_features
    from pipeline.data import DataError, load_data
    from pipeline.runtime import init_ray, quiet_logs
    from pipeline.tracking import data_fingerprint

    try:
        cfg = _cache_config(args)
        quiet_logs(args.verbose)
        path = str(cfg.data or benchmark_path(cfg.benchmark, Path(cfg.output_dir) / "data"))
        init_ray(cfg, args.verbose)
        data = load_data(path)
        if not data.needs_encoding:
            print(f"{path}: only vector columns, nothing to encode")
            return 0
        build_features(data, data_fingerprint(path), cfg.encoders, cfg.encoder_tokens, cfg.cache_dir(),
                       cfg.cache.actors, cfg.cache.batch_size)
    except (ConfigError, DataError) as e:
        print(f"mmcl: {e}", file=sys.stderr)
        return 2
    return 0


def _cache_ls(args) -> int:
    from pipeline.cache import list_entries

    cfg = _cache_config(args)
    entries = list_entries(cfg.cache_dir())
    if not entries:
        print(f"{cfg.cache_dir()}: no cache entries")
    for e in entries:
        m = e["manifest"]
        size = f"{e['bytes'] / 2**20:.1f} MiB"
        if m is None:
            print(f"{e['folder']}  {size}  INCOMPLETE (an interrupted build; never read; `mmcl cache clear` removes it)")
            continue
        encoders = ", ".join(f"{c}: {v['encoder']['spec']}" for c, v in m["modalities"].items() if "encoder" in v)
        print(f"{e['folder']}  {size}  {m['rows']} rows of {m['source']} ({encoders}; "
              f"{m['modalities'] and next(iter(m['modalities'].values()))['tokens']} tokens) built {m['created']} "
              f"in {m['seconds']}s")
    return 0


def _cache_clear(args) -> int:
    from pipeline.cache import clear_entries

    cfg = _cache_config(args)
    removed = clear_entries(cfg.cache_dir(), args.keys)
    for folder in removed:
        print(f"removed {folder}")
    print(f"{len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} removed from {cfg.cache_dir()}")
    return 0


def _predict(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import DataError, read_parquet
    from pipeline.tracking import TRACKING_ERRORS, predict

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        uri = _existing_store(args.tracking_uri)
        table = read_parquet(args.input)
        out = predict(uri, args.model_uri, table.to_pandas())
    except TRACKING_ERRORS as e:
        return _fail(f"{str(e).splitlines()[0]} (store {uri})")
    except (DataError, ValueError) as e:
        return _fail(e)
    if "sample_id" in table.column_names:
        out.insert(0, "sample_id", table["sample_id"].to_pylist())
    if args.out.endswith(".parquet"):
        pq.write_table(pa.Table.from_pandas(out, preserve_index=False), args.out)
    else:
        out.to_csv(args.out, index=False)
    print(f"{len(out)} predictions from {args.model_uri} written to {args.out}")
    return 0


def _serve(args) -> int:
    from pipeline.serve import serve
    from pipeline.tracking import TRACKING_ERRORS

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        uri = _existing_store(args.tracking_uri)
        serve(uri, args.model, args.host, args.port, args.poll)
    except _user_errors() as e:
        return _fail(e)
    except TRACKING_ERRORS as e:
        return _fail(f"{args.model}: {str(e).splitlines()[0]} (store {uri})")
    return 0


def _lineage(args) -> int:
    from pipeline.tracking import model_aliases, model_versions

    try:
        uri = _existing_store(args.tracking_uri)
    except ConfigError as e:
        return _fail(e)
    versions = model_versions(uri, args.name)
    if not versions:
        return _fail(f"no registered model '{args.name}' in {uri}")
    aliases = {}
    for alias, version in model_aliases(uri, args.name).items():
        aliases.setdefault(str(version), []).append(alias)
    for v in versions:
        t = v.tags
        parent = t.get("mmcl.continued_from_version") or "-"
        named = "".join(f" @{a}" for a in sorted(aliases.get(str(v.version), [])))
        print(f"version {v.version}{named}: task {t.get('mmcl.task_index')} <- version {parent}  "
              f"classes seen [{t.get('mmcl.classes_seen', '')}] domains seen [{t.get('mmcl.domains_seen', '')}]  "
              f"data {t.get('mmcl.data_fingerprint')} config {t.get('mmcl.config_hash')} run {t.get('mmcl.run_id')}")
    return 0


def _existing_store(uri: str | None) -> str:
    """The store a read-only command reads (default: the project's under runs/); never created here."""
    from pipeline.tracking import sqlite_path, tracking_uri

    given = uri
    uri = uri or tracking_uri(load_config())
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"no MLflow store at {db} ({'--tracking-uri' if given else 'the default store'}); "
                          "pass --tracking-uri with the store a run wrote (`mmcl run` prints it)")
    return uri


def _ui(args) -> int:
    import signal
    import subprocess

    try:
        uri = _existing_store(args.tracking_uri)
    except ConfigError as e:
        return _fail(e)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}  # (the server's own, about its web stack)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]
    # Ctrl-C and SIGTERM stop the server too, even where a shell started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from pipeline.tracking import experiment_links

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    for name, link in experiment_links(uri, f"http://127.0.0.1:{args.port}"):
        print(f"  {name}: {link}", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_process_group(proc)
        return 0


def stop_process_group(proc, grace_s: float = 10) -> None:
    """SIGTERM a server started with start_new_session (its workers share its group); SIGKILL after
    `grace_s`, since uvicorn's graceful shutdown waits for clients to close their connections."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv=None) -> int:
    from pipeline.benchmarks import BENCHMARKS
    from pipeline.config import CHOICES
    from pipeline.converters import CONVERTERS

    parser = argparse.ArgumentParser(prog="mmcl", description="Multi-modal continual learning on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a continual-learning sequence")
    run.add_argument("--config", help="YAML config; embedded defaults otherwise")
    run.add_argument("--out", help="write the result JSON here")
    run.add_argument("--benchmark", help="packaged benchmark (default mfeat)")
    run.add_argument("--data", help="Parquet file or folder in the project's schema")
    run.add_argument("--scenario", choices=CHOICES["scenario"])
    run.add_argument("--tasks", type=int, help="number of tasks")
    run.add_argument("--method")
    run.add_argument("--seed", type=int)
    run.add_argument("--address", help="Ray cluster address (default: a local Ray started on demand)")
    run.add_argument("--force", action="store_true",
                     help="start a new sequence even if this one has finished (or is half done)")
    run.add_argument("--verbose", action="store_true", help="show Ray's and DeepSpeed's own logs and tracebacks")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=5 model.num_experts=8")
    run.set_defaults(func=_run)
    bench = sub.add_parser("bench", help="methods side by side over seeds: JSON and a Markdown table")
    bench.add_argument("--methods", required=True, help="comma-separated; the first is the paired reference")
    bench.add_argument("--seeds", type=int, default=3)
    bench.add_argument("--out", required=True, help="JSON file; the Markdown table goes beside it (.md)")
    bench.add_argument("--config")
    bench.add_argument("--benchmark")
    bench.add_argument("--data")
    bench.add_argument("--scenario", choices=CHOICES["scenario"])
    bench.add_argument("--tasks", type=int)
    bench.add_argument("--executor", choices=CHOICES["executor"],
                       help="ray (default): each sequence on Ray Train + DeepSpeed, side by side as CPUs allow; "
                            "local: in-process, a debugging aid")
    bench.add_argument("--merge", help="an earlier bench JSON (same benchmark, scenario, tasks, seeds): its other "
                                       "methods' runs join this table as they were")
    bench.add_argument("--verbose", action="store_true", help="tracebacks of errors")
    bench.add_argument("overrides", nargs="*")
    bench.set_defaults(func=_bench)
    sweep = sub.add_parser("sweep", help="Ray Tune over whole sequences (experts, top-k, loss weights, lr)")
    sweep.add_argument("--config", help="YAML config; its `sweep:` section sets the search")
    sweep.add_argument("--samples", type=int, help="number of trials (default 8)")
    sweep.add_argument("--scheduler", choices=["asha", "fifo"])
    sweep.add_argument("--search", choices=["random", "optuna"])
    sweep.add_argument("--best-out", default="best_config.yaml", help="where the best config is written")
    sweep.add_argument("--verbose", action="store_true")
    sweep.add_argument("overrides", nargs="*", help="config overrides applied to every trial")
    sweep.set_defaults(func=_sweep)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    validate = data.add_parser("validate", help="check a Parquet file or folder against the schema")
    validate.add_argument("path")
    validate.set_defaults(func=_validate)
    build = data.add_parser("build", help="build a packaged benchmark into the schema")
    build.add_argument("name", choices=BENCHMARKS)
    build.add_argument("--out", help="Parquet file to write (default runs/data/NAME.parquet)")
    build.add_argument("--source", "--fsdd", help="the downloaded data set's folder, where a benchmark needs one "
                                                  "(av-digits: FSDD; default $MMCL_FSDD_DIR or data/fsdd)")
    build.set_defaults(func=_build)
    convert = data.add_parser("convert", help="convert a downloaded data set from its published layout")
    convert.add_argument("name", choices=CONVERTERS)
    convert.add_argument("source", help="the data set's folder, as downloaded")
    convert.add_argument("--out", required=True, help="Parquet file to write")
    convert.set_defaults(func=_convert)
    cache = sub.add_parser("cache", help="the frozen-feature cache").add_subparsers(dest="cache_command", required=True)
    for name, func, text in (("build", _cache_build, "encode a data set's modalities (once per encoders and data)"),
                             ("ls", _cache_ls, "list cache entries"), ("clear", _cache_clear, "remove cache entries")):
        c = cache.add_parser(name, help=text)
        c.add_argument("--config", help="YAML config (its encoders, encoder_tokens and cache sections)")
        c.add_argument("--dir", help="cache folder (default: cache.dir, or runs/cache)")
        if name == "build":
            c.add_argument("--benchmark")
            c.add_argument("--data")
            c.add_argument("--verbose", action="store_true")
        if name == "clear":
            c.add_argument("keys", nargs="*", help="entries whose name contains one of these (default: all)")
            c.set_defaults(overrides=[])
        else:
            c.add_argument("overrides", nargs="*", help="config overrides, e.g. encoders.image=timm:resnet18")
        c.set_defaults(func=func)
    update = sub.add_parser("update", help="learn a data drop as the next task of a registered model; a gate "
                                           "decides whether the new version becomes @champion")
    update.add_argument("--model", required=True, help="NAME (its @champion), NAME@ALIAS or NAME/VERSION; with --new, "
                                                       "the name of the model to start")
    drop = update.add_mutually_exclusive_group(required=True)
    drop.add_argument("--data", help="the drop: a Parquet file or folder in the project's schema")
    drop.add_argument("--watch", metavar="DIR", help="learn every Parquet file that appears in DIR, in name order, one "
                                                     "update each; files that fail validation go to DIR/rejected/")
    update.add_argument("--new", action="store_true", help="start a new registered model with this first drop (with "
                                                           "--watch: with the first file, if the model has none yet)")
    update.add_argument("--poll", type=float, default=10.0, help="--watch: seconds between looks at DIR (default 10)")
    update.add_argument("--once", action="store_true", help="--watch: learn what DIR holds now, then stop")
    update.add_argument("--scenario", choices=CHOICES["scenario"],
                        help="class-il: the drop's classes are new; domain-il: new domains of known classes "
                             "(default: as the drop's labels say)")
    update.add_argument("--config", help="YAML config over the model's own (its first drop's config)")
    update.add_argument("--tracking-uri", help="the MLflow store of the registry (default: the project's under runs/)")
    update.add_argument("--address", help="Ray cluster address")
    update.add_argument("--out", help="write the result JSON here")
    update.add_argument("--verbose", action="store_true")
    update.add_argument("overrides", nargs="*", help="config overrides, e.g. gate.max_forgetting=0.02 train.epochs=5")
    update.set_defaults(func=_update)
    rollback = sub.add_parser("rollback", help="move a registered model's @champion back to a version")
    rollback.add_argument("name")
    rollback.add_argument("--to", required=True, type=int, help="the version to serve again")
    rollback.add_argument("--tracking-uri")
    rollback.set_defaults(func=_rollback)
    predict = sub.add_parser("predict", help="predict with a registered model version")
    predict.add_argument("--model-uri", required=True, help="e.g. models:/mfeat-class-il-cmoe/3")
    predict.add_argument("--input", required=True, help="Parquet file with the model's modality columns")
    predict.add_argument("--out", required=True, help="predictions: .parquet, else CSV")
    predict.add_argument("--tracking-uri", help="default: the project's store under runs/")
    predict.set_defaults(func=_predict)
    serve = sub.add_parser("serve", help="answer predictions over HTTP (MLflow's /invocations) with a registered "
                                         "version, following its alias")
    serve.add_argument("model", help="NAME (its @champion), NAME@ALIAS (followed as it moves) or NAME/VERSION")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--poll", type=float, default=5.0, help="seconds between checks of the alias (default 5)")
    serve.add_argument("--tracking-uri", help="the registry's store (default: the project's under runs/)")
    serve.set_defaults(func=_serve)
    lineage = sub.add_parser("lineage", help="the chain of registered versions of a model, task by task")
    lineage.add_argument("name", help="registered model name, e.g. mfeat-class-il-cmoe")
    lineage.add_argument("--tracking-uri")
    lineage.set_defaults(func=_lineage)
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the project's store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri")
    ui.set_defaults(func=_ui)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nmmcl: interrupted; the same command resumes after the last finished task",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
