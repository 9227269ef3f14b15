"""Tiny random test models (Llama, BERT, GPT-2; hidden 32, 2 layers) with a character-level tokenizer:
built from configs, offline, seeded."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedsb.models.loaded import ENCODER_MODEL_TYPES, LoadedModel, encoder_error, seeded

__all__ = ["TINY_MAX_POSITIONS", "build_char_tokenizer", "load_tiny", "tiny_config"]

TINY_MAX_POSITIONS = 256

_CHAR_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_char_tokenizer(model_max_length: int = TINY_MAX_POSITIONS) -> PreTrainedTokenizerFast:
    """Character-level tokenizer (specials, then printable ASCII incl. space, tab and newline), ``<bos>`` first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate([*_CHAR_SPECIALS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos, eos = vocab["<bos>"], vocab["<eos>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <eos> $B:1",
        special_tokens=[("<bos>", bos), ("<eos>", eos)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tok


def tiny_config(alias: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of tiny model ``alias`` over the vocabulary and special ids of ``tok``."""
    ids: dict[str, Any] = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    vocab = len(tok)
    if alias == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=TINY_MAX_POSITIONS,
            tie_word_embeddings=True,
            **ids,
        )
    if alias == "tiny-bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=TINY_MAX_POSITIONS,
            **ids,
        )
    if alias == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=TINY_MAX_POSITIONS,
            **ids,
        )
    raise AssertionError(alias)  # pragma: no cover


def load_tiny(alias: str, task: str, num_labels: int | None, dtype: torch.dtype, seed: int) -> LoadedModel:
    """Tiny model ``alias`` with random weights drawn from ``seed`` (eval mode, as from_pretrained)."""
    tok = build_char_tokenizer()
    config = tiny_config(alias, tok)
    if config.model_type in ENCODER_MODEL_TYPES and task == "causal_lm":
        raise encoder_error(alias, config.model_type)
    if task == "seq_cls":
        config.num_labels = num_labels
        auto: Any = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with seeded(seed):
        model = auto.from_config(config, dtype=dtype)
    model.eval()  # match from_pretrained, which returns eval mode
    return LoadedModel(model=model, tokenizer=tok, name=alias, source=f"builtin:{alias}", model_type="")
