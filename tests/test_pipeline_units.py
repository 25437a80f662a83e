"""Fast tests of configuration, scenarios, data loading errors and the metrics."""
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, load_data
from pipeline.driver import hold_out_validation
from pipeline.evaluate import summarize
from pipeline.scenario import make_scenario
from tune.sweep import load_sweep


def test_config_file_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("scenario: domain-il\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=1e-3", "model.num_experts=8", "loss.align=0"])
    assert cfg.scenario == "domain-il" and cfg.train.epochs == 3
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.model.num_experts == 8 and cfg.loss.align == 0.0
    assert cfg.fingerprint() != load_config(path).fingerprint()
    assert cfg.fingerprint() == load_config(path, ["train.lr=1e-3", "model.num_experts=8", "loss.align=0",
                                                   "output_dir=elsewhere"]).fingerprint()


def test_a_method_forces_what_defines_it_and_leaves_its_strengths_settable():
    cfg = load_config(None, ["method=ewc", "loss.align=0.5", "loss.ewc=10", "model.memory=50"])
    assert cfg.loss.align == 0.0 and cfg.model.head == "cosine"  # ewc is cross-entropy on the cosine head
    assert cfg.loss.ewc == 10.0 and cfg.model.memory == 50  # a sweep may choose these


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "tune" / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_each_shipped_sweep_config_loads(path):
    cfg, sweep = load_sweep(str(path))
    assert sweep.space and cfg.executor == "local"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'epoch'"),
    ("train.lr=fast", "'lr' must be a number"),
    ("scenario=task-il", "scenario must be"),
    ("model.top_k=9", "top_k"),
    ("train.lr=-0.5", "train.lr must be above 0, not -0.5"),
    ("train.batch_size=0", "train.batch_size must be at least 1, not 0"),
    ("train.epochs=2.9", "'epochs' must be a whole number, not 2.9"),
    ("model.dropout=1", "model.dropout must be at least 0 and below 1"),
    ("model.head=ridge", "model.head must be one of analytic, cosine"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_class_il_splits_a_seeded_class_order_into_disjoint_tasks():
    labels = np.repeat(np.arange(10), 3)
    sc = make_scenario("class-il", labels, np.array(["d"] * 30), 5, seed=1)
    assert sorted(c for t in sc.tasks for c in t.classes) == list(range(10))
    assert [len(t.classes) for t in sc.tasks] == [2] * 5
    assert sc.class_order == [c for t in sc.tasks for c in t.classes]
    assert sc.head_size_after(2) == 6
    assert make_scenario("class-il", labels, labels, 5, seed=2).class_order != sc.class_order


def test_domain_il_tasks_follow_the_domain_column():
    labels = np.tile(np.arange(3), 4)
    domains = np.repeat(["w", "x", "y", "z"], 3)
    sc = make_scenario("domain-il", labels, domains, 2, seed=0)
    assert sorted(d for t in sc.tasks for d in t.domains) == ["w", "x", "y", "z"]
    assert sc.head_size_after(0) == 3
    assert sc.task_mask(sc.tasks[0], labels, domains).sum() == 6
    with pytest.raises(ValueError, match="only 4 domains"):
        make_scenario("domain-il", labels, domains, 5, seed=0)


def test_validation_holds_out_whole_groups_and_about_the_fraction_of_each_class():
    labels = np.repeat(np.arange(4), 60)
    groups = np.array([f"img{i // 3}" for i in range(240)])  # each image paired with 3 rows of its class
    split = np.array(["train", "train", "train", "test"] * 60)
    ids = np.array([f"s{i}" for i in range(240)])
    out, held_out = hold_out_validation(split, labels, ids, 0.2, groups)
    assert (out[split == "test"] == "test").all()
    val, train = set(groups[out == "val"]), set(groups[out == "train"])
    assert val and not val & train
    for c in range(4):
        assert 6 <= ((out == "val") & (labels == c)).sum() <= 9  # 20% of 45 train rows, in whole groups
    assert sorted(held_out) == sorted(ids[out == "val"])
    assert (hold_out_validation(split, labels, ids, 0.2, groups)[0] == out).all()  # seeded


def test_summary_metrics_on_a_hand_made_matrix():
    m = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 1.0]]
    s = summarize(m)
    assert s["avg_acc"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert s["avg_inc_acc"] == pytest.approx((0.9 + 0.7 + (2.2 / 3)) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert s["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_missing_and_malformed_files_fail_with_their_name(tmp_path, capsys):
    with pytest.raises(DataError, match="data file not found: .*nope.parquet"):
        load_data(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet"):
        load_data(junk)
    assert main(["run", "--data", str(junk), f"output_dir={tmp_path}"]) == 2
    assert "junk.parquet: not a readable Parquet" in capsys.readouterr().err
