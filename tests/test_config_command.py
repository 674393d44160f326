"""`couplings config MODEL [--set ...]`: every option with its value and default, as --set lines
that reproduce the configuration."""

from __future__ import annotations

import pytest

from couplings.cli import main
from couplings.config import apply_overrides, split_overrides
from couplings.models import MODELS


def _lines(capsys, *argv) -> list[str]:
    assert main(["config", *argv]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_option_is_printed_and_the_lines_rebuild_the_configuration(model, capsys):
    entry = MODELS[model]
    size = list(entry.presets)[-1]  # not the default size
    lines = _lines(capsys, model, "--set", f"size={size}", "--set", "seed=7")
    pairs = [line.split("#")[0].split()[1] for line in lines if line.startswith("--set ")]
    keys = [pair.split("=")[0] for pair in pairs]
    fields = {f for cls in (entry.config, entry.train_config) for f in cls.__dataclass_fields__}
    assert sorted(keys) == sorted(fields | {"size"})
    parsed_size, model_part, train_part = split_overrides(pairs, entry.config, entry.train_config, model)
    preset_model, preset_train = entry.preset(size)
    assert parsed_size == size
    assert apply_overrides(entry.config(), model_part) == apply_overrides(entry.config(), preset_model)
    assert apply_overrides(entry.train_config(), train_part) == apply_overrides(entry.train_config(), {**preset_train, "seed": 7})


def test_the_comments_say_the_default_and_where_a_value_came_from(capsys):
    lines = _lines(capsys, "realnvp", "--set", "size=fast", "--set", "lr=3e-4")
    assert any(line.startswith("--set hidden=32 ") and line.endswith("# default 64; size=fast") for line in lines)
    assert any(line.startswith("--set lr=0.0003 ") and line.endswith("# default 0.001; given") for line in lines)
    assert any(line.startswith("--set betas=0.9,0.999 ") and line.endswith("# default 0.9,0.999") for line in lines)


def test_unknown_keys_and_sizes_are_usage_errors(capsys):
    assert main(["config", "nice", "--set", "hiden_units=3"]) == 2
    assert "unknown key 'hiden_units'" in capsys.readouterr().err
    assert main(["config", "nice", "--set", "size=huge"]) == 2
