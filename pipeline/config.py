"""Typed run configuration: defaults here, a YAML file over them, `section.key=value` overrides last."""
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from models.losses import LossWeights


@dataclass
class ModelConfig:
    dim: int = 128
    blocks: int = 2
    heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    bottleneck: int = 32
    dropout: float = 0.1
    freeze_per_task: int = 1  # most influential experts frozen after each task
    experts_per_task: int = 0  # new experts added to every MoE layer at the start of each later task
    head: str = "analytic"  # cmoe's classifier: analytic (ridge on accumulated statistics) or cosine (gradient)
    adapt_tasks: int = 0  # with the analytic head: tasks during which the adapter trains (0: every task)
    projection: int = 2048  # random ReLU features of the ridge heads
    class_gaussians: int = 64  # cmoe: covariance rank of each class's Gaussian of frozen features (0: none kept)
    memory: int = 200  # exemplar rows kept by replay


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 32  # per worker
    lr: float = 2e-3
    weight_decay: float = 1e-4
    num_workers: int = 0  # Ray Train workers; 0: one per CPU (per GPU with use_gpu), at most 8
    cpus_per_worker: float = 0  # each worker runs that many torch threads; 0: one
    zero_stage: int = 0  # DeepSpeed ZeRO stage over the adapter (0 is fastest for it: BENCHMARKS.md)
    bucket_size: int = 500_000_000  # ZeRO 1-2: reduce and all-gather bucket, in elements
    overlap_comm: bool = False  # ZeRO 1-2: overlap gradient reduction with the backward pass
    precision: str = "auto"  # fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 on GPU, else fp32
    use_gpu: bool = False
    max_failures: int = 1  # worker failures a fit recovers from (from the latest epoch checkpoint); -1: any
    val_fraction: float = 0.0  # of each class's train rows held out for validation when no 'val' rows exist
    hold_mb: float = 1024  # when the train, val and test rows take at most this many MiB every worker reads
    # them once and holds them, else each streams its share of each task from the source on every pass (0: always)
    read_tasks: int = 2  # Ray Data tasks a stream reads with at once (each a process holding a row group or two)


@dataclass
class TrackingConfig:
    uri: str | None = None  # default: the SQLite store <output_dir>/mlflow.db, artifacts in <output_dir>/mlartifacts
    experiment: str | None = None  # default: the benchmark name
    parent_run_id: str | None = None  # nest the sequence's run under this one (a sweep's)
    enabled: bool = True  # False: no MLflow at all (benchmarks running many short sequences)


@dataclass
class CacheConfig:
    dir: str | None = None  # default: <output_dir>/cache
    actors: int = 0  # encoder actors in the Ray Data pool; 0: half the cluster's CPUs
    batch_size: int = 32


@dataclass
class GateConfig:
    """`mmcl update`'s promotion rules: a new version becomes the champion only if it keeps both."""
    max_forgetting: float = 0.05  # accuracy (0-1) any earlier drop's test rows may lose against the version updated
    min_accuracy: float = 0.0  # accuracy the new drop's test rows must reach


@dataclass
class RunConfig:
    benchmark: str = "mfeat"
    data: str | None = None  # a Parquet file or folder in the project's schema, instead of a benchmark
    scenario: str = "class-il"
    num_tasks: int = 0  # 0: one per domain (domain-il), else 5 (or one per class when fewer)
    method: str = "cmoe"
    seed: int = 0
    ray_address: str | None = None
    executor: str = "ray"  # ray: one Ray Train + DeepSpeed fit per sequence; local: the same loop in this process
    output_dir: str = "runs"  # run state, data builds and, by default, the MLflow store
    storage_path: str | None = None  # Ray Train checkpoints; on a cluster a shared path or s3:// URI
    encoders: dict = field(default_factory=dict)  # modality column -> encoder spec (models/encoders)
    encoder_tokens: int = 4  # tokens each encoder gives the adapter per modality
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def cache_dir(self) -> str:
        return self.cache.dir or str(Path(self.output_dir) / "cache")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def user_dict(self) -> dict:
        """`to_dict()` with the model and loss sections as the user set them, before the method's fixed
        settings: what a run of another method (a sweep's trial over `method`) starts from."""
        out, defaults = self.to_dict(), RunConfig().to_dict()
        for section in ("model", "loss"):
            out[section] = defaults[section]
        for key, value in getattr(self, "given", {}).items():
            section, name = key.split(".")
            out[section][name] = value
        return out

    def flat(self) -> dict:
        """`section.key` -> value, as MLflow params."""
        out = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def fingerprint(self) -> str:
        """Hash of everything that changes results or how they are made (not where they are written
        or tracked): the run folder's name, so runs of the two executors never resume each other."""
        d = self.to_dict()
        for k in ("ray_address", "output_dir", "storage_path", "tracking", "cache", "gate"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class ConfigError(ValueError):
    pass


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping")
            value = _build(type(default), value, f"{where}.{key}")
        elif known[key].type in (int, float) and not isinstance(value, bool):
            try:  # YAML reads 1e-3 as a string
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: '{key}' must be a number, not {value!r}") from None
            if known[key].type is int and not number.is_integer():
                raise ConfigError(f"{where}: '{key}' must be a whole number, not {value!r}")
            value = known[key].type(number)
        kwargs[key] = value
    return cls(**kwargs)


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return values


def config_from_dict(values: dict, overrides: list[str] = (), where: str = "config",
                     lenient: bool = False) -> RunConfig:
    """The config from `values` (a YAML file's), `overrides` (`key=value`) last. A model.* or loss.*
    value the chosen method does not take is an error (see `_apply_method`)."""
    values = copy.deepcopy(values)
    for text in overrides:
        keys, value = _parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    cfg = _build(RunConfig, values, where)
    _check(cfg)
    given = {k: v for k, v in changed_settings(cfg).items()
             if k.split(".")[1] in (values.get(k.split(".")[0]) or {})}
    cfg.given = given
    cfg.ignored = _apply_method(cfg, given, where, lenient)
    return cfg


def changed_settings(cfg: RunConfig) -> dict:
    """The `model.*` and `loss.*` values that differ from the defaults."""
    defaults = RunConfig().flat()
    return {k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("model", "loss") and v != defaults[k]}


def method_conflicts(method_name: str, given: dict) -> dict[str, str]:
    """key -> why the method will not take the user's value: its family does not read the key, or
    the method fixes it (what defines it: finetune has no distillation, ...)."""
    from models.methods import get_method, settings_read
    try:
        method = get_method(method_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    reads = settings_read(method.family)
    forced = {**{f"loss.{k}": v for k, v in method.loss.items()}, **{f"model.{k}": v for k, v in method.model.items()}}
    out = {}
    for key, value in given.items():
        if key not in reads:
            out[key] = (f"method {method_name} (the {method.family} family) does not read it; it reads "
                        f"{', '.join(sorted(reads)) or 'no model.* or loss.* key'}")
        elif key in forced and forced[key] != value:
            out[key] = f"method {method_name} fixes it at {forced[key]!r}: that is what the method is"
    return out


def _apply_method(cfg: RunConfig, given: dict, where: str, lenient: bool) -> list[str]:
    """The method's fixed settings applied. A value the user set (other than the default) that the
    method would drop is an error, or with `lenient` (a bench over several methods) left out and
    returned as 'key: why'."""
    from models.methods import get_method
    conflicts = method_conflicts(cfg.method, given)
    if conflicts and not lenient:
        key, why = next(iter(conflicts.items()))
        raise ConfigError(f"{where}: {key}={given[key]!r}: {why}")
    method = get_method(cfg.method)
    defaults = RunConfig()
    for key in conflicts:  # (lenient) back to the default, then the method's own value below
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, getattr(getattr(defaults, section), name))
    for section, forced in (("loss", method.loss), ("model", method.model)):
        for key, value in forced.items():
            setattr(getattr(cfg, section), key, value)
    return [f"{key}: {why}" for key, why in conflicts.items()]


def load_config(path: str | Path | None = None, overrides: list[str] = (), lenient: bool = False) -> RunConfig:
    values = read_yaml(path) if path else {}
    values.pop("sweep", None)  # a sweep's file runs as a plain config too
    return config_from_dict(values, overrides, str(path) if path else "config", lenient)


# key: (lowest, highest, lowest allowed itself); None: no bound.
RANGES = {
    "num_tasks": (0, None, True), "seed": (0, None, True), "encoder_tokens": (1, None, True),
    "train.epochs": (1, None, True), "train.batch_size": (1, None, True), "train.lr": (0, None, False),
    "train.weight_decay": (0, None, True), "train.num_workers": (0, None, True),
    "train.cpus_per_worker": (0, None, True), "train.bucket_size": (1, None, True),
    "train.max_failures": (-1, None, True), "train.val_fraction": (0, 1, True),
    "train.hold_mb": (0, None, True), "train.read_tasks": (1, None, True),
    "model.dim": (1, None, True), "model.blocks": (1, None, True), "model.heads": (1, None, True),
    "model.num_experts": (1, None, True), "model.bottleneck": (1, None, True), "model.dropout": (0, 1, True),
    "model.freeze_per_task": (0, None, True), "model.experts_per_task": (0, None, True),
    "model.adapt_tasks": (0, None, True), "model.projection": (1, None, True),
    "model.class_gaussians": (0, None, True), "model.memory": (0, None, True),
    "cache.actors": (0, None, True), "cache.batch_size": (1, None, True),
    **{f"loss.{f.name}": (0, None, f.name not in ("kd_temperature", "align_temperature"))
       for f in dataclasses.fields(LossWeights)},
}
CHOICES = {"scenario": ("class-il", "domain-il"), "executor": ("ray", "local"),
           "train.precision": ("auto", "fp32", "bf16"), "train.zero_stage": (0, 1, 2, 3),
           "model.head": ("analytic", "cosine")}


def _check(cfg: RunConfig) -> None:
    flat = cfg.flat()
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, not {flat[key]!r}")
    for key, (low, high, inclusive) in RANGES.items():
        value = flat[key]
        if value < low or (value == low and not inclusive) or (high is not None and value >= high):
            bound = f"{'at least' if inclusive else 'above'} {low}" + (f" and below {high}" if high is not None else "")
            raise ConfigError(f"{key} must be {bound}, not {value}")
    for key in ("gate.max_forgetting", "gate.min_accuracy"):
        if not 0 <= flat[key] <= 1:
            raise ConfigError(f"{key} must be an accuracy between 0 and 1, not {flat[key]}")
    if not isinstance(cfg.encoders, dict):
        raise ConfigError("encoders must map modality columns to encoder specs, e.g. {image: timm:resnet18}")
    from models.encoders import encoder_kind
    for column, spec in cfg.encoders.items():
        try:
            encoder_kind(str(spec))
        except ValueError as e:
            raise ConfigError(f"encoders.{column}: {e}") from None
    if not 1 <= cfg.model.top_k <= cfg.model.num_experts:
        raise ConfigError("model.top_k must be between 1 and model.num_experts")
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(f"model.dim ({cfg.model.dim}) must be a multiple of model.heads ({cfg.model.heads})")
