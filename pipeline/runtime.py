"""The Ray runtime a run uses: started or joined, its logs quieted, and what its Train workers get."""
import logging
import os
import socket
import warnings

from pipeline.config import ConfigError, RunConfig


def check_ray_address(address: str | None, timeout_s: float = 5) -> None:
    """A Ray that does not answer fails in seconds, not after Ray's own retries (minutes)."""
    from ray._private.services import get_ray_address_from_environment

    if address == "local":
        return
    env = os.environ.get("RAY_ADDRESS")
    source = "RAY_ADDRESS" if env else "--address (ray_address)" if address not in (None, "auto") else \
        "the last `ray start` on this machine (ray_current_cluster in Ray's temp folder)"
    try:
        found = get_ray_address_from_environment(address, None)
    except ConnectionError:  # "auto" with no cluster: ray.init says so
        return
    if found is None:
        return  # a local Ray is started
    host, _, port = found.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"Ray at {found} (from {source}) does not answer ({e.strerror or e}); start that cluster, "
                          "or pass --address local for a Ray of this process's own") from None


def init_ray(cfg: RunConfig, verbose: bool) -> None:
    import ray
    import ray.data

    # Ray's tqdm replaces builtins.print in the driver once a Ray Data bar reaches it; a print
    # that is not builtins.print no longer pickles (Tune pickles a sweep's callbacks).
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if ray.is_initialized():
        return
    check_ray_address(cfg.ray_address)
    env = {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "ignore" if not verbose else "default"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(address=cfg.ray_address, runtime_env={"env_vars": env},
             logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose,
             configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


WORKER_MEMORY = 2 << 30  # a worker's peak resident memory, 10 cmoe tasks on mfeat (BENCHMARKS.md, "Growth")
MAX_DEFAULT_WORKERS = 8  # 256 rows a step at the default batch; past that set num_workers and lr by hand


def worker_resources(cfg: RunConfig) -> tuple[int | tuple[int, int], float, str]:
    """(workers, CPUs per worker, placement strategy). Unset (0): on GPUs one worker per GPU; on CPUs
    one worker of one CPU per CPU, as many as each node's memory holds, at most MAX_DEFAULT_WORKERS:
    two torch threads are slower than one on this small adapter, so processes scale where threads
    do not (BENCHMARKS.md, "The distributed path"). On several nodes the group is elastic, from one
    worker to that many: a lost node leaves the sequence going on the others from the latest
    checkpoint, and a node that joins is taken up at Ray Train's next resize check."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if cfg.train.use_gpu:
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        return cfg.train.num_workers or max(1, gpus), cfg.train.cpus_per_worker or 1, "PACK"
    cpus = cfg.train.cpus_per_worker or 1
    if cfg.train.num_workers:
        return cfg.train.num_workers, cpus, "PACK"
    fits = sum(max(1, min(int(n["CPU"] // cpus), int(n.get("memory", WORKER_MEMORY) // WORKER_MEMORY)))
               for n in nodes)
    workers = min(fits, MAX_DEFAULT_WORKERS)
    return ((1, workers) if len(nodes) > 1 else workers), cpus, "SPREAD" if len(nodes) > 1 else "PACK"


def check_storage(cfg: RunConfig) -> None:
    """Ray Train workers write their checkpoints to `storage_path`: on machines that share no disk it
    must be a URI or a mount every node sees."""
    import ray

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 and not cfg.storage_path:
        raise ConfigError(f"storage_path: the Ray cluster spans {len(hosts)} machines; set storage_path to "
                          "storage every node sees (s3://..., gs://..., or a shared mount)")


def quiet_logs(verbose: bool) -> None:
    """Ray's, DeepSpeed's and MLflow's own logs and warnings off unless `verbose`."""
    if verbose:
        return
    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
