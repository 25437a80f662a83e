"""`mmcl update`: a registered model learns a data drop as its next task, through the same recipe as
`mmcl run` (pipeline/driver.py) with the chain's earlier drops as its finished tasks, and a gate
decides whether the new version becomes the `champion` or stays a `challenger`.

A version's tags hold its whole chain (`mmcl.drops`: each drop's path, fingerprint, kind, classes or
domains, and the test accuracy row after it; `mmcl.config`), so the registry alone says what the
next update reads and evaluates on. The drops stay where the user keeps them: each is read (and
encoded, once) as its own source, and every task's rows are its drop's files (`streams.DROP`)."""
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from mlflow.exceptions import MlflowException

from pipeline import storage
from pipeline.config import ConfigError, RunConfig, config_from_dict, read_yaml
from pipeline.data import DataError, MultiModalData, load_data, parquet_files
from pipeline.driver import PreparedData, SequenceRecipe, check_locations, hold_out_validation, prepare_source
from pipeline.evaluate import summarize
from pipeline.executors import EXECUTORS
from pipeline.lock import RunLock
from pipeline.pyfunc import download_checkpoint
from pipeline.runtime import quiet_logs
from pipeline.scenario import Scenario, Task
from pipeline.state import SequenceState, TaskRecord
from pipeline.streams import DROP
from pipeline.tracking import (CHALLENGER, CHAMPION, Tracker, check_tracking_server, data_fingerprint,
                               open_client, parse_ref, tracking_uri)

DROPS_TAG, CONFIG_TAG, LABELS_TAG, GATE_TAG = "mmcl.drops", "mmcl.config", "mmcl.label_names", "mmcl.gate"
GATE_FAILED = 3  # `mmcl update`'s exit status when the gate keeps the champion
PLACEMENT = ("ray_address", "executor", "output_dir", "storage_path", "tracking", "cache", "data", "benchmark")
FIXED = ("method", "encoders", "encoder_tokens", "model")  # what the chain's first drop set for good


class ChainBroken(DataError):
    """An earlier drop of the chain is missing or changed: no new drop can be learnt from it."""


@dataclass
class Chain:
    """What a registered version has learnt, from its tags (empty for a new model)."""
    name: str
    version: str | None = None
    drops: list[dict] = field(default_factory=list)
    config: dict | None = None
    label_names: dict = field(default_factory=dict)

    @property
    def class_order(self) -> list:
        return list(dict.fromkeys(c for d in self.drops for c in d["classes"]))


def read_chain(client, ref: str, uri: str) -> Chain:
    name, alias, version = parse_ref(ref)
    try:
        v = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"no version with alias '{alias}'" if alias else f"no version {version}"
        raise ConfigError(f"--model {ref}: model '{name}' has {what} in {uri} (`mmcl lineage {name}` lists them; "
                          f"a new model starts with --new)") from None
    if DROPS_TAG not in v.tags:
        raise ConfigError(f"--model {ref}: version {v.version} of '{name}' was not made by `mmcl update` (it has no "
                          f"{DROPS_TAG} tag); start a model with `mmcl update --new`")
    drops = json.loads(v.tags[DROPS_TAG])
    drops[-1]["version"] = str(v.version)
    return Chain(name, str(v.version), drops, json.loads(v.tags[CONFIG_TAG]), json.loads(v.tags.get(LABELS_TAG, "{}")))


def chain_config(chain: Chain, user: RunConfig, config_path: str | None, overrides: list[str]) -> RunConfig:
    """The chain's config, where things are kept taken from this command, the user's file and
    overrides on top; what fixes the model's shape cannot change."""
    if chain.config is None:
        return user
    values = {k: v for k, v in chain.config.items() if k not in PLACEMENT}
    values.update({k: v for k, v in user.to_dict().items() if k in PLACEMENT})
    for key, value in (read_yaml(config_path) if config_path else {}).items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) \
            else value
    cfg = config_from_dict(values, overrides, config_path or "config")
    now = cfg.to_dict()
    for key in FIXED:
        if now[key] != chain.config[key]:
            raise ConfigError(f"{key}: version {chain.version} of '{chain.name}' was made with {chain.config[key]!r}; "
                              "an update cannot change it (it sets the model's shape and features)")
    return cfg


def drop_task(index: int, kind: str | None, data: MultiModalData, chain: Chain, source: str) -> tuple[Task, str]:
    """The drop's task and its kind: class-il brings new classes only, domain-il new domains of
    known classes (the first drop sets the classes); without `kind`, the data decides."""
    labels = sorted(set(data.column("label").tolist()))
    domains = sorted(set(data.column("domain").astype(str).tolist()))
    known = chain.class_order
    new = [c for c in labels if c not in known]
    if kind is None and new and len(new) < len(labels):
        raise DataError(f"{source}, column label: classes {new} are new and {sorted(set(labels) - set(new))} are "
                        "learnt already; a drop is new classes (class-il) or new domains of known classes (domain-il)")
    if (kind or ("class-il" if new else "domain-il")) == "class-il":
        if len(new) < len(labels):
            raise DataError(f"{source}, column label: a class-il drop brings new classes only; "
                            f"{sorted(set(labels) - set(new))} are learnt already (a new domain of known classes is "
                            "--scenario domain-il)")
        return Task(index, labels, None), "class-il"
    if known and new:
        raise DataError(f"{source}, column label: a domain-il drop has the model's classes only; {new} are new "
                        "(new classes are --scenario class-il)")
    seen = {d for drop in chain.drops for d in drop.get("domains") or []}
    if repeated := sorted(set(domains) & seen):
        raise DataError(f"{source}, column domain: domains {repeated} were learnt by earlier drops")
    return Task(index, known or labels, domains), "domain-il"


def check_label_names(data: MultiModalData, chain: Chain, source: str) -> dict:
    """The chain's label -> name, with this drop's; a label named otherwise than before is an error."""
    names = dict(chain.label_names)
    for label, name in zip(data.column("label").tolist(), data.column("label_name").astype(str).tolist()):
        before = names.setdefault(str(label), name)
        if before != name:
            raise DataError(f"{source}, column label_name: label {label} is '{name}' here and '{before}' in the "
                            f"drops '{chain.name}' learnt")
    return names


def union(drops: list[PreparedData]) -> tuple[MultiModalData, dict[str, int]]:
    """Every drop as one source: its files in drop order, the plan's columns, and file -> drop."""
    first, files = drops[0].data, {}
    grouped = "group" in first.table.column_names
    for k, d in enumerate(drops):
        if (d.data.modalities, d.data.tokens) != (first.modalities, first.tokens):
            raise DataError(f"{d.source}: modalities {d.data.modalities} differ from the first drop's "
                            f"{first.modalities} ({drops[0].source})")
        if ("group" in d.data.table.column_names) != grouped:
            raise DataError(f"{d.source}: {'no' if grouped else 'a'} group column, unlike the first drop "
                            f"({drops[0].source})")
        files.update({f: k for f in parquet_files(d.data.path)})
    columns = first.table.column_names
    table = pa.concat_tables([d.data.table.select(columns) for d in drops], promote_options="permissive")
    nullable = sorted({m for d in drops for m in d.data.nullable})
    return MultiModalData(list(files), table, first.kinds, first.modalities, first.tokens, nullable), files


class DropScenario(Scenario):
    """One task per drop, its rows its drop's files; the head grows with class-il drops."""

    def head_size_after(self, task_index: int) -> int:
        return len(dict.fromkeys(c for t in self.tasks[:task_index + 1] for c in t.classes))

    def rows_of(self, task: Task, so_far: bool = False) -> tuple[str, list]:
        return DROP, list(range(task.index + 1)) if so_far else [task.index]


class UpdateRecipe(SequenceRecipe):
    """The update's sequence: the chain's drops are its finished tasks; its version's tags carry the
    chain on."""

    def __init__(self, *args, chain: Chain, drops: list[PreparedData], drop_of_file: dict, kind: str,
                 label_names: dict):
        super().__init__(*args)
        self.chain, self.drops, self.drop_of_file, self.kind = chain, drops, drop_of_file, kind
        self.label_names = label_names

    def setup(self, name: str, verbose: bool) -> dict:
        plan = super().setup(name, verbose)
        plan["data"]["drop_of_file"] = self.drop_of_file
        return plan

    def resume_line(self) -> str | None:
        return None  # the earlier drops are not this update's work

    def validation_split(self, data: MultiModalData) -> tuple[np.ndarray, list]:
        """Each drop's own hold-out: a drop's val rows do not move as later drops arrive."""
        splits, ids, lo, cfg = [], [], 0, self.cfg
        column = {c: data.column(c) for c in ("split", "label", "sample_id")}
        groups = data.column("group") if "group" in data.table.column_names else None
        for d in self.drops:
            hi = lo + d.data.table.num_rows
            split, val = hold_out_validation(column["split"][lo:hi], column["label"][lo:hi],
                                             column["sample_id"][lo:hi], cfg.train.val_fraction,
                                             None if groups is None else groups[lo:hi])
            splits.append(split)
            ids += val
            lo = hi
        if ids and len(set(column["sample_id"].tolist())) < len(column["sample_id"]):
            raise DataError("train.val_fraction: the drops share sample_ids, so held-out rows would be ambiguous; "
                            "give every drop's rows their own ids, or hold out none (train.val_fraction=0)")
        return np.concatenate(splits), ids

    def lineage(self, record: TaskRecord) -> dict:
        d = self.drops[record.index]
        entry = {"path": d.source, "fingerprint": d.fingerprint, "kind": self.kind, "classes": record.classes,
                 "domains": record.domains, "row": record.row}
        config = {k: v for k, v in self.cfg.to_dict().items() if k not in PLACEMENT}
        return {DROPS_TAG: json.dumps([*self.chain.drops, entry]), CONFIG_TAG: json.dumps(config),
                LABELS_TAG: json.dumps(self.label_names), "mmcl.drop_kind": self.kind}


def gate_failures(cfg: RunConfig, chain: Chain, row: list) -> list[str]:
    """The rules the new version breaks: an earlier drop's accuracy falling by more than
    gate.max_forgetting from the version it continued, the new drop's below gate.min_accuracy."""
    out = []
    before = chain.drops[-1]["row"] if chain.drops else []
    for j, (was, now) in enumerate(zip(before, row)):
        if was is not None and now is not None and was - now > cfg.gate.max_forgetting + 1e-9:
            out.append(f"drop {j} ({chain.drops[j]['path']}): test accuracy {was:.3f} -> {now:.3f} "
                       f"({now - was:+.3f}; gate.max_forgetting allows -{cfg.gate.max_forgetting:.3f})")
    if row[-1] < cfg.gate.min_accuracy - 1e-9:
        out.append(f"the new drop: test accuracy {row[-1]:.3f}, below gate.min_accuracy {cfg.gate.min_accuracy:.3f}")
    return out


def apply_gate(client, cfg: RunConfig, chain: Chain, version: str, row: list, log) -> dict:
    """Moves `champion` to the new version if it keeps the gate's rules, else `challenger`; decided
    once per version (its gate tag), so a rerun does not undo a later rollback."""
    decided = client.get_model_version(chain.name, version).tags.get(GATE_TAG)
    if decided:
        return json.loads(decided)
    failures = gate_failures(cfg, chain, row)
    verdict = {"passed": not failures, "failures": failures, "alias": CHALLENGER if failures else CHAMPION}
    client.set_registered_model_alias(chain.name, verdict["alias"], version)
    client.set_model_version_tag(chain.name, version, GATE_TAG, json.dumps(verdict))
    for line in failures:
        log(f"  gate: {line}")
    return verdict


def stage_checkpoint(client_uri: str, chain: Chain, run_dir: Path, cfg: RunConfig) -> tuple[str, str]:
    """(local folder, checkpoint) of the version: downloaded into the run folder and, where Ray
    Train's storage is a URI (a cluster's nodes share no disk), copied there, where the update's
    task starts from."""
    local = str(download_checkpoint(f"models:/{chain.name}/{chain.version}", client_uri, run_dir / "parent"))
    if not storage.is_uri(cfg.storage_path or ""):
        return local, local
    target = storage.join(cfg.storage_path, "mmcl-updates", run_dir.name, "parent")
    filesystem, path = storage.resolve(target)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    return local, target


def prepare_drops(cfg: RunConfig, chain: Chain, source: str, kind: str | None, log, verbose: bool):
    """Every earlier drop checked against its recorded fingerprint, then the new drop's labels and
    domains against the chain's, all before anything is encoded or trained; each drop as the model
    reads it. Returns (drops, the new drop's task, its kind, the chain's label names)."""
    out = []
    for k, d in enumerate(chain.drops):
        learnt = f"drop {k} ({d['path']}, learnt by version {d.get('version') or '?'} of '{chain.name}')"
        try:
            fingerprint = data_fingerprint(d["path"])
        except (OSError, DataError) as e:
            raise ChainBroken(f"{learnt} cannot be read ({str(e).splitlines()[0]}); the update needs every earlier "
                            "drop's test rows") from None
        if fingerprint != d["fingerprint"]:
            raise ChainBroken(f"{learnt} has changed since (fingerprint {fingerprint}, was {d['fingerprint']})")
        out.append(prepare_source(cfg, d["path"], load_data(d["path"]), log, verbose, fingerprint))
    data = load_data(source)
    task, kind = drop_task(len(chain.drops), kind, data, chain, source)
    label_names = check_label_names(data, chain, source)
    new = prepare_source(cfg, source, data, log, verbose)
    for k, d in enumerate(out):
        if d.fingerprint == new.fingerprint:
            raise DataError(f"{source}: the same data as drop {k} ({d.source}), which the model has learnt")
    return [*out, new], task, kind, label_names


def update_model(ref: str, drop: str, user: RunConfig, config_path: str | None = None, overrides: list[str] = (),
                 kind: str | None = None, new: bool = False, verbose: bool = False, log=print) -> dict:
    """Learns `drop` as the next task of version `ref` (a new model `ref` with `new`), registers the
    version, gates it. Returns the chain's result (its accuracy matrix) with `model`, `version`,
    `continued_from` and `gate`."""
    quiet_logs(verbose)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    started, uri = time.time(), tracking_uri(user)
    if not user.tracking.enabled:
        raise ConfigError("tracking.enabled: `mmcl update` registers versions in MLflow; it cannot run without it")
    check_tracking_server(uri)
    client = open_client(uri)
    if new:
        if any(c in ref for c in "@/"):
            raise ConfigError(f"--model {ref}: --new takes a model name, not a version or alias")
        chain = Chain(ref)
    else:
        chain = read_chain(client, ref, uri)
    cfg = chain_config(chain, user, config_path, overrides)
    cfg.tracking.experiment = cfg.tracking.experiment or chain.name
    drop = str(Path(drop).resolve()) if not storage.is_uri(drop) else drop
    check_locations(cfg)
    executor = EXECUTORS[cfg.executor]
    executor.start(cfg, verbose)
    drops, task, kind, label_names = prepare_drops(cfg, chain, drop, kind, log, verbose)
    data, drop_of_file = union(drops)
    tasks = [Task(k, d["classes"], d["domains"]) for k, d in enumerate(chain.drops)] + [task]
    scenario = DropScenario("drops", list(dict.fromkeys(c for t in tasks for c in t.classes)), tasks)
    cfg.num_tasks, cfg.scenario, cfg.data = len(tasks), kind, drop
    prepared = PreparedData(data, drop, drops[-1].fingerprint, drops[-1].features, drops[-1].encoders)
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", chain.name)
    run_dir = Path(cfg.output_dir) / "updates" / f"{folder}-from-v{chain.version or 0}-{prepared.fingerprint}-" \
                                                 f"{cfg.fingerprint()}"
    with RunLock(run_dir) as lock:
        if lock.taken_over:
            log(f"Taking over {run_dir} from {lock.taken_over}, which is no longer running")
        state = SequenceState.open(run_dir, cfg.fingerprint())
        if new and not state.data["mlflow_run_id"] and client.search_model_versions(f"name = '{chain.name}'"):
            raise ConfigError(f"--new: model '{chain.name}' already has versions in {uri}; `mmcl update --model "
                              f"{chain.name} --data ...` continues it")
        if not state.tasks and chain.drops:
            local, start = stage_checkpoint(uri, chain, run_dir, cfg)
            for k, d in enumerate(chain.drops):
                rows = [[*e["row"], *[None] * (len(tasks) - len(e["row"]))] for e in chain.drops[:k + 1]]
                gone = str(run_dir / f"learnt-by-v{d['version']}")  # (in the registry: nothing here to free)
                last = k == len(chain.drops) - 1
                state.tasks.append(TaskRecord(k, d["classes"], d["domains"], start if last else gone,
                                              local if last else gone, rows[-1], [], summarize(rows), logged=True,
                                              model_version=d.get("version")))
            state.save()
        tracker = Tracker(cfg, model_name=chain.name)
        recipe = UpdateRecipe(cfg, prepared, scenario, state, tracker, log, started, chain=chain, drops=drops,
                              drop_of_file=drop_of_file, kind=kind, label_names=label_names)
        if state.data["complete"]:
            result = recipe.report_finished()
        else:
            plan = recipe.setup(f"{chain.name} v{chain.version or 0} + {Path(drop).stem}", verbose)
            try:
                recipe.train(executor, plan, verbose)
            except BaseException:
                recipe.to_mlflow(tracker.fail_sequence, state.data["mlflow_run_id"])
                raise
            result = recipe.cleanup()
        version = state.tasks[-1].model_version
        if version is None:
            raise ConfigError(f"MLflow at {uri} did not register the new version; `mmcl update` with the same "
                              "arguments registers it and gates it")
        gate = apply_gate(client, cfg, chain, version, state.tasks[-1].row, log)
    return {**result, "model": chain.name, "version": version, "continued_from": chain.version, "gate": gate}
