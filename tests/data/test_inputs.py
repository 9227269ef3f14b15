"""Bad inputs fail safe: damaged cache entries are rebuilt (never a crash), user data files and model names
give one clear error naming the file or the setting, and data-layer errors use dotted setting names."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedsb.config import resolve_config
from fedsb.data.cache import CacheStats, cached_tokenized
from fedsb.data.prepare import prepare_data, task_from_config
from fedsb.data.tasks import get_task
from fedsb.errors import ConfigError, FedsbError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SRC = str(ROOT / "src")
KEY = "ab" + "c" * 62

# builds, or reads back, one cache entry and prints what it holds (run in a subprocess: it may crash)
CACHE_SCRIPT = textwrap.dedent(
    f"""
    import json
    import datasets
    from fedsb.data.cache import CacheStats, cached_tokenized

    def build():
        return datasets.Dataset.from_dict({{"input_ids": [[i, i + 1, i + 2] for i in range(200)]}})

    ds = cached_tokenized("{KEY}", build)
    total = sum(sum(row) for row in ds["input_ids"])
    rebuilt = getattr(CacheStats, "rebuilt", 0)
    print(json.dumps({{"total": total, "hits": CacheStats.hits, "rebuilt": rebuilt}}))
    """
)
TOTAL = sum(3 * i + 3 for i in range(200))


def _cache_run(cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDSB_CACHE": str(cache), "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )


def _arrow_file(cache: Path) -> Path:
    return next((cache / "tokenized" / KEY[:2] / KEY).glob("*.arrow"))


def _offsets_position(arrow: Path) -> int:
    """Byte position of the list offsets buffer of `input_ids` in the stored Arrow stream."""
    import pyarrow as pa

    data = arrow.read_bytes()
    buf = pa.py_buffer(data)
    batch = next(iter(pa.ipc.open_stream(buf)))
    offsets = batch.column(0).buffers()[1]
    return offsets.address - buf.address


def test_a_same_size_byte_flip_in_a_cache_entry_is_rebuilt_instead_of_crashing(tmp_path: Path) -> None:
    import datasets

    def build() -> datasets.Dataset:  # the same rows as CACHE_SCRIPT's
        return datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(200)]})

    cache = tmp_path / "cache"
    cached_tokenized(KEY, build, cache_dir=cache)  # written in this process
    arrow = _arrow_file(cache)
    size = arrow.stat().st_size
    raw = bytearray(arrow.read_bytes())
    at = _offsets_position(arrow) + 4 * 100  # the 100th row's end offset: points far past the buffer
    raw[at : at + 4] = struct.pack("<i", 0x7FFFFF00)
    arrow.write_bytes(bytes(raw))
    assert arrow.stat().st_size == size
    damaged = _cache_run(cache)  # in its own process: before the checksum it died of SIGSEGV/SIGBUS here
    assert damaged.returncode == 0, (damaged.returncode, damaged.stderr[-2000:])
    assert json.loads(damaged.stdout.splitlines()[-1]) == {"total": TOTAL, "hits": 0, "rebuilt": 1}
    hits = CacheStats.hits
    again = cached_tokenized(KEY, build, cache_dir=cache)  # the rebuilt entry is a hit
    assert CacheStats.hits == hits + 1 and sum(sum(r) for r in again["input_ids"]) == TOTAL


def _entry(cache: Path) -> Path:
    return cache / "tokenized" / KEY[:2] / KEY


@pytest.mark.parametrize("damage", ["data byte", "metadata", "missing file"])
def test_damaged_cache_entries_are_never_trusted(damage: str, tmp_path: Path) -> None:
    import datasets

    def build() -> datasets.Dataset:
        return datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(50)]})

    cached_tokenized(KEY, build, cache_dir=tmp_path)
    entry = _entry(tmp_path)
    arrow = next(entry.glob("*.arrow"))
    if damage == "data byte":  # a value, not an offset: read silently as a wrong token id without the check
        raw = bytearray(arrow.read_bytes())
        raw[-200] ^= 0x01
        arrow.write_bytes(bytes(raw))
    elif damage == "metadata":
        (entry / "fedsb_cache.json").write_text("{not json")
    else:
        (entry / "state.json").unlink()
    rebuilt, hits = CacheStats.rebuilt, CacheStats.hits
    ds = cached_tokenized(KEY, build, cache_dir=tmp_path)
    assert ds["input_ids"] == build()["input_ids"]
    assert CacheStats.rebuilt == rebuilt + 1 and CacheStats.hits == hits
    cached_tokenized(KEY, build, cache_dir=tmp_path)
    assert CacheStats.hits == hits + 1


# ---- user data files -----------------------------------------------------------------------------------------

ROW = '{"sentence": "a fine film", "label": "pos"}'


@pytest.mark.parametrize(
    "name,content,phrase",
    [
        ("empty.jsonl", "", "is empty"),
        ("broken.jsonl", f'{ROW}\n{{"sentence": "b", "label": \n{ROW}\n', "has an invalid row at line 2, column 28"),
        ("list.jsonl", f"{ROW}\n[1, 2]\n", "line 2: a list, not a JSON object"),
        ("array.json", f'[{ROW},\n {{"sentence": "b" "label": "neg"}}]', "at line 2, column 19"),
        ("header.csv", "sentence,label\n", "holds no rows"),
        ("blank.jsonl", "\n\n", "holds no rows"),
    ],
)  # fmt: skip
def test_bad_data_files_are_one_error_naming_the_file(name: str, content: str, phrase: str, tmp_path) -> None:
    path = tmp_path / name
    path.write_text(content)
    task = get_task("classify", data_files={"test": str(path)}, label_names=["neg", "pos"])
    with pytest.raises(FedsbError) as err:
        task.load("test", None, 0)
    assert str(path) in str(err.value) and phrase in str(err.value), str(err.value)
    assert err.value.field == "data file" and err.value.__cause__ is None  # no chained 90-line traceback


def test_a_missing_data_file_gets_advice_for_how_it_was_given(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "nowhere" / "test.jsonl"
    task = get_task("classify", data_files={"test": str(missing)}, label_names=["neg", "pos"])
    with pytest.raises(FedsbError) as err:
        task.load("test", None, 0)
    assert err.value.field == "data.options.data_files.test" and "does not exist" in str(err.value)
    assert "data_dir" not in str(err.value) and "relative" not in str(err.value)  # an absolute path as given
    monkeypatch.chdir(tmp_path)
    task = get_task("classify", data_files={"test": "rel.jsonl"}, label_names=["neg", "pos"])
    with pytest.raises(FedsbError, match=r"relative path is resolved under the working directory"):
        task.load("test", None, 0)


def _classify_config(tmp_path: Path, *extra: str):
    rows = [json.dumps({"sentence": f"film {i}", "label": ["neg", "pos"][i % 2]}) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(rows[:10]) + "\n")
    options = (
        f"data.options={{label_names: [neg, pos], columns: {{text: sentence}}, "
        f"data_files: {{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}}}}}"
    )
    return resolve_config(
        TINY,
        [
            options,
            "data.task=classify",
            "model.name=tiny-bert",
            "data.train_size=null",
            "data.test_size=null",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "extra,field",
    [
        (["data.test_size=50"], "data.test_size"),
        (["data.train_size=500"], "data.train_size"),
        (["partition.num_clients=20", "partition.min_size=3"], "partition.num_clients"),
        (
            ["partition.scheme=quantity", "partition.alpha=0.05", "partition.min_size=15"],
            "partition.min_size",
        ),
    ],
)
def test_data_errors_name_the_dotted_setting(extra: list[str], field: str, tmp_path: Path) -> None:
    from fedsb.models import build_char_tokenizer

    cfg = _classify_config(tmp_path, *extra)
    with pytest.raises(FedsbError) as err:
        prepare_data(cfg, task_from_config(cfg), build_char_tokenizer())
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(f"{field}=")


def test_wrong_columns_and_options_name_data_options(tmp_path: Path) -> None:
    from fedsb.models import build_char_tokenizer

    cfg = _classify_config(tmp_path)
    cfg.data.options["columns"] = {"text": "review"}
    with pytest.raises(FedsbError) as err:
        prepare_data(cfg, task_from_config(cfg), build_char_tokenizer())
    assert err.value.field == "data.options.columns" and "train.jsonl" in str(err.value)
    cfg.data.options["validation_fraction"] = 2
    with pytest.raises(FedsbError) as err:
        task_from_config(cfg)
    assert err.value.field == "data.options.validation_fraction"


# ---- model names ---------------------------------------------------------------------------------------------

MODEL_SCRIPT = textwrap.dedent(
    """
    import json, socket, time
    attempts = []
    def refuse(*args, **kwargs):  # record (and refuse) every name lookup and connection
        attempts.append(str(args[:2]))
        raise OSError("network disabled by the test")
    socket.getaddrinfo = refuse
    socket.socket.connect = refuse
    from fedsb.models import load_model
    start = time.perf_counter()
    try:
        load_model("tiny-lama")
        message = None
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"seconds": time.perf_counter() - start, "message": message, "attempts": attempts}))
    """
)


def test_a_typo_in_a_model_name_fails_at_once_with_suggestions_and_no_hub_traffic() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = SRC
    res = subprocess.run(
        [sys.executable, "-c", MODEL_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["message"] and "did you mean 'tiny-llama'?" in out["message"], out
    assert "model.hub=true" in out["message"] and out["message"].startswith("ModelNotFoundError: model.name=")
    assert out["attempts"] == [] and out["seconds"] < 2.0, out


def test_model_name_errors_reach_the_cli_as_one_line(tmp_path: Path, capsys) -> None:
    from fedsb.cli import main

    code = main(
        ["run", "--config", TINY, "--output", str(tmp_path / "r"), "--no-progress", "model.name=tiny-lama"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsb: error: model.name='tiny-lama'") and "Traceback" not in err
    with pytest.raises(FedsbError, match="HF_HUB_OFFLINE is set"):
        from fedsb.models import load_model

        load_model("fedsb-test-org/not-cached", hub=True)  # the suite runs with HF_HUB_OFFLINE=1


def test_unknown_model_hub_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.hub='maybe'"):
        resolve_config(TINY, ["model.hub=maybe"])
