"""Target matching, defaults per family, rank caps, extra trainable modules, state by name, errors."""

from __future__ import annotations

import logging

import pytest
import torch

from fedsb.adapters.inject import check_model_dtype, find_target_modules, resolve_ranks
from fedsb.errors import FedsbError
from fedsb.init.initialize import BasisSpec, attach_basis, compute_basis, resolve_targets
from tiny import make_tiny_bert_cls, make_tiny_gpt2, make_tiny_llama


def _random_adapted(model, rank=4, targets="auto"):
    basis = compute_basis(
        model,
        BasisSpec(rank=rank, targets=targets, init="random"),
        generator=torch.Generator().manual_seed(0),
    )
    return attach_basis(model, basis), basis


def test_default_targets_llama() -> None:
    mods = resolve_targets(make_tiny_llama(), "auto", ())
    leaves = {p.rsplit(".", 1)[1] for p in mods}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(mods) == 2 * 7  # 2 layers x 7 projections; lm_head is not adapted


def test_default_targets_bert_exclude_pooler_and_head() -> None:
    from fedsb.adapters.inject import DEFAULT_EXCLUDE

    mods = resolve_targets(make_tiny_bert_cls(), "auto", DEFAULT_EXCLUDE)
    assert all(p.startswith("bert.encoder.layer.") for p in mods)
    assert len(mods) == 2 * 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense


def test_default_targets_gpt2_conv1d() -> None:
    mods = resolve_targets(make_tiny_gpt2(), "auto", ())
    assert {p.rsplit(".", 1)[1] for p in mods} == {"c_attn", "c_proj", "c_fc"}
    assert len(mods) == 2 * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


def test_regex_targets() -> None:
    mods = find_target_modules(make_tiny_llama(), [r"re:model\.layers\.0\.self_attn\.(q|v)_proj"])
    assert sorted(mods) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_unmatched_target_lists_candidates() -> None:
    with pytest.raises(FedsbError) as err:
        find_target_modules(make_tiny_llama(), ["q_proj", "query"])
    msg = str(err.value)
    assert "target_modules='query'" in msg and "matches no adaptable layer" in msg and "q_proj" in msg


def test_target_on_non_linear_module() -> None:
    with pytest.raises(FedsbError, match="not a linear layer"):
        find_target_modules(make_tiny_llama(), ["self_attn"])


def test_unknown_family_without_targets() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(FedsbError, match="has no default for model_type None"):
        resolve_targets(model, "auto", ())


@pytest.mark.parametrize("bad", [[], "q_proj", [""], ["re:("]])
def test_bad_target_specs(bad) -> None:
    with pytest.raises(FedsbError, match="target_modules"):
        find_target_modules(make_tiny_llama(), bad)


def test_rank_cap_warns_and_error_mode(caplog) -> None:
    mods = resolve_targets(make_tiny_llama(), ["k_proj", "q_proj"], ())  # k_proj: 16 x 32, q_proj: 32 x 32
    with caplog.at_level(logging.WARNING, logger="fedsb.adapters"):
        ranks = resolve_ranks(mods, 20)
    assert {p.rsplit(".", 1)[1]: r for p, r in ranks.items()} == {"k_proj": 16, "q_proj": 20}
    assert "capped" in caplog.text
    with pytest.raises(
        FedsbError, match=r"rank=20 is larger than layer .*k_proj \(16 x 32\) allows; fix: use rank <= 16"
    ):
        resolve_ranks(mods, 20, rank_overflow="error")
    with pytest.raises(FedsbError, match="rank=0"):
        resolve_ranks(mods, 0)


def test_state_by_name_and_round_trip() -> None:
    adapted, _ = _random_adapted(make_tiny_llama())
    names = adapted.trainable_names()
    assert len(names) == 14 and all(n.endswith(".lora_sb_R.weight") for n in names)
    model_trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert sorted(model_trainable) == sorted(names)  # the list is the model's own parameter names
    state = {k: torch.randn_like(v) for k, v in adapted.get_state().items()}
    adapted.set_state(state)
    got = adapted.get_state()
    assert all(torch.equal(got[k], state[k]) for k in state)
    with pytest.raises(KeyError, match="missing"):
        adapted.set_state({names[0]: state[names[0]]})
    with pytest.raises(ValueError, match="shape"):
        adapted.set_state({**state, names[0]: torch.zeros(2, 2)})


def test_classification_head_is_extra_trainable() -> None:
    adapted, _ = _random_adapted(make_tiny_bert_cls())
    assert list(adapted.extra_modules) == ["classifier"]
    names = adapted.trainable_names()
    assert "classifier.weight" in names and "classifier.bias" in names
    assert sum(n.startswith("bert.encoder") for n in names) == 12


def test_explicit_extra_trainable_error() -> None:
    model = make_tiny_bert_cls()
    basis = compute_basis(model, BasisSpec(rank=2, init="random"), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FedsbError, match="extra_trainable='headz' matches no module"):
        attach_basis(model, basis, extra_trainable=["headz"])


def test_wrong_dtype_model_rejected() -> None:
    model = make_tiny_llama().to(torch.float64)
    with pytest.raises(FedsbError, match=r"dtype='torch.float64'.*float32, bfloat16 or float16"):
        check_model_dtype(model)
    with pytest.raises(FedsbError, match="dtype"):
        compute_basis(model, BasisSpec(rank=2, init="random"), generator=torch.Generator())
