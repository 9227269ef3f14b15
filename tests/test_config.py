"""Config: defaults validate, YAML + overrides, typed coercion, errors naming field/value/fix, help rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsb.config import (
    RunConfig,
    config_from_dict,
    describe_fields,
    merge_overrides,
    parse_override,
    resolve_config,
)
from fedsb.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_embedded_default_job() -> None:
    cfg = RunConfig()
    assert cfg.model.name == "smollm2-135m" and cfg.data.task == "arithmetic" and cfg.fed.method == "fedsb"
    assert cfg.init.source == "server" and cfg.partition.num_clients >= 2 and cfg.fed.rounds >= 2


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset: Path) -> None:
    assert isinstance(resolve_config(preset), RunConfig)
    assert preset.read_text().startswith("# fedsb run"), "presets open with their launch command"


def test_overrides_are_typed() -> None:
    cfg = resolve_config(
        None,
        [
            "train.lr=1e-3",
            "fed.rounds=5",
            "adapter.targets=[q_proj, v_proj]",
            "train.bf16=false",
            "output_dir=/tmp/x",
        ],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.fed.rounds == 5 and cfg.adapter.targets == ["q_proj", "v_proj"] and cfg.train.bf16 is False
    assert cfg.output_dir == "/tmp/x"
    cfg = resolve_config(None, ["partition.scheme=natural", "partition.num_clients=null"])
    assert cfg.partition.num_clients is None


def test_override_parsing() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert merge_overrides({"a": {"b": 1, "c": 2}}, ["a.b=5"]) == {"a": {"b": 5, "c": 2}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("fed.rounds")


@pytest.mark.parametrize(
    "data,field,value",
    [
        ({"adapter": {"rank": 0}}, "adapter.rank", 0),
        ({"adapter": {"rank": "big"}}, "adapter.rank", "big"),
        ({"train": {"lr": -1}}, "train.lr", -1.0),
        ({"train": {"local_steps": None}}, "train.local_steps", None),
        ({"fed": {"weighting": "median"}}, "fed.weighting", "median"),
        ({"fed": {"wire_dtype": "int8"}}, "fed.wire_dtype", "int8"),
        ({"fed": {"clients_per_round": 2.5}}, "fed.clients_per_round", 2.5),
        ({"fed": {"min_clients": 9}}, "fed.min_clients", 9),
        ({"init": {"source": "clients"}}, "init.source", "clients"),
        ({"init": {"eta": 0}}, "init.eta", 0.0),
        ({"partition": {"scheme": "random"}}, "partition.scheme", "random"),
        ({"model": {"dtype": "float64"}}, "model.dtype", "float64"),
        ({"trian": {"lr": 1}}, "trian", {"lr": 1}),
        ({"train": {"learning_rate": 1}}, "train.learning_rate", 1),
    ],
)
def test_errors_name_field_value_and_fix(data, field, value) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert err.value.field == field and err.value.value == value
    assert f"{field}={value!r}" in str(err.value) and "fix:" in str(err.value)


def test_bad_yaml_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping of sections"):
        resolve_config(bad)


def test_every_field_has_help() -> None:
    rows = describe_fields()
    assert len(rows) > 40
    assert all(text for _, _, text in rows), [name for name, _, text in rows if not text]
