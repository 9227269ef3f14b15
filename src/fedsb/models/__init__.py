"""Base models and tokenizers for fedsb: builtin aliases, local checkpoints and hub ids."""

from fedsb.models.load import (
    BUILTIN_MODELS,
    SUPPORTED_DTYPES,
    SUPPORTED_TASKS,
    LoadedModel,
    ModelNotFoundError,
    build_char_tokenizer,
    default_cache_dir,
    load_config,
    load_model,
    prepare_smollm2,
)

__all__ = [
    "BUILTIN_MODELS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_TASKS",
    "LoadedModel",
    "ModelNotFoundError",
    "build_char_tokenizer",
    "default_cache_dir",
    "load_config",
    "load_model",
    "prepare_smollm2",
]
