"""Each registry is the one list of its components: the CLI offers what it holds, the docs list it,
and every benchmark in it builds a table the validator accepts. (av-digits reads FSDD from
$MMCL_FSDD_DIR, or data/fsdd: a clone of https://github.com/Jakobovski/free-spoken-digit-dataset.)"""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.encoders import ENCODERS
from models.methods import METHODS
from pipeline.benchmarks import BENCHMARKS
from pipeline.cli import main
from pipeline.converters import CONVERTERS
from pipeline.data import LABELS_METADATA, DataError, validate_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_list_every_registered_component():
    readme, data_md = (ROOT / "README.md").read_text(), (ROOT / "docs" / "data.md").read_text()
    assert [m for m in METHODS if f"`{m}`" not in readme] == []
    assert [f.spec for f in ENCODERS.values() if f"`{f.spec.replace('[:WEIGHTS]', '')}" not in data_md] == []
    assert [b for b in BENCHMARKS if f"**{b}**" not in data_md] == []
    assert [c for c in CONVERTERS if f"mmcl data convert {c} " not in data_md] == []


@pytest.mark.parametrize("command, registry", [(["data", "build"], BENCHMARKS), (["data", "convert"], CONVERTERS)])
def test_the_cli_offers_what_the_registry_holds(command, registry, capsys):
    with pytest.raises(SystemExit):
        main([*command, "no-such-thing", "x"])
    assert f"choose from {', '.join(map(repr, registry))}" in capsys.readouterr().err


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_builds_a_valid_table(name, tmp_path):
    out = tmp_path / f"{name}.parquet"
    try:
        assert BENCHMARKS[name](out) == out
    except DataError as e:
        pytest.skip(str(e))  # its source data is not on this machine (the message says how to get it)
    table = pq.read_table(out)
    assert [p for p in validate_table(table, str(out)) if p.level == "error"] == []
    names = json.loads(table.schema.metadata[LABELS_METADATA])
    assert {names[label] for label in table["label"].to_pylist()} == set(table["label_name"].to_pylist())
