"""Issue 18's settings, the gaps its audit found (/work/coord/issue18-audit.md): every bad value names its
dotted key, every setting its context makes ineffective is named in a warning, SecAgg+ refuses mixed ranks,
and a server optimizer steps the exact mixed-rank mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.config import resolve_config
from fedsb.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--no-progress", "threads=1", "data.test_size=4", "eval.every=100", "export=true"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("fed.server_lr=0", "fed.server_lr=0"),
        ("fed.server_lr=-0.1", "fed.server_lr=-0.1"),
        ("fed.server_eps=0", "fed.server_eps=0"),
        ("fed.server_betas=[0.9]", "fed.server_betas=[0.9]"),
        ("fed.server_momentum=-0.5", "fed.server_momentum=-0.5"),
        ("fed.server_optimizer=fedprox", "fed.server_optimizer='fedprox'"),
        ("fed.wire_dtype=int4", "fed.wire_dtype='int4'"),
        ("fed.wire_scale=column", "fed.wire_scale='column'"),
        ("fed.error_feedback=2", "fed.error_feedback=2"),
        ("init.source=client", "init.source='client'"),
        ("init.exchange=svd", "init.exchange='svd'"),
        ("init.clip_norm=0", "init.clip_norm=0"),
        ("init.noise_multiplier=-1", "init.noise_multiplier=-1"),
        ("init.oversample=-2", "init.oversample=-2"),
        ("partition.client_ranks=[2,0]", "partition.client_ranks=[2, 0]"),
        ("partition.client_ranks=[2,4,4]", "partition.client_ranks=[2, 4, 4]"),
        ("partition.client_ranks=[2,5]", "partition.client_ranks=[2, 5]"),
    ],
)
def test_a_bad_value_names_its_dotted_key_the_value_and_a_fix(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, [override])
    text = str(err.value)
    assert text.startswith(named) and "fix:" in text, text


def test_secagg_refuses_mixed_ranks_with_the_reason() -> None:
    from fedsb.flower.secagg import check_secagg_config

    cfg = resolve_config(TINY, ["partition.client_ranks=[2,4]"])
    with pytest.raises(ConfigError, match="partition.client_ranks=\\[2, 4\\] does not work with SecAgg"):
        check_secagg_config(cfg)


def _final(out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert main(["run", "--config", TINY, "--output", str(out), *QUIET, *extra]) == 0
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def test_a_server_optimizer_steps_the_exact_mixed_rank_mean(tmp_path: Path) -> None:
    """Mixed ranks: avgm at lr 1 without momentum installs the mean, as plain averaging does (the
    optimizer's input is the exact mean of the filled client models); adam moves elsewhere."""
    mixed = "partition.client_ranks=[2,4]"
    avg = _final(tmp_path / "avg", mixed)
    sgd = _final(
        tmp_path / "sgd", mixed, "fed.server_optimizer=avgm", "fed.server_lr=1.0", "fed.server_momentum=0"
    )
    adam = _final(tmp_path / "adam", mixed, "fed.server_optimizer=adam")
    assert avg.keys() == sgd.keys() == adam.keys()
    for k in avg:
        torch.testing.assert_close(sgd[k], avg[k], rtol=0, atol=1e-7)
    assert any(not torch.allclose(adam[k], avg[k], atol=1e-6) for k in avg)
