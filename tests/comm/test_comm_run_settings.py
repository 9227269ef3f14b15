"""`fedsb comm` with a run's settings (mixed ranks, int8 per tensor / per row, the federated init) equals the
ledger of a real tiny run with those settings, byte for byte; and it refuses bad values with clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fedsb import cli, comm
from fedsb.config import resolve_config
from fedsb.errors import FedsbError
from fedsb.models.tiny import build_char_tokenizer, tiny_config
from fedsb.plan import plan_run
from fedsb.run import run_job

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = ["threads=1", "progress=false", "export=false", "eval.initial=false", "eval.every=100"]
QUICK += ["data.test_size=4", "fed.rounds=1"]
CLIENTS = 2  # configs/tiny.yaml: 2 clients, every one sampled each round

# (run overrides, comm_table keywords, methods at rank 4)
SETTINGS = {
    "mixed-ranks": (["partition.client_ranks=[2,4]"], {"client_ranks": [2, 4]}, "fedsb"),
    "int8-tensor": (["fed.wire_dtype=int8"], {"dtype": "int8"}, "fedsb"),
    "int8-row": (
        ["fed.wire_dtype=int8", "fed.wire_scale=row"],
        {"dtype": "int8", "wire_scale": "row"},
        "fedsb",
    ),
    "int8-row-fedit": (
        ["fed.method=fedit", "fed.wire_dtype=int8", "fed.wire_scale=row"],
        {"dtype": "int8", "wire_scale": "row"},
        "fedit",
    ),
    "int8-row-ffa": (
        ["fed.method=ffa", "fed.wire_dtype=int8", "fed.wire_scale=row"],
        {"dtype": "int8", "wire_scale": "row"},
        "ffa",
    ),
    "int8-row-ravan": (
        ["fed.method=ravan", "fed.wire_dtype=int8", "fed.wire_scale=row"],
        {"dtype": "int8", "wire_scale": "row"},
        "ravan",
    ),
    "federated-sketch": (
        ["init.source=federated", "init.exchange=sketch"],
        {"federated_init": "sketch"},
        "fedsb",
    ),
    "federated-dense": (
        ["init.source=federated", "init.exchange=dense"],
        {"federated_init": "dense"},
        "fedsb",
    ),
    "federated-sketch-ravan": (  # RAVAN's LoRA-SB heads: k = min(h r + oversample, m, n)
        ["fed.method=ravan", "ravan.init=lora-sb", "init.source=federated"],
        {"federated_init": "sketch"},
        "ravan",
    ),
    "federated-sketch-k": (
        ["init.source=federated", "init.oversample=3"],
        {"federated_init": "sketch", "oversample": 3},
        "fedsb",
    ),
}


def _config_dir(tmp_path: Path, alias: str, **extra: object) -> str:
    """The tiny model's config.json (what `fedsb comm --model DIR` reads: shapes, no weights)."""
    config = tiny_config(alias, build_char_tokenizer())
    for key, value in extra.items():
        setattr(config, key, value)
    out = tmp_path / alias
    config.save_pretrained(out)
    return str(out)


def _assert_ledger_is_comm(row: dict, ledger: dict, clients: int) -> None:
    (first,) = ledger["rounds"]
    assert first["clients"] == clients
    assert first["bytes_up"] == clients * row["upload_bytes"]
    assert first["bytes_down"] == clients * row["download_bytes"]
    assert first["bytes_total"] == row["round_bytes"] > 0
    assert first["params_down"] == clients * row["download_params"]
    by_rank = row.get("upload_params_by_client_rank")
    assert ledger["params_per_client_per_round_one_way"] == (
        max(by_rank.values()) if by_rank else row["upload_params"]
    )
    basis = [e for e in ledger["one_time"] if e["item"].startswith("basis broadcast")]
    assert sum(e["bytes"] for e in basis) == clients * row["basis_bytes"]
    init = sum(e["bytes"] for e in ledger["one_time"] if e["item"].startswith("federated init"))
    assert init == row["init_bytes_total"] == clients * row["init_bytes"]
    assert ledger["totals"]["bytes_one_time"] == clients * (row["basis_bytes"] + row["init_bytes"])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_comm_equals_the_ledger_of_a_run_with_the_setting(tmp_path: Path, setting: str) -> None:
    overrides, keywords, method = SETTINGS[setting]
    cfg = resolve_config(TINY, [*QUICK, *overrides, f"output_dir={tmp_path / 'run'}"])
    ledger = run_job(cfg, echo=lambda s: None)["ledger"]
    (row,) = comm.comm_table(_config_dir(tmp_path, "tiny-llama"), [method], [4], CLIENTS, **keywords)
    assert row["modules"] == 14
    _assert_ledger_is_comm(row, ledger, CLIENTS)
    plan = plan_run(cfg)["communication"]  # --dry-run counts with the same functions
    assert plan["bytes_per_round"] == row["round_bytes"]
    assert plan["bytes_one_time"] == ledger["totals"]["bytes_one_time"]
    if setting.startswith("int8"):
        (f32,) = comm.comm_table(_config_dir(tmp_path, "tiny-llama"), [method], [4], CLIENTS)
        assert row["upload_params"] == f32["upload_params"]
        assert row["upload_bytes"] == row["upload_params"] + row["scale_bytes"] > row["upload_params"]


def _classification_data(tmp_path: Path) -> str:
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 160), ("test", 8)):
        rows = []
        for _ in range(n):
            label = rng.randrange(2)
            word = rng.choice(["great", "fine"] if label else ["awful", "dull"])
            rows.append(json.dumps({"sentence": f"the film was {word}", "label": ["neg", "pos"][label]}))
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        files[split] = str(tmp_path / f"{split}.jsonl")
    return (
        "data.options={label_names: [neg, pos], columns: {text: sentence, label: label}, "
        f"data_files: {{train: {files['train']}, test: {files['test']}}}}}"
    )


@pytest.mark.parametrize(
    ("overrides", "keywords"),
    [
        (["partition.client_ranks=[2,4]"], {"client_ranks": [2, 4]}),
        (["fed.wire_dtype=int8", "fed.wire_scale=row"], {"dtype": "int8", "wire_scale": "row"}),
    ],
    ids=["mixed-ranks", "int8-row"],
)
def test_a_classifier_head_travels_whole_with_its_own_scales(tmp_path: Path, overrides, keywords) -> None:
    """tiny-bert with a 2-label classifier: the head (32 x 2 + 2) is uploaded whole by every client of any
    rank and has its own scales (2 rows + the bias) in int8."""
    base = ["model.name=tiny-bert", "data.task=classify", _classification_data(tmp_path)]
    base += ["data.train_size=null", "data.test_size=null", "data.max_length=32", "init.server_size=3"]
    base += ["init.min_samples=2", "train.batch_size=4"]
    cfg = resolve_config(TINY, [*QUICK, *base, *overrides, f"output_dir={tmp_path / 'run'}"])
    ledger = run_job(cfg, echo=lambda s: None)["ledger"]
    model = _config_dir(tmp_path, "tiny-bert", architectures=["BertForSequenceClassification"], num_labels=2)
    (row,) = comm.comm_table(model, ["fedsb"], [4], CLIENTS, **keywords)
    assert row["head_params"] == 32 * 2 + 2
    _assert_ledger_is_comm(row, ledger, CLIENTS)
    assert plan_run(cfg)["communication"]["bytes_per_round"] == row["round_bytes"]


def test_mixed_rank_and_init_figures() -> None:
    """minilm-l6, fedsb r = 32, clients at 8, 16, 32: uploads 36 r_i^2; the sketch init k = 42 per module."""
    (row,) = comm.comm_table("minilm-l6", ["fedsb"], [32], 3, client_ranks=[8, 16, 32])
    assert row["upload_params_by_client_rank"] == {8: 36 * 64, 16: 36 * 256, 32: 36 * 1024}
    assert row["upload_params"] == 36 * (64 + 256 + 1024) // 3 and row["download_params"] == 36 * 1024
    assert row["round_bytes"] == 4 * 36 * (64 + 256 + 1024 + 3 * 1024)
    (two,) = comm.comm_table("minilm-l6", ["fedsb"], [32], 2, client_ranks=[8, 16, 32])
    assert two["round_bytes"] == round(2 * 4 * (36 * (64 + 256 + 1024) / 3 + 36 * 1024))  # the expectation
    (sketch,) = comm.comm_table("minilm-l6", ["fedsb"], [32], 5, federated_init="sketch")
    (dense,) = comm.comm_table("minilm-l6", ["fedsb"], [32], 5, federated_init="dense")
    shapes, _ = comm.module_shapes("minilm-l6")
    k = 32 + 10
    assert sketch["init_params"] == sum(2 * m * k + k * n for _, m, n in shapes)
    assert dense["init_params"] == sum(m * n for _, m, n in shapes)
    assert sketch["init_bytes_total"] == 5 * 4 * sketch["init_params"]
    (row8,) = comm.comm_table("bert-base", ["fedsb"], [32], 3, dtype="int8", wire_scale="row")
    assert row8["scale_bytes"] == 4 * (24 * 32 + 3 + 1)  # R rows per module, the classifier's 3 rows + bias


@pytest.mark.parametrize(
    ("keywords", "match"),
    [
        ({"client_ranks": [8, 64, 8]}, "client_ranks=\\[8, 64, 8\\].*holds 64 > rank 32"),
        ({"client_ranks": [8]}, "fewer than the 3 sampled"),
        ({"client_ranks": [0, 8, 8]}, "client_ranks=\\[0, 8, 8\\]"),
        ({"client_ranks": [8, 8, 8], "dtype": "int8"}, "does not work with int8"),
        ({"client_ranks": [8, 8, 8], "methods": ["fedit"]}, "fedit has none"),
        ({"wire_scale": "column", "dtype": "int8"}, "wire_scale='column'"),
        ({"wire_scale": "row"}, "has no effect with dtype float32"),
        ({"federated_init": "pooled"}, "federated_init='pooled'"),
        ({"federated_init": "sketch", "methods": ["fedit"]}, "which fedit does not compute"),
        ({"federated_init": "sketch", "oversample": -1}, "oversample=-1"),
        ({"dtype": "int8", "wire_scale": "row", "head_params": 10}, "head given by its size only"),
    ],
)
def test_bad_settings_are_refused_with_the_key_and_value(keywords: dict, match: str) -> None:
    methods = keywords.pop("methods", ["fedsb"])
    with pytest.raises(FedsbError, match=match):
        comm.comm_table("bert-base", methods, [32], 3, **keywords)


def test_cli_prints_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["comm", "--model", "minilm-l6", "--methods", "fedsb", "--rank", "32", "--clients", "3"]
    assert cli.main([*argv, "--client-ranks", "8", "16", "32", "--federated-init", "dense"]) == 0
    out = capsys.readouterr().out
    assert "mixed ranks (partition.client_ranks)" in out and "r_i=8: 2,304" in out and "(dense)" in out
    assert cli.main([*argv, "--dtype", "int8", "--wire-scale", "row", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["wire_scale"] == "row" and row["scale_bytes"] == 4 * 36 * 32
    assert cli.main([*argv, "--client-ranks", "8", "64", "16"]) == 2
    assert "client_ranks=[8, 64, 16]" in capsys.readouterr().err


def test_the_plan_counts_no_federated_init_for_a_basis_without_one(tmp_path: Path) -> None:
    """RAVAN with ravan.init=random computes no gradient basis, so init.source=federated exchanges nothing
    (the plan once asked init.method, which RAVAN ignores, and counted the init's bytes)."""
    extra = ["fed.method=ravan", "ravan.init=random", "init.source=federated", f"output_dir={tmp_path}"]
    cfg = resolve_config(TINY, [*QUICK, *extra])
    plan = plan_run(cfg)["communication"]
    ledger = run_job(cfg, echo=lambda s: None)["ledger"]
    assert "federated_init_bytes" not in plan
    assert plan["bytes_one_time"] == ledger["totals"]["bytes_one_time"] > 0


@pytest.mark.parametrize("method", ["fedsb", "fedit", "ffa", "fedex", "flora"])
def test_comm_equals_a_later_rounds_ledger_for_every_method(tmp_path: Path, method: str) -> None:
    """Round 2 is the steady state `fedsb comm` counts: FedEx-LoRA downloads the means and the c stacked
    factors ((c+1) r(m+n)), FLoRA the c stacked factors; in round 1 both download less (nothing to fold).
    RAVAN and FedSVD: every ledger entry of both rounds, tests/fed/test_rivals.py."""
    overrides = [*QUICK, "fed.rounds=2", f"fed.method={method}", f"output_dir={tmp_path / 'run'}"]
    ledger = run_job(resolve_config(TINY, overrides), echo=lambda s: None)["ledger"]
    (row,) = comm.comm_table(_config_dir(tmp_path, "tiny-llama"), [method], [4], CLIENTS)
    first, second = ledger["rounds"]
    assert second["clients"] == CLIENTS
    assert second["params_up"] == CLIENTS * row["upload_params"]
    assert second["params_down"] == CLIENTS * row["download_params"]
    assert second["bytes_total"] == row["round_bytes"]
    assert first["params_up"] == second["params_up"]
    folds = method in ("fedex", "flora")  # round 1 has no fold yet to send
    assert (first["params_down"] < second["params_down"]) if folds else (first == {**second, "round": 1})
