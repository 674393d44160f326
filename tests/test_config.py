"""``--set key=value`` parsing against the config dataclasses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from couplings.config import ConfigError, TrainConfig, apply_overrides, split_overrides
from couplings.models import NICEConfig


def test_split_overrides_sorts_model_train_and_size():
    size, model, train = split_overrides(
        ["size=small", "hidden_units=64", "lr=3e-4", "max_steps=none", "betas=0.8,0.9", "prior=gaussian"], NICEConfig
    )
    assert size == "small"
    assert model == {"hidden_units": 64, "prior": "gaussian"}
    assert train == {"lr": 3e-4, "max_steps": None, "betas": (0.8, 0.9)}


@pytest.mark.parametrize(
    "pair, message",
    [
        ("hidden_unit=64", "unknown key 'hidden_unit'"),
        ("hidden_units=abc", "hidden_units: expected an integer, found 'abc'"),
        ("hidden_units=1.5", "expected an integer"),
        ("lr=fast", "lr: expected a number"),
        ("betas=0.9", "expected 2 comma-separated values"),
        ("hidden_units", "expected key=value"),
        ("=3", "expected key=value"),
    ],
)
def test_bad_overrides_are_errors(pair, message):
    with pytest.raises(ConfigError, match=message):
        split_overrides([pair], NICEConfig)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"dataset": "cifar10"}, "dataset must be one of"),
        ({"lr": -1.0}, "lr > 0"),
        ({"max_minutes": 0.0}, "max_minutes must be > 0"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_train_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), overrides)


def test_model_config_validation():
    with pytest.raises(ConfigError, match="hidden_units must be >= 1, found 0"):
        apply_overrides(NICEConfig(), {"hidden_units": 0})
    with pytest.raises(ConfigError, match="prior must be"):
        apply_overrides(NICEConfig(), {"prior": "cauchy"})


@given(st.text(max_size=30))
def test_fuzzed_overrides_raise_only_config_errors(text):
    try:
        size, model, train = split_overrides([text], NICEConfig)
    except ConfigError:
        return
    assert "=" in text
