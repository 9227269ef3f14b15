"""Persistence and export: R-only adapter, basis file, lossless PEFT export, merged model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fedsb.errors import CheckpointError
from fedsb.export import export_merged, export_peft, load_adapter, min_vllm_lora_rank, save_adapter
from fedsb.init.basis import Basis
from fedsb.init.initialize import BasisSpec, GradientSource, attach_basis, compute_basis
from tiny import cls_batches, lm_batches, make_tiny_bert_cls, make_tiny_gpt2, make_tiny_llama


def _trained(make, batches, rank=4, scaling=1.0, seed=0):
    """A LoRA-SB model whose R (and head) hold random 'trained' values."""
    model = make(seed)
    basis = compute_basis(
        model, BasisSpec(rank=rank, eta=1e-2, scaling=scaling), GradientSource(batches=batches, num_samples=8)
    )
    adapted = attach_basis(model, basis)
    g = torch.Generator().manual_seed(42)
    adapted.set_state(
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in adapted.get_state().items()}
    )
    return adapted, basis


@pytest.mark.parametrize(
    "make,batches,auto_cls,scaling",
    [
        (make_tiny_llama, lm_batches, AutoModelForCausalLM, 1.0),
        (make_tiny_llama, lm_batches, AutoModelForCausalLM, 0.5),
        (make_tiny_gpt2, lm_batches, AutoModelForCausalLM, 1.0),
        (make_tiny_bert_cls, cls_batches, AutoModelForSequenceClassification, 1.0),
    ],
)
def test_peft_export_logits_match(tmp_path, make, batches, auto_cls, scaling) -> None:
    adapted, basis = _trained(make, batches(), rank=4, scaling=scaling)
    # a per-module rank (capped) exercises rank_pattern: k_proj in tiny llama is 16 x 32
    base_dir = tmp_path / "base"
    make(0).save_pretrained(base_dir)
    summary = export_peft(adapted, tmp_path / "peft", base_model=str(base_dir))
    assert summary["max_lora_rank"] == 8
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == scaling * 4
    base = auto_cls.from_pretrained(base_dir, local_files_only=True).float().eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = adapted.model.eval()(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_peft_export_rank_pattern(tmp_path) -> None:
    model = make_tiny_llama()
    basis = compute_basis(
        model,
        BasisSpec(rank=20, targets=["q_proj", "k_proj"], eta=1e-2),
        GradientSource(batches=lm_batches(), num_samples=8),
    )
    adapted = attach_basis(model, basis)
    make_tiny_llama().save_pretrained(tmp_path / "base")
    summary = export_peft(adapted, tmp_path / "peft", base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 20 and summary["max_lora_rank"] == 32
    assert set(cfg["rank_pattern"].values()) == {16} and all("k_proj" in k for k in cfg["rank_pattern"])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True), tmp_path / "peft"
    )
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, adapted.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_vllm_rank_table() -> None:
    assert [min_vllm_lora_rank(r) for r in (1, 8, 9, 200, 320, 321, 512, 513)] == [
        8,
        8,
        16,
        256,
        320,
        512,
        512,
        None,
    ]


def test_causal_lm_export_excludes_heads(tmp_path) -> None:
    adapted, _ = _trained(make_tiny_llama, lm_batches())
    export_peft(adapted, tmp_path / "peft", base_model="x")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] is None


def test_merged_export_matches(tmp_path) -> None:
    for make in (make_tiny_llama, make_tiny_gpt2):
        adapted, _ = _trained(make, lm_batches())
        export_merged(adapted, tmp_path / make.__name__)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / make.__name__, local_files_only=True).eval()
        ids = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(
                merged(input_ids=ids).logits, adapted.model.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5
            )


def test_adapter_save_load_round_trip_and_fingerprint_check(tmp_path) -> None:
    adapted, basis = _trained(make_tiny_bert_cls, cls_batches())
    save_adapter(adapted, tmp_path / "ad", base_model="tiny-bert", basis_fingerprint=basis.fingerprint)
    basis.save(tmp_path / "basis")
    # a fresh party: load the basis file, attach, load R and head
    loaded_basis = Basis.load(tmp_path / "basis", expected_fingerprint=basis.fingerprint)
    other = attach_basis(make_tiny_bert_cls(0), loaded_basis)
    meta = load_adapter(other, tmp_path / "ad", basis_fingerprint=loaded_basis.fingerprint)
    assert meta["base_model"] == "tiny-bert" and meta["extra_modules"] == ["classifier"]
    a, b = adapted.get_state(), other.get_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            other.model.eval()(input_ids=ids).logits, adapted.model.eval()(input_ids=ids).logits
        )
    # a different basis must be refused
    wrong = compute_basis(
        make_tiny_bert_cls(0), BasisSpec(rank=4, init="random"), generator=torch.Generator().manual_seed(9)
    )
    with pytest.raises(CheckpointError, match="basis fingerprint mismatch"):
        Basis.load(tmp_path / "basis", expected_fingerprint=wrong.fingerprint)
    with pytest.raises(CheckpointError, match="was trained on basis"):
        load_adapter(
            attach_basis(make_tiny_bert_cls(0), wrong), tmp_path / "ad", basis_fingerprint=wrong.fingerprint
        )


def test_corrupted_basis_file_detected(tmp_path) -> None:
    _, basis = _trained(make_tiny_llama, lm_batches())
    basis.save(tmp_path / "b")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "b" / "basis.safetensors"))
    key = next(k for k in tensors if k.endswith(".B"))
    tensors[key][0, 0] += 1e-3
    save_file(tensors, str(tmp_path / "b" / "basis.safetensors"))
    with pytest.raises(CheckpointError, match="corrupted"):
        Basis.load(tmp_path / "b")
    with pytest.raises(CheckpointError, match="holds no basis"):
        Basis.load(tmp_path / "nowhere")
