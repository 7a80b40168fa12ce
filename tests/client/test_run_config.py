"""The run config: the pyproject defaults are valid and bad values are refused by key."""

from __future__ import annotations

import dataclasses

import pytest

from client.run_config import RunConfig
from simulations.federation import app_defaults, resolve_run_config


def test_pyproject_defaults_match_the_dataclass():
    assert RunConfig.from_mapping(app_defaults()) == RunConfig()
    assert app_defaults() == RunConfig().to_mapping() | {"learning-rate": 0.0, "pretrain-learning-rate": 0.0}  # 0: the task's own


def test_each_task_takes_its_own_default_unless_the_run_names_one():
    assert resolve_run_config('task="generate"').learning_rate == 0.0003
    assert resolve_run_config('task="classify"').learning_rate == 0.003
    assert resolve_run_config('task="classify" learning-rate=0.1').pretrain_learning_rate == 0.001
    assert resolve_run_config('task="generate" learning-rate=0.01').learning_rate == 0.01
    assert resolve_run_config('task="enhance" task-defaults.enhance.learning-rate=0.002').learning_rate == 0.002
    with pytest.raises(ValueError, match="task-defaults.enhance.momentum"):
        resolve_run_config("task-defaults.enhance.momentum=0.9")
    with pytest.raises(ValueError, match="task-defaults.generate.learning-rate"):
        resolve_run_config("task-defaults.generate.learning-rate=0")


def test_overrides_are_parsed_like_flower_does():
    config = resolve_run_config('num-server-rounds=3 partition="dirichlet" dirichlet-alpha=0.1 dp=false')
    assert (config.num_server_rounds, config.partition, config.dirichlet_alpha, config.dp) == (3, "dirichlet", 0.1, False)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"partition": "random"}, "partition"),
        ({"model": "resnet"}, "model"),
        ({"learning-rate": "fast"}, "learning-rate"),
        ({"numserver-rounds": 3}, "numserver-rounds"),
        ({"target-epsilon": 0.0}, "target-epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"max-grad-norm": -1.0}, "max-grad-norm"),
        ({"noise-multiplier": -0.5}, "noise-multiplier"),
        ({"update-clip-norm": 0.0}, "update-clip-norm"),
        ({"grad-sample-mode": "ghost"}, "grad-sample-mode"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"aggregation": "median", "server-noise-multiplier": 1.0}, "aggregation"),
        ({"resume": True}, "resume"),
        ({"round-timeout": 0.0}, "round-timeout"),
        ({"ema-decay": 1.0}, "ema-decay"),
        ({"ema-decay": -0.1}, "ema-decay"),
    ],
)
def test_bad_values_are_refused_naming_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        RunConfig.from_mapping(values)
