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
        ({"fed": {"wire_dtype": "int4"}}, "fed.wire_dtype", "int4"),
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


# ---- settings that do nothing in a mode (issue 15: no silent misconfiguration) ------------------------------

TINY = str(CONFIGS / "tiny.yaml")


def _other_value(default):
    """A valid value other than a privacy field's default (any new field of PrivacyConfig is covered)."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default / 2 if default else 0.5
    if default is None:
        return 1e-6  # target_epsilon, noise_multiplier, delta: a small positive number is valid for each
    return {"prv": "rdp"}.get(default, default)


def _privacy_fields():
    import dataclasses

    from fedsb.config import PrivacyConfig

    return [f for f in dataclasses.fields(PrivacyConfig) if f.name != "mode"]


@pytest.mark.parametrize("f", _privacy_fields(), ids=lambda f: f.name)
def test_every_privacy_setting_without_a_mode_is_an_error(f) -> None:
    default = f.default if f.default is not dataclasses_missing() else f.default_factory()
    value = _other_value(default)
    assert value != default
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, [f"privacy.{f.name}={value}"])
    assert err.value.field == f"privacy.{f.name}"
    assert "privacy.mode=none" in str(err.value) and "privacy.mode=sample" in err.value.fix
    with pytest.raises(ConfigError, match=f"privacy.{f.name}"):  # a config built in code is checked too
        config_from_dict({"privacy": {f.name: value}})


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


def test_the_issue_probe_target_epsilon_without_mode_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, ["privacy.target_epsilon=3"])
    assert str(err.value).startswith("privacy.target_epsilon=3.0 has no effect: privacy.mode=none")
    assert "privacy.mode=sample" in str(err.value) and "privacy.mode=client" in str(err.value)


def test_a_privacy_default_given_explicitly_without_a_mode_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="privacy.max_grad_norm=0.1 has no effect"):
        resolve_config(TINY, ["privacy.max_grad_norm=0.1"])  # the default value, but given: the user meant it
    preset = tmp_path / "p.yaml"
    preset.write_text("privacy:\n  accountant: rdp\n")
    with pytest.raises(ConfigError, match="privacy.accountant='rdp' has no effect"):
        resolve_config(preset)
    preset.write_text("privacy:\n  accountant: prv\n")  # a YAML file counts by its values: it may be a
    assert resolve_config(preset).privacy.accountant == "prv"  # saved config.yaml, every key at its default
    assert resolve_config(TINY, ["privacy.target_epsilon=null"]).privacy.mode == "none"  # null = unset
    assert resolve_config(TINY, ["privacy.mode=none"]).privacy.mode == "none"


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.clip_update=0.5"], "privacy.clip_update"),
        (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.max_grad_norm=0.5"], "privacy.max_grad_norm"),
        (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.poisson=false"], "privacy.poisson"),
    ],
)  # fmt: skip
def test_privacy_settings_of_the_other_mode_are_errors(overrides, field) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, overrides)
    assert err.value.field == field and "has no effect" in str(err.value)


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["fed.method=fedit", "init.eta=0.01"], ["init.eta=0.01", "init.server_size=16", "fed.method=fedit"]),
        (["fed.method=full", "adapter.dropout=0.1"], ["adapter.dropout=0.1", "adapter.rank=4"]),
        (["fed.method=fedit", "ravan.heads=2"], ["ravan.heads=2", "fed.method=ravan"]),
        (["fed.method=ravan", "init.method=lora-xs"], ["init.method='lora-xs'", "from ravan.init"]),
        (["fed.method=ravan", "init.eta=0.01"], ["init.eta=0.01", "ravan.init=random needs no gradient"]),
        (["init.method=random", "init.eta=0.01", "init.svd=randomized"], ["init.eta=0.01", "init.svd='randomized'"]),
        (["init.method=lora-xs", "init.min_samples=4"], ["init.min_samples=4", "init.method=lora-xs"]),
        (["init.oversample=4"], ["init.oversample=4", "init.svd=exact"]),
        (["init.source=pooled"], ["init.server_size=16", "init.source=pooled"]),
        (["init.num_samples=8"], ["init.min_samples=8", "init.num_samples=8"]),
        (["init.eta_rule=official", "init.eta=0.01"], ["init.eta=0.01", "init.eta_rule=official"]),
        (["train.momentum=0.9"], ["train.momentum=0.9", "train.optimizer=adamw"]),
        (["train.optimizer=sgd", "train.eps=1e-8"], ["train.eps=1e-08", "train.optimizer=sgd"]),
        (["train.schedule=constant", "train.warmup_ratio=0", "train.schedule_scope=round"], ["train.schedule_scope"]),
        (["privacy.mode=sample", "privacy.target_epsilon=8", "train.max_grad_norm=0.5"], ["train.max_grad_norm=0.5"]),
        (["privacy.mode=client", "privacy.noise_multiplier=1", "fed.weighting=examples"], ["fed.weighting='examples'"]),
        (["partition.alpha=0.1"], ["partition.alpha=0.1", "partition.scheme=iid"]),
        (["fed.clients_per_round=5"], ["fed.clients_per_round=5.0", "partition.num_clients=2"]),
        (["partition.column=label"], ["partition.column='label'", "partition.scheme=iid"]),
        (["eval.scorer=generate", "eval.normalize=mean"], ["eval.normalize='mean'", "eval.scorer=generate"]),
        (["eval.scorer=likelihood", "eval.max_new_tokens=8"], ["eval.max_new_tokens=8", "eval.scorer=likelihood"]),
        # issue 18's settings
        (["fed.server_lr=0.5"], ["fed.server_lr=0.5", "fed.server_optimizer=avg"]),
        (["fed.server_optimizer=adam", "fed.server_momentum=0.5"], ["fed.server_momentum=0.5", "avgm only"]),
        (["fed.server_optimizer=avgm", "fed.server_eps=0.1"], ["fed.server_eps=0.1", "adam and yogi only"]),
        (["fed.wire_scale=row"], ["fed.wire_scale='row'", "fed.wire_dtype=float32"]),
        (["fed.error_feedback=true"], ["fed.error_feedback=True", "fed.wire_dtype=float32"]),
        (["init.exchange=dense"], ["init.exchange='dense'", "init.source=server"]),
        (["init.source=federated", "init.clip_norm=0.5"], ["init.clip_norm=0.5", "under DP"]),
    ],
)  # fmt: skip
def test_settings_another_setting_ignores_are_named_in_a_warning(overrides, named, caplog) -> None:
    with caplog.at_level("WARNING", logger="fedsb.config"):
        resolve_config(TINY, overrides)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "fedsb.config")
    assert "has no effect" in text or "have no effect" in text, text
    for name in named:
        assert name in text, (name, text)


def test_presets_and_saved_configs_are_quiet(caplog, tmp_path: Path) -> None:
    from fedsb.config import config_to_yaml

    for preset in sorted(CONFIGS.glob("*.yaml")):  # a saved config used as a preset (compare --isolate)
        for method in ("fedsb", "fedit", "full"):
            saved = tmp_path / f"{preset.stem}-{method}.yaml"
            saved.write_text(config_to_yaml(resolve_config(preset, [f"fed.method={method}"])))
            assert resolve_config(saved).fed.method == method  # no error (warnings name real leftovers)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedsb.config"):
        for preset in sorted(CONFIGS.glob("*.yaml")):
            cfg = resolve_config(preset)
            again = config_from_dict(cfg.to_dict())  # a saved config.yaml: every key present
            assert again == cfg
        resolve_config(TINY, ["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.max_grad_norm=0.5"])
        resolve_config(TINY, ["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.clip_update=0.1"])
    assert not [r for r in caplog.records if r.name == "fedsb.config"]


def test_local_epochs_with_the_default_local_steps_names_the_setting_given() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, ["train.local_epochs=1"])
    assert err.value.field == "train.local_epochs" and "train.local_steps=2" in str(err.value)
    assert "train.local_steps=null" in err.value.fix
    assert resolve_config(TINY, ["train.local_epochs=1", "train.local_steps=null"]).train.local_epochs == 1.0


def test_yaml_errors_keep_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny-llama\ntrain:\n  lr: [0.1,\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(bad)
    assert "line 5, column 1" in str(err.value) and err.value.field == "--config"
    bad.write_text("model:\n  name: tiny-llama\n   dtype: float32\n")
    with pytest.raises(ConfigError, match=r"line 3, column 9"):
        resolve_config(bad)
    with pytest.raises(ConfigError) as err:
        resolve_config(None, ["data.options={max_value: [1, 2}"])
    assert err.value.field == "data.options" and "column 18" in str(err.value)
