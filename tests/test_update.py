"""A registered model's life with `mmcl update` alone: drops of mfeat arriving one at a time (new
classes, a new domain, a mislabelled drop the gate rejects), a rollback, a changed earlier drop
refused, and an update killed mid-task and rerun. The real MLflow registry (a SQLite store); the
first drop on the Ray Train path, the later ones in-process (the same recipe, quicker)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import kill_tree
from pipeline.benchmarks import BENCHMARKS
from pipeline.cli import main
from pipeline.update import GATE_FAILED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.projection=256", "train.epochs=2"]


def of_labels(table: pa.Table, labels: list[int]) -> pa.Table:
    return table.filter(pc.is_in(table["label"], pa.array(labels, table["label"].type)))


def write_drops(folder: Path) -> dict[str, Path]:
    """mfeat's classes 0-3, 4-6 and 7-9; classes 0-6 in the 'coarse' domain of mfeat-domains (its
    views stored as lists, not fixed-size lists); classes 7-8 with their labels shuffled; 6 and 7."""
    mfeat, domains = BENCHMARKS["mfeat"](folder / "mfeat.parquet"), BENCHMARKS["mfeat-domains"](folder / "d.parquet")
    table, shifted = pq.read_table(mfeat), pq.read_table(domains)
    coarse = of_labels(shifted.filter(pc.equal(shifted["domain"], "coarse")), list(range(7)))
    coarse = coarse.set_column(0, "sample_id", pc.binary_join_element_wise("coarse-", coarse["sample_id"], ""))
    bad = of_labels(table, [7, 8])
    shuffled = np.random.default_rng(0).permutation(bad["label"].to_numpy())
    bad = bad.set_column(bad.schema.get_field_index("label"), "label", pa.array(shuffled, bad["label"].type))
    bad = bad.set_column(bad.schema.get_field_index("label_name"), "label_name", pa.array(shuffled.astype(str)))
    drops = {"first": of_labels(table, [0, 1, 2, 3]), "second": of_labels(table, [4, 5, 6]), "coarse": coarse,
             "mislabelled": bad, "last": of_labels(table, [7, 8, 9]), "mixed": of_labels(table, [6, 7])}
    for name, t in drops.items():
        pq.write_table(t, folder / f"{name}.parquet")
    return {name: folder / f"{name}.parquet" for name in drops}


def test_a_model_learns_drops_as_they_arrive_gated_rolled_back_and_resumed(ray_local, tmp_path, capsys):
    drops, store = write_drops(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = [f"output_dir={tmp_path}"]

    def update(*args: str) -> tuple[int, dict, str]:
        out = tmp_path / "r.json"
        out.unlink(missing_ok=True)
        code = main(["update", "--out", str(out), *args, *FAST, *where])
        printed = capsys.readouterr()
        return code, json.loads(out.read_text()) if out.exists() else {}, printed.out + printed.err

    client = MlflowClient(store)
    code, first, printed = update("--new", "--model", "digits", "--data", str(drops["first"]))
    assert code == 0 and first["version"] == "1" and "now @champion" in printed, printed
    code, second, printed = update("--model", "digits", "--data", str(drops["second"]), "executor=local")
    assert code == 0 and second["continued_from"] == "1" and second["version"] == "2", printed
    matrix = second["acc_matrix"]
    assert matrix[0] == [first["acc_matrix"][0][0], None]  # the first drop's row, as version 1 recorded it
    assert matrix[1][0] >= 0.9 and matrix[1][1] >= 0.9  # the second drop learnt, the first not forgotten
    v2 = client.get_model_version("digits", "2")
    chain = json.loads(v2.tags["mmcl.drops"])
    assert [d["path"] for d in chain] == [str(drops["first"].resolve()), str(drops["second"].resolve())]
    assert v2.tags["mmcl.continued_from_version"] == "1" and v2.tags["mmcl.data"] == str(drops["second"].resolve())
    assert v2.tags["mmcl.data_fingerprint"] == chain[1]["fingerprint"] and chain[1]["row"] == matrix[1]
    assert json.loads(v2.tags["mmcl.config"])["executor"] == "local"

    # A bad drop: its new classes are not learnt (shuffled labels), the gate keeps version 2.
    code, rejected, printed = update("--model", "digits", "--data", str(drops["mislabelled"]), "gate.min_accuracy=0.8")
    assert code == GATE_FAILED and rejected["version"] == "3" and not rejected["gate"]["passed"], printed
    assert "below gate.min_accuracy 0.800" in printed and "@challenger" in printed
    assert client.get_registered_model("digits").aliases == {"champion": 2, "challenger": 3}

    # A new domain of the known classes, from the champion.
    code, domain, printed = update("--model", "digits", "--data", str(drops["coarse"]), "--scenario", "domain-il")
    assert code == 0 and domain["continued_from"] == "2" and domain["version"] == "4", printed
    assert "Task 3/3: domains ['coarse']" in printed and domain["acc_matrix"][2][2] >= 0.8
    assert client.get_model_version("digits", "4").tags["mmcl.domains_seen"] == "coarse"

    assert main(["rollback", "digits", "--to", "2", "--tracking-uri", store]) == 0
    assert main(["lineage", "digits", "--tracking-uri", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "digits@champion: version 4 -> version 2"
    assert lines[2].startswith("version 2 @champion:") and lines[3].startswith("version 3 @challenger:")

    # An earlier drop that changed is named, and nothing is trained or registered.
    kept = drops["second"].read_bytes()
    pq.write_table(pq.read_table(drops["second"]).slice(0, 100), drops["second"])
    code, _, printed = update("--model", "digits", "--data", str(drops["last"]))
    assert code == 2 and f"drop 1 ({drops['second'].resolve()}, learnt by version 2 of 'digits') has changed" in printed
    drops["second"].write_bytes(kept)
    code, _, printed = update("--model", "digits", "--data", str(drops["mixed"]))  # one known class, one new
    assert code == 2 and "column label: classes [7] are new and [6] are learnt already" in printed, printed
    assert len(client.search_model_versions("name = 'digits'")) == 4

    # Killed mid-task: nothing registered; the rerun learns the drop once, from the champion.
    args = [sys.executable, "-m", "pipeline.cli", "update", "--model", "digits", "--data", str(drops["last"]),
            "executor=local", "model.projection=256", "train.epochs=3", *where]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 1/3" in line:
            kill_tree(proc)
            break
    assert len(client.search_model_versions("name = 'digits'")) == 4
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "version 5 (continued from version 2)" in done.stdout, done.stdout + done.stderr
    assert len(client.search_model_versions("name = 'digits'")) == 5
    last = client.get_model_version("digits", "5")
    assert last.tags["mmcl.classes_seen"] == "0,1,2,3,4,5,6,7,8,9"
    assert client.get_registered_model("digits").aliases["champion"] == 5
