"""The Ray runtime a run uses: started or joined, its logs quieted, and what its Train workers get."""
import ipaddress
import logging
import os
import socket
import warnings
from contextlib import contextmanager, nullcontext

from pipeline.config import ConfigError, RunConfig


def check_ray_address(address: str | None, timeout_s: float = 5) -> bool:
    """A Ray that does not answer fails in seconds, not after Ray's own retries (minutes). True when
    ray.init will start a Ray of this process's own."""
    from ray._private.services import get_ray_address_from_environment

    if address == "local":
        return True
    env = os.environ.get("RAY_ADDRESS")
    source = "RAY_ADDRESS" if env else "--address (ray_address)" if address not in (None, "auto") else \
        "the last `ray start` on this machine (ray_current_cluster in Ray's temp folder)"
    try:
        found = get_ray_address_from_environment(address, None)
    except ConnectionError:  # "auto" with no cluster: ray.init says so
        return False
    if found is None:
        return True
    host, _, port = found.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"Ray at {found} (from {source}) does not answer ({e.strerror or e}); start that cluster, "
                          "or pass --address local for a Ray of this process's own") from None
    return False


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_only():
    """While a Ray starts inside, its node IP is 127.0.0.1: every server of it listens on loopback
    only and no other machine can join it. Ray's own default on macOS and Windows
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); ray.init(_node_ip_address="127.0.0.1") swaps in the
    routable address instead. The processes Ray starts read the variable, this one its constant."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(LOCAL_ONLY)
    ray_constants.ENABLE_RAY_CLUSTER, os.environ[LOCAL_ONLY] = False, "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before[0]
        if before[1] is None:
            os.environ.pop(LOCAL_ONLY)
        else:
            os.environ[LOCAL_ONLY] = before[1]


def torch_config(backend: str):
    """Ray Train's torch process group, its rendezvous store listening on the master's address
    when that is loopback (torch's TCPStore listens on every interface): torch takes up the store
    this makes on that port (multi-tenant) instead of making its own. On a cluster, unchanged."""
    import ray.train.torch.config as ray_torch
    from ray.train._internal.utils import get_address_and_port
    from ray.train.torch import TorchConfig

    class LoopbackStoreBackend(ray_torch._TorchBackend):
        def on_start(self, worker_group, backend_config):
            ray_torch.get_address_and_port = address_and_store
            try:
                super().on_start(worker_group, backend_config)
            finally:
                ray_torch.get_address_and_port = get_address_and_port

    class LoopbackStoreConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackStoreBackend

    return LoopbackStoreConfig(backend=backend)


_STORES = []  # alive as long as the worker process


def address_and_store() -> tuple[str, int]:
    """On the Train worker of rank 0: its address and a free port, where a loopback address gets a
    TCPStore server listening there only."""
    from datetime import timedelta

    import torch.distributed as dist
    from ray.train._internal.utils import get_address_and_port

    address, port = get_address_and_port()
    if not ipaddress.ip_address(address).is_loopback:
        return address, port
    listener = socket.socket()
    listener.bind((address, 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    _STORES.append(dist.TCPStore(address, port, None, True, timedelta(minutes=30), wait_for_workers=False,
                                 multi_tenant=True, master_listen_fd=listener.detach()))
    return address, port


def init_ray(cfg: RunConfig, verbose: bool) -> None:
    import ray
    import ray.data

    # Ray's tqdm replaces builtins.print in the driver once a Ray Data bar reaches it; a print
    # that is not builtins.print no longer pickles (Tune pickles a sweep's callbacks).
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if ray.is_initialized():
        return
    starts_local = check_ray_address(cfg.ray_address)
    env = {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "ignore" if not verbose else "default"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    elif starts_local:  # NCCL's bootstrap sockets, on loopback like the rest (one machine: NVLink or SHM move the data)
        env["NCCL_SOCKET_IFNAME"] = os.environ.get("NCCL_SOCKET_IFNAME", "lo")
    with loopback_only() if starts_local else nullcontext():
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
