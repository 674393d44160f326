"""``--set key=value`` parsing against the config dataclasses."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from couplings.config import ConfigError, PixelTrainConfig, TrainConfig, apply_overrides, split_overrides
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
        ("lr=nan", "lr: expected a finite number, found 'nan'"),
        ("grad_clip=1e400", "grad_clip: expected a finite number"),
        ("size=", "size: expected a value after '='"),
        ("hidden_units= ", "hidden_units: expected a value after '='"),
    ],
)
def test_bad_overrides_are_errors(pair, message):
    with pytest.raises(ConfigError, match=message):
        split_overrides([pair], NICEConfig)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": -1.0}, "lr > 0"),
        ({"max_minutes": 0.0}, "max_minutes must be > 0"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"lr": math.inf}, "lr > 0"),
        ({"weight_decay": math.nan}, "weight_decay >= 0"),
        ({"max_minutes": math.nan}, "max_minutes must be > 0"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\), found -1"),
        ({"seed": 2**32}, "seed must be an integer"),
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


_KEYS = sorted({f.name for f in fields(NICEConfig)} | {f.name for f in fields(PixelTrainConfig)})
_VALUES = st.one_of(
    st.integers(-3, 3).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["none", "None", "nan", "-inf", "1e400", "0.9,0.99", "1,2,3", "", " ", "tiny", "mnist", "gaussian"]),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=4))
def test_fuzzed_known_keys_give_a_valid_config_or_a_config_error(pairs):
    """Known keys with arbitrary values, through the whole path the CLI takes: parsing, then
    building both configs. Anything accepted is a config that passes its own checks."""
    try:
        _, model, train = split_overrides([f"{k}={v}" for k, v in pairs], NICEConfig)
        model_config = apply_overrides(NICEConfig(), model)
        train_config = apply_overrides(PixelTrainConfig(), train)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    for name in ("batch_size", "epochs", "val_size", "hidden_units", "hidden_layers", "couplings"):
        config = train_config if hasattr(train_config, name) else model_config
        assert getattr(config, name) >= 1
    assert math.isfinite(train_config.lr) and train_config.lr > 0 and math.isfinite(train_config.eps)
    assert 0 <= train_config.seed < 2**32  # whether the dataset exists is plan_run's check (test_training.py)
