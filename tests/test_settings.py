"""RunSettings (surm.settings): the one type behind every command's run flags, validated once."""

from __future__ import annotations

import dataclasses

import pytest

from surm.cli import build_parser, settings_from_args
from surm.settings import RunSettings, setting_defaults, setting_types


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
    ({"max_length": True}, "max_length must be a positive integer, got True"),
    ({"train_size": 0}, "train_size must be a positive integer or None, got 0"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"lr": float("nan")}, "lr must be a positive number, got nan"),
    ({"head_lr": float("inf")}, "head_lr must be a positive number, got inf"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\), got 1.0"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be a positive number or None, got 0.0"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm must be a positive number or None, got nan"),
    ({"model_dropout": 1.0}, r"model_dropout must be in \[0, 1\) or None, got 1.0"),
    ({"model_dropout": -0.1}, r"model_dropout must be in \[0, 1\) or None, got -0.1"),
    ({"model_dropout": True}, r"model_dropout must be in \[0, 1\) or None, got True"),
    ({"device": "gpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"device": "cuda:x"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
    ({"model": ""}, "model must be a non-empty string, got ''"),
    ({"text_pair_column": ""}, "text_pair_column must be a non-empty string or None, got ''"),
    ({"pooling": "max"}, "pooling 'max' is not one of auto, model, mean"),
])
def test_bad_settings_are_refused_naming_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        RunSettings(**changes)


def test_settings_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunSettings().epochs = 5


def test_flags_give_back_the_same_settings():
    """to_flags (what compare passes to its runs) parsed by the command line is the same settings object."""
    settings = RunSettings(model="minilm", dataset="trec", text_pair_column="b", epochs=5, batch_size=8, lr=3e-4,
                           head_lr=2e-3, weight_decay=0.01, warmup_ratio=0.1, max_length=32, train_size=100,
                           eval_size=50, device="cpu", seed=4, pooling="mean", max_grad_norm=1.0,
                           model_dropout=0.0)
    args = build_parser().parse_args(["finetune", "--output", "x", *settings.to_flags()])
    assert settings_from_args(args) == settings
    assert RunSettings().to_flags() == []
    assert RunSettings().to_flags(always=("seed",)) == ["--seed", "0"]
    assert "--lr" not in settings.to_flags(exclude=("lr",))


def test_every_setting_is_a_flag_of_finetune_search_and_compare_but_the_seed_of_compare():
    defaults = setting_defaults()
    assert set(defaults) == set(setting_types()) == {f.name for f in dataclasses.fields(RunSettings)}
    for command, extra in (("finetune", ["--output", "x"]), ("search", ["--output", "x", "--budget-params", "1"]),
                           ("compare", [])):
        args = vars(build_parser().parse_args([command, *extra]))
        expected = set(defaults) - ({"seed"} if command == "compare" else set())
        assert {k: args[k] for k in expected} == {k: defaults[k] for k in expected}
