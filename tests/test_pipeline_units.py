"""Fast tests of configuration, scenarios, data loading errors and the metrics."""
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from models.methods import METHODS
from pipeline.config import ConfigError, RunConfig, changed_settings, config_from_dict, load_config
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
    assert cfg.fingerprint() != load_config(path, ["train.lr=1e-3", "model.num_experts=8", "loss.align=0",
                                                   "executor=local"]).fingerprint()


def test_a_method_forces_what_defines_it_and_leaves_its_strengths_settable():
    cfg = load_config(None, ["method=ewc", "loss.ewc=10", "loss.align=0"])
    assert cfg.loss.align == 0.0 and cfg.model.head == "cosine"  # ewc is cross-entropy on the cosine head
    assert cfg.loss.ewc == 10.0  # a sweep may choose it
    assert load_config(None, ["method=replay", "model.memory=50"]).model.memory == 50


@pytest.mark.parametrize("overrides, message", [
    (["method=ewc", "loss.align=0.5"], r"loss.align=0.5: method ewc fixes it at 0.0"),
    (["method=ranpac", "model.num_experts=8"],
     r"model.num_experts=8: method ranpac \(the ridge family\) does not read it; it reads model.projection$"),
    (["loss.ewc=10"], r"loss.ewc=10.0: method cmoe \(the cmoe family\) does not read it; it reads loss.align, "),
    (["method=simplecil", "loss.kd=2"], "it reads no model.\\* or loss.\\* key"),
])
def test_a_setting_the_method_would_drop_is_an_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_config_files_setting_the_method_does_not_read_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: cmoe\nmodel:\n  memory: 50\n")
    with pytest.raises(ConfigError, match=rf"{path}: model.memory=50: method cmoe .* does not read it"):
        load_config(path)


def test_a_bench_leaves_a_setting_out_of_the_methods_that_do_not_take_it_and_says_so():
    from pipeline.bench import report_ignored
    config_for = lambda m, *o: load_config(None, [*o, f"method={m}"], lenient=True)  # noqa: E731
    configs = {m: config_for(m, "loss.align=0") for m in ("cmoe", "finetune", "ranpac")}
    assert configs["cmoe"].loss.align == 0.0 and configs["ranpac"].ignored[0].startswith("loss.align: method ranpac")
    lines = []
    report_ignored(configs, lines.append)
    assert lines == [f"  ranpac: left at its own value, {configs['ranpac'].ignored[0]}"]
    with pytest.raises(ConfigError, match="model.memory: none of the methods cmoe, ranpac takes it"):
        report_ignored({m: config_for(m, "model.memory=5") for m in ("cmoe", "ranpac")}, lines.append)


def test_a_sweep_over_a_setting_the_method_does_not_take_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: finetune\nsweep:\n  space:\n    loss.kd: {grid: [0.5, 1.0]}\n")
    with pytest.raises(ConfigError, match=r"sweep.space.loss.kd: method finetune fixes it at 0.0: .*; a sweep over it"):
        load_sweep(str(path))
    path.write_text("sweep:\n  space:\n    method: {grid: [cmoe, ranpac]}\n    model.num_experts: {grid: [2, 4]}\n")
    with pytest.raises(ConfigError, match=r"sweep.space.model.num_experts: method ranpac \(the ridge family\)"):
        load_sweep(str(path))


def test_a_sweep_over_methods_gives_each_trial_the_users_values_not_the_base_methods(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: finetune\nmodel: {num_experts: 2}\n"
                    "sweep:\n  space:\n    method: {grid: [finetune, cmoe]}\n")
    cfg, _ = load_sweep(str(path))
    assert cfg.model.head == "cosine"  # finetune's own setting
    trial = config_from_dict(cfg.user_dict(), ["method=cmoe"])
    defaults = RunConfig()
    assert trial.model.head == defaults.model.head and trial.loss.kd == defaults.loss.kd
    assert trial.model.num_experts == 2  # what the user set carries over


def test_bench_keeps_the_config_files_executor_unless_one_is_typed(tmp_path, monkeypatch):
    import pipeline.bench
    from pipeline.cli import main
    seen = []
    monkeypatch.setattr(pipeline.bench, "run_bench", lambda config_for, methods, *a, **k: seen.append(
        config_for(methods[0]).executor) or {"seconds": 0})
    monkeypatch.setattr(pipeline.bench, "write_bench", lambda *a: ("x", "y"))
    monkeypatch.setattr(pipeline.bench, "markdown", lambda *a: "")
    path = tmp_path / "c.yaml"
    path.write_text("executor: local\n")
    main(["bench", "--config", str(path), "--methods", "cmoe", "--out", str(tmp_path / "b.json")])
    main(["bench", "--config", str(path), "--methods", "cmoe", "--out", str(tmp_path / "b.json"), "--executor", "ray"])
    assert seen == ["local", "ray"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "tune" / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_each_shipped_sweep_config_loads(path):
    cfg, sweep = load_sweep(str(path))
    assert sweep.space


VALIDATED = {"tuxpaint": "cmoe-one-adapter", "av-digits": "cmoe-no-align"}  # the ablation validation chose


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_benchmark_config_is_cmoe_with_the_settings_validation_chose(path):
    cfg = load_config(path)
    assert cfg.benchmark == path.stem and cfg.method == "cmoe"
    chosen = METHODS[VALIDATED[cfg.benchmark]]
    assert changed_settings(cfg) == {**{f"model.{k}": v for k, v in chosen.model.items()},
                                     **{f"loss.{k}": v for k, v in chosen.loss.items()}}


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
    column, values = sc.rows_of(sc.tasks[1], so_far=True)
    assert column == "domain" and sorted(values) == ["w", "x", "y", "z"]
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
