"""What `fedsb run --resume DIR key=value ...` may change, checked before anything is written.

A resumed run continues with its saved configuration. Allowed overrides: `fed.rounds` (to extend or end a
run; not when privacy.target_epsilon fixed the noise for the planned rounds: more rounds would spend more
than the target; never below the rounds already done: `fedsb.run`), `progress` and `report_to` (display
and tracking only), `output_dir` naming the run directory itself, and where it runs: `device`,
`model.dtype`, `model.quantize` and `model.device_map` (a checkpoint is continued only under the base dtype
and quantization that wrote it: `fedsb.fed.checkpoint.check_placement` says why otherwise). Anything else
is refused with a `ConfigError` naming the field, the value and the fix, and config.yaml is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsb.config import RunConfig, config_from_dict, merge_overrides, parse_override
from fedsb.errors import ConfigError

ALLOWED_ON_RESUME = (
    "fed.rounds",
    "progress",
    "report_to",
    "output_dir",
    "device",
    "model.dtype",
    "model.quantize",
    "model.device_map",
)


def resumed_config(saved: dict[str, Any], overrides: list[str], run_dir: Path) -> RunConfig:
    """The saved config with the allowed `overrides` applied, or a `ConfigError` for the first refused one."""
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        if key not in ALLOWED_ON_RESUME:
            raise ConfigError(
                field=key,
                value=value,
                what="cannot change when resuming (the run continues with its saved configuration)",
                fix=f"drop the override (--resume may change only {', '.join(k for k in ALLOWED_ON_RESUME if k != 'output_dir')}), or "
                "start a new run with --output",
            )
        if key == "output_dir" and Path(str(value)).resolve() != run_dir.resolve():
            raise ConfigError(
                field=key, value=value, what="differs from the run being resumed", fix="drop --output"
            )
    cfg = config_from_dict(merge_overrides(saved, overrides))
    before = config_from_dict(saved)
    if cfg.fed.rounds != before.fed.rounds and before.privacy.enabled and before.privacy.target_epsilon:
        raise ConfigError(
            field="fed.rounds",
            value=cfg.fed.rounds,
            what=f"cannot change on a DP run: its noise multiplier was solved so that {before.fed.rounds} "
            f"rounds spend privacy.target_epsilon={before.privacy.target_epsilon:g}",
            fix=f"resume without fed.rounds (the run ends after {before.fed.rounds} rounds), or start a new run "
            "with the number of rounds you want",
        )
    return cfg
