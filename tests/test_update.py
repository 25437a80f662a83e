"""A registered model's life with `mmcl update` alone: drops of mfeat arriving one at a time in a
watched folder (new classes, a new domain, a mislabelled drop the gate rejects, a broken file moved
aside), `mmcl serve` following @champion over HTTP, a rollback, the watcher killed mid-task and
started again, a changed earlier drop refused. The real MLflow registry (a SQLite store); the first
drop on the Ray Train path, the later ones in-process (the same recipe, quicker)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import kill_tree, served, start_model_server, stop_server
from pipeline.benchmarks import BENCHMARKS
from pipeline.cli import main
from pipeline.tracking import predict
from pipeline.update import GATE_FAILED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.projection=256", "train.epochs=2"]
MODALITIES = ["fou", "fac", "kar", "pix", "zer", "mor"]  # mfeat's six views


def of_labels(table: pa.Table, labels: list[int]) -> pa.Table:
    return table.filter(pc.is_in(table["label"], pa.array(labels, table["label"].type)))


def held_test_rows(path: Path, n: int) -> pa.Table:
    table = pq.read_table(path)
    return table.filter(pc.equal(table["split"], "test")).slice(0, n)


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


def test_a_model_learns_drops_as_they_arrive_gated_served_rolled_back_and_resumed(ray_local, tmp_path, capsys):
    drops, store = write_drops(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}"
    where, client = [f"output_dir={tmp_path}"], MlflowClient(store)
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def arrive(name: str, table: pa.Table) -> Path:
        """A drop written as a user's job would: under a hidden name, then renamed into place."""
        pq.write_table(table, inbox / f".{name}")
        return (inbox / f".{name}").rename(inbox / name)

    def answers_of(version: int) -> list[int]:
        """The server's predictions for the probe rows once it serves `version`, checked against the
        version loaded in-process."""
        for _ in range(60):
            got = served(url, probe, MODALITIES)
            if {a["model_version"] for a in got} == {version}:
                expected = predict(store, f"models:/digits/{version}", probe)["prediction"].tolist()
                assert [a["prediction"] for a in got] == expected
                return expected
            time.sleep(0.5)
        pytest.fail(f"the server did not move to version {version}: {got[:1]}")

    # The first drop starts the model, on the Ray Train path.
    out = tmp_path / "first.json"
    assert main(["update", "--new", "--model", "digits", "--data", str(drops["first"]), "--out", str(out),
                 *FAST, *where]) == 0
    first = json.loads(out.read_text())
    assert first["version"] == "1" and "now @champion" in capsys.readouterr().out
    probe = pa.concat_tables([held_test_rows(drops["first"], 20), held_test_rows(drops["second"], 30)]).to_pandas()
    server, url = start_model_server("digits", store)
    watcher = None
    try:
        assert set(answers_of(1)) <= {0, 1, 2, 3}

        # A watcher learns what arrives in the inbox; the server follows @champion to each new one.
        watch = [sys.executable, "-m", "pipeline.cli", "update", "--watch", str(inbox), "--model", "digits",
                 "--poll", "1", "executor=local", "gate.min_accuracy=0.8", *FAST, *where]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        watcher = subprocess.Popen(watch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        said = []

        def until(text: str) -> str:
            for line in watcher.stdout:
                said.append(line)
                if text in line:
                    return "".join(said)
            pytest.fail(f"the watcher stopped before '{text}':\n{''.join(said[-40:])}")

        arrive("02-second.parquet", pq.read_table(drops["second"]))
        until("02-second.parquet: digits version 2, now @champion")
        v2 = client.get_model_version("digits", "2")
        chain = json.loads(v2.tags["mmcl.drops"])
        assert [d["path"] for d in chain] == [str(drops["first"].resolve()), str(inbox / "02-second.parquet")]
        assert chain[0]["row"] == first["acc_matrix"][0]  # the first drop's row, as version 1 recorded it
        assert min(chain[1]["row"]) >= 0.9  # the second drop learnt, the first not forgotten
        assert v2.tags["mmcl.continued_from_version"] == "1"
        assert v2.tags["mmcl.data_fingerprint"] == chain[1]["fingerprint"]
        config = json.loads(v2.tags["mmcl.config"])  # the chain's, without where it ran
        assert config["model"]["projection"] == 256 and "executor" not in config and "output_dir" not in config
        two = answers_of(2)
        assert np.mean(np.array(two) == probe["label"].to_numpy()) >= 0.9  # classes 4-6 answered now

        # One known class and one new in a drop is refused by name, before anything is encoded.
        assert main(["update", "--model", "digits", "--data", str(drops["mixed"]), *where]) == 2
        assert "column label: classes [7] are new and [6] are learnt already" in capsys.readouterr().err

        # A mislabelled drop, given to `mmcl update` by hand: the gate keeps version 2.
        code = main(["update", "--model", "digits", "--data", str(drops["mislabelled"]), "executor=local",
                     "gate.min_accuracy=0.8", *FAST, *where])
        printed = capsys.readouterr().out
        assert code == GATE_FAILED and "version 3 (continued from version 2): kept as @challenger" in printed, printed
        assert "below gate.min_accuracy 0.800" in printed

        # In the inbox, a broken drop (moved aside) and a new domain of the known classes.
        broken = pq.read_table(drops["last"])
        views = broken["fou"].to_pylist()
        views[5] = views[5][:3]
        broken = broken.set_column(broken.schema.get_field_index("fou"), "fou", pa.array(views, pa.list_(pa.float32())))
        arrive("04-broken.parquet", broken)
        arrive("05-coarse.parquet", pq.read_table(drops["coarse"]))
        text = until("05-coarse.parquet: digits version 4, now @champion")
        assert "Task 3/3: domains ['coarse']" in text
        assert "04-broken.parquet: not learnt, moved to" in text and "column 'fou', row 5" in text
        assert (inbox / "rejected" / "04-broken.parquet").is_file() and not (inbox / "04-broken.parquet").exists()
        assert "column 'fou', row 5" in (inbox / "rejected" / "04-broken.parquet.why").read_text()
        assert client.get_registered_model("digits").aliases == {"champion": 4, "challenger": 3}
        v4 = client.get_model_version("digits", "4")
        assert v4.tags["mmcl.domains_seen"] == "coarse" and json.loads(v4.tags["mmcl.drops"])[2]["row"][2] >= 0.8

        # A rollback: the server answers with version 2 again, and `mmcl lineage` shows the aliases.
        answers_of(4)
        assert main(["rollback", "digits", "--to", "2", "--tracking-uri", store]) == 0
        assert main(["lineage", "digits", "--tracking-uri", store]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "digits@champion: version 4 -> version 2"
        assert lines[2].startswith("version 2 @champion:") and lines[3].startswith("version 3 @challenger:")
        assert answers_of(2) == two

        # The watcher killed mid-task: nothing registered; started again, it learns the drop once,
        # from the champion, and skips what the registry holds.
        arrive("06-last.parquet", pq.read_table(drops["last"]))
        until("Drop 06-last.parquet")
        until("epoch 1/2")
        kill_tree(watcher)
        assert len(client.search_model_versions("name = 'digits'")) == 4
        done = subprocess.run([*watch, "--once"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "06-last.parquet: digits version 5, now @champion" in done.stdout
        assert f"{inbox}: 1 drop(s) learnt, 0 moved to rejected/" in done.stdout
        assert len(client.search_model_versions("name = 'digits'")) == 5
        last = client.get_model_version("digits", "5")
        assert last.tags["mmcl.continued_from_version"] == "2"
        assert last.tags["mmcl.classes_seen"] == "0,1,2,3,4,5,6,7,8,9"
        answers_of(5)
    finally:
        stop_server(server)
        if watcher is not None and watcher.poll() is None:
            kill_tree(watcher)

    # An earlier drop that changed is named, and nothing is trained or registered.
    pq.write_table(pq.read_table(inbox / "02-second.parquet").slice(0, 100), inbox / "02-second.parquet")
    assert main(["update", "--model", "digits", "--data", str(drops["mixed"]), *where]) == 2
    assert f"drop 1 ({inbox / '02-second.parquet'}, learnt by version 2 of 'digits') has changed" in \
        capsys.readouterr().err
    assert len(client.search_model_versions("name = 'digits'")) == 5
