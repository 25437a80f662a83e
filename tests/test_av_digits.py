"""Image + audio end to end: av-digits built from FSDD, encoded once by the Ray Data actor pool
into the feature cache, trained with Ray Train + DeepSpeed; a second run reads the cache."""
import json

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import served, start_model_server, stop_server
from models.encoders import create_encoder
from pipeline.benchmarks.av_digits import build_av_digits
from pipeline.cache import cache_key, list_entries
from pipeline.cli import main
from pipeline.data import read_manifest

pytestmark = pytest.mark.slow


def small_av_digits(tmp_path):
    """Two speakers, 5 test and 5 train recordings per digit each: 400 rows."""
    full = build_av_digits(tmp_path / "full.parquet", max_index=10)
    table = pq.read_table(full)
    table = table.filter(pc.is_in(table["domain"], value_set=pc.cast(["jackson", "theo"], "string")))
    pq.write_table(table, tmp_path / "small.parquet")
    return tmp_path / "small.parquet", table


def test_av_digits_through_the_feature_cache_and_ray_train(ray_local, tmp_path, capsys):
    data, table = small_av_digits(tmp_path)
    out_dir = tmp_path / "runs"
    args = ["run", "--data", str(data), "--tasks", "2", "train.epochs=3", "model.projection=256",
            f"output_dir={out_dir}"]
    assert main([*args, "--scenario", "class-il", "--out", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert f"Features: encoding {table.num_rows} rows (image: efficientnet_lite0, audio: speech_embedding)" in printed

    entries = list_entries(out_dir / "cache")
    assert len(entries) == 1
    manifest = read_manifest(entries[0]["folder"])
    assert manifest["rows"] == table.num_rows
    assert {m: (e["dim"], e["tokens"]) for m, e in manifest["modalities"].items()} == {"image": (1280, 4),
                                                                                       "audio": (96, 4)}
    features = pq.read_table(entries[0]["folder"]).sort_by("sample_id")
    assert features.schema.field("image").type.list_size == 4 * 1280
    # The cache holds exactly what the encoder gives for a row.
    row = table.sort_by("sample_id").slice(0, 1)
    expected = create_encoder("speech_embedding").encode(row["audio"].to_pylist()).reshape(-1)
    assert features["audio"][0].values.to_numpy() == pytest.approx(expected, abs=1e-5)

    result = json.loads((tmp_path / "c.json").read_text())
    # 50 training rows per task: well above chance (0.2 among 5 classes; 150 test rows, s.e. 0.04).
    assert result["acc_matrix"][0][0] > 0.35 and result["acc_matrix"][1][1] > 0.35
    assert set(result["avg_acc_only"]) == {"image", "audio"}
    version = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}").get_model_version("small-class-il-cmoe", "2")
    assert version.tags["mmcl.features"] == entries[0]["folder"]

    # The registered model takes raw images and audio: it encodes them with its own encoders.
    test_rows = table.filter(pc.equal(table["split"], "test")).slice(0, 60)
    pq.write_table(test_rows.drop(["label"]), tmp_path / "raw.parquet")
    assert main(["predict", "--model-uri", "models:/small-class-il-cmoe/2", "--input", str(tmp_path / "raw.parquet"),
                 "--out", str(tmp_path / "p.csv"), "--tracking-uri", f"sqlite:///{out_dir / 'mlflow.db'}"]) == 0
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert predicted["sample_id"].tolist() == test_rows["sample_id"].to_pylist()
    assert (predicted["prediction"].to_numpy() == test_rows["label"].to_numpy()).mean() > 0.35
    # Over HTTP, the raw images and audio as JSON carries them (base64), the same answers.
    server, url = start_model_server("small-class-il-cmoe/2", f"sqlite:///{out_dir / 'mlflow.db'}")
    try:
        answers = served(url, test_rows.to_pandas(), ["image", "audio"])
    finally:
        stop_server(server)
    assert [a["prediction"] for a in answers] == predicted["prediction"].tolist()
    assert {a["model_version"] for a in answers} == {2}

    # Domain-IL over the two speakers: the same encoders and data, so the cache is read, not rebuilt
    # (in-process: the cache's reading is the point here).
    assert main([*args, "executor=local", "--scenario", "domain-il", "--out", str(tmp_path / "d.json")]) == 0
    printed = capsys.readouterr().out
    assert f"Features: cache hit {entries[0]['folder']}" in printed and "Features: encoding" not in printed
    assert read_manifest(entries[0]["folder"])["created"] == manifest["created"]
    assert json.loads((tmp_path / "d.json").read_text())["scenario"] == "domain-il"
    domain_versions = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}").search_model_versions(
        "name = 'small-domain-il-cmoe'")
    assert sorted(int(v.version) for v in domain_versions) == [1, 2]  # its own chain, not the class-IL model's

    # `mmcl cache build` finds the entry; a changed encoder setting would be another (its key), and
    # `mmcl cache clear` removes them all.
    assert main(["cache", "build", "--data", str(data), f"output_dir={out_dir}"]) == 0
    assert f"Features: cache hit {entries[0]['folder']}" in capsys.readouterr().out
    specs = {m: e["encoder"]["spec"] for m, e in manifest["modalities"].items()}
    assert cache_key(manifest["source_fingerprint"], specs, 4)[0] == manifest["key"]
    assert cache_key(manifest["source_fingerprint"], specs, 2)[0] != manifest["key"]
    assert main(["cache", "clear", "--dir", str(out_dir / "cache")]) == 0
    assert list_entries(out_dir / "cache") == []
