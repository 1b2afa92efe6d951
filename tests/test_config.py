"""Tests of config names and formats (reference/config.py, verify/settings.py): flat and
dotted field names, a field named twice, ambiguous flat names, and version-1 (flat)
config dicts read into the grouped config. No training here."""

import json
import os

import pytest

from reference import config
from reference.config import (AnalysisConfig, BaselineConfig, ConfigError, DataConfig, EvalConfig, ModelConfig,
                              OptimConfig, TrainConfig, config_from_dict, field_path, flat_names)
from verify.experiments import EXPERIMENTS
from verify.settings import apply_overrides, parse_set_args

FIXTURE_V1_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "run-v1", "config.json")


def test_flat_names_are_unique_and_every_field_has_a_dotted_name():
    names = flat_names()
    assert len(names) == len(set(names))
    assert field_path("lr") == field_path("optim.lr") == ("optim", "lr")
    assert field_path("steps") == ("steps",) and field_path("eval.eval_tasks") == ("eval", "eval_tasks")
    with pytest.raises(ConfigError, match="unknown config field 'data.lr'"):
        field_path("data.lr")                          # lr exists, but not in that group


def test_set_with_a_dotted_name_equals_the_flat_name():
    base = EXPERIMENTS["one_layer"].config
    dotted = apply_overrides(base, parse_set_args(["optim.lr=5e-4", "data.N=7", "model.token_clip=none"]))
    flat = apply_overrides(base, parse_set_args(["lr=5e-4", "N=7", "token_clip=none"]))
    assert dotted == flat != base
    assert (flat.optim.lr, flat.data.N, flat.model.token_clip) == (5e-4, 7, None)
    assert flat.get("lr") == flat.get("optim.lr") == 5e-4


def test_cli_accepts_flat_and_dotted_set_alike(tmp_path, capsys):
    from verify import cli

    printed = []
    for name in ("lr", "optim.lr"):
        assert cli.main(["train", "one_layer", "--set", f"{name}=5e-4", "--set", "backend=numpy",
                         "--out", str(tmp_path / "r"), "--dry-run"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "* lr" in printed[0] and "= 0.0005" in printed[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("pairs", [["lr=1e-3", "optim.lr=2e-3"], ["optim.lr=1e-3", "lr=1e-3"],
                                   ["data.d=4", "d=4"]])
def test_one_field_named_twice_is_refused(pairs):
    base = EXPERIMENTS["one_layer"].config
    with pytest.raises(ConfigError, match="given twice"):
        apply_overrides(base, parse_set_args(pairs))


def test_cli_refuses_one_field_named_twice(tmp_path, capsys):
    from verify import cli

    assert cli.main(["train", "one_layer", "--set", "lr=1e-3", "--set", "optim.lr=2e-3", "--out",
                     str(tmp_path / "r"), "--dry-run"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_an_ambiguous_flat_name_is_refused_naming_the_candidates(monkeypatch):
    base = EXPERIMENTS["one_layer"].config
    monkeypatch.setattr(config, "LEAVES", {**config.LEAVES, ("baselines", "lr"): float})
    with pytest.raises(ConfigError, match=r"'lr' is ambiguous: it names optim\.lr, baselines\.lr"):
        field_path("lr")
    with pytest.raises(ConfigError, match=r"ambiguous.*optim\.lr, baselines\.lr.*use the dotted name"):
        apply_overrides(base, {"lr": "1e-3"})
    assert field_path("optim.lr") == ("optim", "lr") and field_path("baselines.lr") == ("baselines", "lr")
    assert field_path("gdpp_lr") == ("baselines", "gdpp_lr")      # unambiguous names still resolve


def test_a_flat_version_1_config_loads_into_its_grouped_form():
    """The fixture's config.json was written (flat) by the code before the split."""
    with open(FIXTURE_V1_CONFIG) as f:
        flat = json.load(f)
    assert "lr" in flat and "optim" not in flat
    expected = TrainConfig(experiment="one_layer", seed=0, steps=20, dtype="float32", backend="numpy",
                           data=DataConfig(d=3, N=5, batch=64),
                           model=ModelConfig(n_layers=1, init_scale=0.002),
                           optim=OptimConfig(lr=1e-3, b2=0.98, grad_clip=0.001),
                           eval=EvalConfig(eval_tasks=200, eval_every=10, checkpoint_every=10),
                           baselines=BaselineConfig(line_search_tasks=200, gdpp_steps=5, gdpp_batch=32),
                           analysis=AnalysisConfig(ood_tasks=20, rollout_steps=3))
    assert config_from_dict(flat) == expected
    assert config_from_dict({**flat, "format_version": 1}) == expected
    grouped = {"format_version": 2, "experiment": "one_layer", "steps": 20, "backend": "numpy",
               "data": {"d": 3, "N": 5, "batch": 64},
               "eval": {"eval_tasks": 200, "eval_every": 10, "checkpoint_every": 10},
               "baselines": {"line_search_tasks": 200, "gdpp_steps": 5, "gdpp_batch": 32},
               "analysis": {"ood_tasks": 20, "rollout_steps": 3}}
    assert config_from_dict(grouped) == expected
    assert config_from_dict(json.loads(expected.to_json())) == expected


@pytest.mark.parametrize("d, match", [
    ({"lrr": 0.1}, r"unknown config field\(s\) \['lrr'\]"),
    ({"optim": {"lrr": 0.1}}, r"unknown config field\(s\) \['optim.lrr'\]"),
    ({"optim": {"lr": 1e-3}, "extra": 1}, r"unknown config field\(s\) \['extra'\]"),
    ({"lr": -1.0}, "lr: must be > 0"),
    ({"optim": {"lr": "fast"}}, "lr: expected float"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_config_dicts_are_refused(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)
