"""`mmcl update --watch DIR`: every Parquet file (or folder) that appears in DIR, in name order,
learnt as one update of the model's alias (`pipeline/update.py`). The registry is the watcher's
memory: a drop is done once any version's chain holds its fingerprint (a gated-out challenger's
too), so a watcher started again after a crash skips what was learnt and resumes what was not. A
drop that fails validation is moved to DIR/rejected/ with NAME.why beside it, and the watcher goes
on; an error that is not the drop's (the registry, the config, an earlier drop) stops it."""
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.data import DataError
from pipeline.tracking import data_fingerprint, open_client, parse_ref, tracking_uri
from pipeline.update import DROPS_TAG, ChainBroken, update_model

REJECTED = "rejected"


def arrivals(folder: Path) -> list[Path]:
    """DIR's drops in name order; names starting with . or _ are files still being written."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(".parquet") and not p.name.startswith((".", "_")))


def learnt(client, name: str) -> dict[str, str]:
    """fingerprint -> the version that learnt it, over every version of the model."""
    out = {}
    for v in client.search_model_versions(f"name = '{name}'"):
        drops = json.loads(v.tags.get(DROPS_TAG, "[]"))
        if drops:
            out[drops[-1]["fingerprint"]] = str(v.version)
    return out


def reject(path: Path, folder: Path, why: str) -> Path:
    """Moves the drop to DIR/rejected/ (a new name if one is there) and writes why beside it."""
    target = folder / REJECTED / path.name
    target.parent.mkdir(exist_ok=True)
    n = 1
    while target.exists():
        target, n = target.with_name(f"{path.stem}.{n}{path.suffix}"), n + 1
    shutil.move(str(path), target)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    target.with_name(target.name + ".why").write_text(f"{stamp} {path}\n{why}\n")
    return target


def watch(ref: str, folder: str, user: RunConfig, config_path: str | None = None, overrides: list[str] = (),
          kind: str | None = None, new: bool = False, verbose: bool = False, poll_s: float = 10,
          once: bool = False, log=print) -> list[dict]:
    """Learns DIR's drops as they come (until interrupted; with `once`, those there now). Returns
    each update's result."""
    name, alias, version = parse_ref(ref)
    if version is not None:
        raise ConfigError(f"--model {ref}: --watch follows an alias (NAME or NAME@ALIAS); each drop continues "
                          "the version the alias names when it arrives")
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--watch {folder}: not a folder")
    client = open_client(tracking_uri(user))
    sizes, fingerprints, results, rejected = {}, {}, [], 0
    if not once:
        log(f"Watching {root} for drops of {name} (every {poll_s:g} s; Ctrl-C stops)", flush=True)
    while True:
        done = learnt(client, name)
        for path in arrivals(root):
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if not once and sizes.get(path) != key[1:]:
                sizes[path] = key[1:]  # taken at the next look if it stays the same
                continue
            try:
                if key not in fingerprints:  # read once per version of the file, not at every look
                    fingerprints[key] = data_fingerprint(path)
            except OSError as e:
                log(f"{path.name}: unreadable, moved to {reject(path, root, str(e))}", flush=True)
                rejected += 1
                continue
            if fingerprints[key] in done:
                continue
            start = not done and new
            log(f"\nDrop {path.name}: " + ("starting model " + name if start else f"updating {name}@{alias}"),
                flush=True)
            try:
                result = update_model(name if start else ref, str(path), user, config_path, overrides, kind, start,
                                      verbose, log)
            except ChainBroken:
                raise
            except DataError as e:
                log(f"{path.name}: not learnt, moved to {reject(path, root, str(e))} (.why beside it):\n{e}",
                    flush=True)
                rejected += 1
                continue
            gate = result["gate"]
            log(f"{path.name}: {name} version {result['version']}, "
                + ("now @champion" if gate["passed"] else "kept as @challenger: " + "; ".join(gate["failures"])),
                flush=True)
            results.append(result)
            done = learnt(client, name)
        if once:
            log(f"{root}: {len(results)} drop(s) learnt, {rejected} moved to {REJECTED}/", flush=True)
            return results
        time.sleep(poll_s)
