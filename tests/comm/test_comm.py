"""Communication calculator: every cell of the paper's tables within 0.5 %, shapes from configs, CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn
from transformers import (
    AutoConfig,
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
)

from fedsb import cli, comm
from fedsb.adapters.inject import BERT_TARGETS, DEFAULT_EXCLUDE, DEFAULT_TARGETS, LLAMA_TARGETS
from fedsb.errors import FedsbError

# (model, method, rank, clients, the paper's "# Comm." in the table's unit): method.md 6.3 / 8.2-8.4.
PAPER_CELLS = [
    ("llama-3.2-3b", "fedit", 32, 5, 48.63),
    ("llama-3.2-3b", "ffa", 32, 5, 24.31),
    ("llama-3.2-3b", "fedex", 32, 5, 243.15),
    ("llama-3.2-3b", "flora", 32, 5, 243.15),
    ("llama-3.2-3b", "fedsb", 120, 5, 2.83),
    ("llama-3.2-3b", "fedsb", 160, 5, 5.02),
    ("llama-3.2-3b", "fedsb", 200, 5, 7.85),
    ("mistral-7b", "fedit", 32, 25, 83.88),
    ("mistral-7b", "ffa", 32, 25, 41.94),
    ("mistral-7b", "fedex", 32, 25, 2097.34),
    ("mistral-7b", "flora", 32, 25, 2097.34),
    ("mistral-7b", "fedsb", 120, 25, 3.22),
    ("mistral-7b", "fedsb", 160, 25, 5.73),
    ("mistral-7b", "fedsb", 200, 25, 8.96),
    ("gemma-2-9b", "fedit", 32, 25, 108.04),
    ("gemma-2-9b", "ffa", 32, 25, 54.02),
    ("gemma-2-9b", "fedex", 32, 25, 2701.12),
    ("gemma-2-9b", "flora", 32, 25, 2701.12),
    ("gemma-2-9b", "fedsb", 120, 25, 4.23),
    ("gemma-2-9b", "fedsb", 160, 25, 7.53),
    ("gemma-2-9b", "fedsb", 200, 25, 11.76),
    ("bert-base", "fedit", 32, 3, 1181.96),
    ("bert-base", "ffa", 32, 3, 592.13),
    ("bert-base", "fedex", 32, 3, 3541.26),
    ("bert-base", "flora", 32, 3, 3541.26),
    ("bert-base", "fedsb", 32, 3, 26.88),
    ("bert-base", "fedsb", 48, 3, 57.59),
    ("bert-base", "fedsb", 64, 3, 100.61),
]
UNIT = {"llama-3.2-3b": 1e6, "mistral-7b": 1e6, "gemma-2-9b": 1e6, "bert-base": 1e3}


@pytest.mark.parametrize(("model", "method", "rank", "clients", "paper"), PAPER_CELLS)
def test_every_paper_cell_within_half_a_percent(model, method, rank, clients, paper):
    (row,) = comm.comm_table(model, [method], [rank], clients)
    exact = row["paper_comm"] / UNIT[model]
    assert abs(exact - paper) / paper < 0.005, (exact, paper)
    shown = float(row["paper_comm_display"])
    assert abs(shown - paper) / paper < 0.005, (shown, paper)
    assert row["paper_unit"] == ("K" if model == "bert-base" else "M")


def test_worked_numbers_of_method_md():
    shapes, head = comm.module_shapes("llama-3.2-3b")
    assert head == 0 and len(shapes) == 28 * 7
    assert comm.fedit(shapes[:7], 32, 5).paper == 1_736_704  # per layer, method.md 6.3
    assert comm.ffa(shapes, 32, 5).upload == 24_772_608  # the exact B-only count (24.77M)
    gemma, _ = comm.module_shapes("gemma-2-9b")
    assert comm.fedit(gemma, 32, 25).paper == 108_036_096
    bert, head = comm.module_shapes("bert-base")
    assert head == 2307 and len(bert) == 24 and all((m, n) == (768, 768) for _, m, n in bert)
    assert comm.fedit(bert, 32, 3, head).paper == 1_179_648 + 2307
    assert comm.ffa(bert, 32, 3, head).paper == 589_824 + 2307
    assert comm.fedex(bert, 32, 3, head).paper == 3 * 1_179_648 + 2307  # head once, not c times
    assert comm.fedex(bert, 32, 3, head).upload == 1_179_648 + 2307
    res = comm.fedsb(bert, 64, 3, head)
    assert res.upload == res.download == res.paper == 24 * 64**2 + 2307
    assert res.basis == 64 * 1536 * 24  # one-time, not in the round figure


def test_max_deviation_over_all_cells_is_reported_convention():
    deviations = []
    for model, method, rank, clients, paper in PAPER_CELLS:
        (row,) = comm.comm_table(model, [method], [rank], clients)
        deviations.append(abs(row["paper_comm"] / UNIT[model] - paper) / paper)
    assert max(deviations) == pytest.approx((2.83 - 2.8224) / 2.83)  # Llama Fed-SB r=120, 0.27 %
    assert comm.format_count(2_822_400, "M") == "2.82" and comm.format_count(2_825_000, "M") == "2.83"


def test_fedsb_round_cost_independent_of_clients_and_width():
    shapes, _ = comm.module_shapes("llama-3.2-3b")
    base = comm.fedsb(shapes, 160, 1)
    for c in (2, 5, 25, 1000):
        res = comm.fedsb(shapes, 160, c)
        assert (res.upload, res.download, res.paper) == (base.upload, base.download, base.paper)
    assert base.upload == base.download == base.paper == 196 * 160**2
    wide = [(name, m * 4, n * 3) for name, m, n in shapes]
    res = comm.fedsb(wide, 160, 5)
    assert res.upload == base.upload and res.basis > base.basis  # only the one-time basis grows
    for model in ("mistral-7b", "gemma-2-9b"):
        other, _ = comm.module_shapes(model)
        per_module = comm.fedsb(other, 120, 25).upload / len(other)
        assert per_module == 120**2


def test_fedex_download_is_the_means_and_the_stacked_factors_of_all_clients():
    shapes, _ = comm.module_shapes("llama-3.2-3b")
    lora = comm.fedit(shapes, 32, 1).paper
    for c in (1, 2, 5, 25, 1000):  # no dense encoding: the run sends factors whatever c (ledger-tested)
        fedex = comm.fedex(shapes, 32, c, head_params=7)
        assert fedex.download == (c + 1) * lora + 7 and fedex.download_encoding == "means + factors"
        assert fedex.paper == c * lora + 7  # the paper's convention: c * r(m+n), head once
        assert fedex.upload == comm.fedit(shapes, 32, c, head_params=7).upload
    flora = [comm.flora(shapes, 32, c).download for c in (1, 5, 25)]
    assert flora == [c * comm.fedit(shapes, 32, 1).paper for c in (1, 5, 25)]


def test_ffa_real_vs_paper_convention():
    res = comm.ffa([("x", 10, 30)], 3, 2, head_params=1)
    assert res.upload == res.download == 3 * 10 + 1  # B only (m x r)
    assert res.paper == 3 * 40 / 2 + 1
    odd = comm.ffa([("x", 10, 31)], 3, 2)
    assert odd.paper == 3 * 41 / 2  # half of an odd count is kept exact


def test_rank_cap_on_smollm2_kv():
    shapes, _ = comm.module_shapes("smollm2-135m")
    res = comm.fedsb(shapes, 200, 4)
    assert len(res.capped) == 60 and {r for _, r in res.capped} == {192}
    assert {name.rsplit(".", 1)[-1] for name, _ in res.capped} == {"k_proj", "v_proj"}
    assert res.upload == 150 * 200**2 + 60 * 192**2
    assert res.basis == sum(min(200, m, n) * (m + n) for _, m, n in shapes)
    assert comm.fedsb(shapes, 192, 4).capped == ()
    (row,) = comm.comm_table("smollm2-135m", ["fedsb"], [200], 4)
    assert row["capped_modules"] == 60 and row["capped_to"] == {"k_proj": 192, "v_proj": 192}
    text = comm.format_table([row])
    assert (
        "200*" in text and "capped at min(m, n) on 60 of 210 modules (k_proj -> 192, v_proj -> 192)" in text
    )


def test_bytes_per_dtype_and_table_rows():
    f32 = comm.comm_table("bert-base", ["fedsb", "fedit"], [32], 3, dtype="float32")
    bf16 = comm.comm_table("bert-base", ["fedsb", "fedit"], [32], 3, dtype="bfloat16")
    f16 = comm.comm_table("bert-base", ["fedsb"], [32], 3, dtype="float16")
    assert f32[0]["upload_bytes"] == 4 * 26_883 and bf16[0]["upload_bytes"] == 2 * 26_883
    assert f16[0]["download_bytes"] == 2 * 26_883
    assert f32[0]["basis_bytes"] == 4 * 32 * 1536 * 24 and f32[1]["basis_params"] == 0
    assert [r["method"] for r in bf16] == ["fedsb", "fedit"]
    rows = comm.comm_table("bert-base", ["fedit", "fedsb"], {"fedit": [32], "fedsb": [32, 48, 64]}, 3)
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("fedit", 32),
        ("fedsb", 32),
        ("fedsb", 48),
        ("fedsb", 64),
    ]
    assert comm.comm_table("bert-base", ["fedsb"], [32], 3, head_params=0)[0]["upload_params"] == 24_576
    # aliases and display names are accepted
    assert comm.comm_table("bert-base", ["Fed-SB", "FedEx-LoRA"], [32], 3)[1]["method"] == "fedex"


def test_targets_select_modules_peft_style():
    dense, head = comm.module_shapes("bert-base", ["dense"])
    assert head == 2307 and len(dense) == 36  # attention.output.dense, intermediate.dense, output.dense
    assert {(m, n) for _, m, n in dense} == {(768, 768), (3072, 768), (768, 3072)}
    qv, _ = comm.module_shapes("mistral-7b", ["q_proj", "v_proj"])
    assert len(qv) == 64 and {(m, n) for _, m, n in qv} == {(4096, 4096), (1024, 4096)}
    one_layer, _ = comm.module_shapes("llama-3.2-3b", ["layers.0.self_attn.q_proj"])
    assert one_layer == [("model.layers.0.self_attn.q_proj", 3072, 3072)]
    gemma, _ = comm.module_shapes("gemma-2-9b", ["o_proj"])
    assert gemma[0][1:] == (3584, 4096)  # head_dim 256 x 16 heads = 4096 in
    minilm, head = comm.module_shapes("minilm-l6")
    assert head == 0 and len(minilm) == 6 * 6  # query, key, value, dense x 3


def test_shipped_files_are_complete_and_match_their_configs():
    names = comm.shipped_models()
    assert names == sorted(
        ["bert-base", "gemma-2-9b", "llama-3.2-3b", "minilm-l6", "mistral-7b", "smollm2-135m"]
    )
    shapes_dir = Path(comm.__file__).parents[1] / "shapes"  # fedsb/shapes (comm is a package)
    for name in names:
        data = json.loads((shapes_dir / f"{name}.json").read_text())
        for key in (
            "name",
            "hf_id",
            "num_layers",
            "modules",
            "default_targets",
            "head_params",
            "source",
            "config",
        ):
            assert key in data, (name, key)
        assert data["name"] == name and data["source"]
        facts = comm.facts_from_config(AutoConfig.for_model(**data["config"]), name=name)
        assert all({rel: [m, n] for rel, m, n in layer} == data["modules"] for layer in facts.per_layer), name
        assert facts.num_layers == data["num_layers"] and facts.layer_prefix == data["layer_prefix"]
    # hub ids of shipped models resolve offline to the shipped facts
    assert comm.module_shapes("meta-llama/Llama-3.2-3B") == comm.module_shapes("llama-3.2-3b")


def test_config_defaults_match_fedsb_run_auto():
    assert comm.LLAMA_TARGETS == LLAMA_TARGETS and comm.BERT_TARGETS == BERT_TARGETS
    for model_type in comm.LLAMA_FAMILY:
        assert DEFAULT_TARGETS[model_type] == LLAMA_TARGETS
    for model_type in comm.BERT_FAMILY:
        assert DEFAULT_TARGETS[model_type] == BERT_TARGETS


def _linear_shapes(model: nn.Module, targets, strip: str = "") -> dict[str, tuple[int, int]]:
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(e in path.split(".") for e in DEFAULT_EXCLUDE):
            continue
        if any(path == t or path.endswith("." + t) for t in targets):
            out[path.removeprefix(strip)] = (module.out_features, module.in_features)
    return out


def _from_disk(tmp_path: Path, config, targets=None):
    config.save_pretrained(tmp_path)
    shapes, head = comm.module_shapes(str(tmp_path), targets)
    return {name: (m, n) for name, m, n in shapes}, head


def test_tiny_llama_config_on_disk_matches_the_built_model(tmp_path):
    # head_dim 16 != hidden / heads = 8: q/o widths follow head_dim, k/v follow the KV heads
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    shapes, head = _from_disk(tmp_path, cfg)
    assert head == 0
    assert shapes == _linear_shapes(LlamaForCausalLM(cfg), LLAMA_TARGETS)
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 32) and shapes[
        "model.layers.1.self_attn.k_proj"
    ] == (32, 32)


def test_tiny_gemma2_config_on_disk_matches_the_built_model(tmp_path):
    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    shapes, _ = _from_disk(tmp_path, cfg, ["q_proj", "o_proj", "down_proj"])
    assert shapes == _linear_shapes(Gemma2ForCausalLM(cfg), ["q_proj", "o_proj", "down_proj"])
    assert len(shapes) == 6


def test_tiny_bert_classifier_config_on_disk_matches_the_built_model(tmp_path):
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )
    shapes, head = _from_disk(tmp_path, cfg)
    model = BertForSequenceClassification(cfg)
    assert shapes == _linear_shapes(model, BERT_TARGETS, strip="bert.")
    assert len(shapes) == 2 * 6
    assert head == sum(p.numel() for p in model.classifier.parameters()) == 32 * 3 + 3
    qv, _ = _from_disk(tmp_path, cfg, ["query", "value"])
    assert qv == _linear_shapes(model, ["query", "value"], strip="bert.")


def test_heterogeneous_config_is_read_layer_by_layer(tmp_path):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        per_layer_config={1: {"intermediate_size": 24, "num_key_value_heads": 1}},
    )
    shapes, _ = _from_disk(tmp_path, cfg, ["k_proj", "up_proj"])
    assert shapes == {
        "model.layers.0.self_attn.k_proj": (16, 32),
        "model.layers.0.mlp.up_proj": (48, 32),
        "model.layers.1.self_attn.k_proj": (8, 32),
        "model.layers.1.mlp.up_proj": (24, 32),
        "model.layers.2.self_attn.k_proj": (16, 32),
        "model.layers.2.mlp.up_proj": (48, 32),
    }


def test_errors_name_field_and_value(tmp_path):
    def check(exc: pytest.ExceptionInfo, field: str, value: object) -> None:
        assert exc.value.field == field and exc.value.value == value and exc.value.fix
        assert f"{field}={value!r}" in str(exc.value)

    with pytest.raises(FedsbError) as exc:
        comm.module_shapes("no-such-model-xyz")
    check(exc, "model", "no-such-model-xyz")
    assert "llama-3.2-3b" in exc.value.fix  # lists the shipped names
    GPT2Config(n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(FedsbError) as exc:
        comm.module_shapes(str(tmp_path))
    check(exc, "model", str(tmp_path))
    assert "gpt2" in str(exc.value) and "bert-base" in exc.value.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedsbError) as exc:
        comm.module_shapes(str(empty))
    check(exc, "model", str(empty))
    with pytest.raises(FedsbError) as exc:
        comm.comm_table("bert-base", ["fedavg"], [32], 3)
    check(exc, "method", "fedavg")
    shapes, _ = comm.module_shapes("bert-base")
    for bad in (0, -4, True, 2.5):
        for fn in comm.METHODS.values():
            with pytest.raises(FedsbError) as exc:
                fn(shapes, bad, 3)
            check(exc, "rank", bad)
    for bad in (0, -1):
        with pytest.raises(FedsbError) as exc:
            comm.comm_table("bert-base", ["fedsb"], [32], bad)
        check(exc, "clients", bad)
        with pytest.raises(FedsbError) as exc:
            comm.fedex(shapes, 32, bad)
        check(exc, "clients", bad)
    with pytest.raises(FedsbError) as exc:
        comm.comm_table("bert-base", ["fedsb"], [0], 3)
    check(exc, "rank", 0)
    with pytest.raises(FedsbError) as exc:
        comm.comm_table("bert-base", ["fedsb"], [32], 3, dtype="int3")
    check(exc, "dtype", "int3")
    with pytest.raises(FedsbError) as exc:
        comm.module_shapes("bert-base", ["q_proj"])
    check(exc, "targets", "q_proj")
    assert "query" in exc.value.fix
    with pytest.raises(FedsbError) as exc:
        comm.module_shapes("bert-base", ["re:.*query"])
    check(exc, "targets", "re:.*query")
    with pytest.raises(FedsbError) as exc:
        comm.comm_table("bert-base", ["fedsb"], [32], 3, head_params=-1)
    check(exc, "head_params", -1)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedsb")
    sub = parser.add_subparsers(dest="command")
    cli.add_comm_parser(sub)
    args = parser.parse_args(argv)
    assert args.command == "comm" and args.handler is cli.cmd_comm
    return cli.cmd_comm(args)


def test_cli_prints_the_table(capsys):
    argv = ["comm", "--model", "llama-3.2-3b", "--method", "fedsb", "fedit", "ffa", "fedex", "flora"]
    assert _cli([*argv, "--rank", "32", "120", "160", "200", "--clients", "5", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("llama-3.2-3b: 196 adapted modules (28 layers x q_proj")
    table = [line for line in lines if line.startswith(("Fed", "FFA", "FLoRA"))]
    assert len(table) == 5 * 4
    assert len({len(line) for line in table[:-1]}) <= 2  # aligned (the FedEx cell adds its encoding)
    fedsb120 = next(line.split() for line in table if line.split()[:2] == ["Fed-SB", "120"])
    assert fedsb120[2:5] == ["5", "2.82", "2,822,400"]
    fedex = next(line for line in table if line.startswith("FedEx-LoRA  32"))
    assert "243.14" in fedex and "(means + factors)" in fedex and "583.53 MB" in fedex
    assert "# Comm. (M)" in out and "once: basis params" in out


def test_cli_per_method_ranks_json_and_errors(capsys):
    argv = ["comm", "--model", "bert-base", "--method", "fedit", "fedsb:32,48,64", "--clients", "3"]
    assert _cli([*argv, "--json", "--dtype", "float32"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["rank"], r["paper_comm_display"]) for r in rows] == [
        ("fedit", 32, "1181.96"),
        ("fedsb", 32, "26.88"),
        ("fedsb", 48, "57.60"),
        ("fedsb", 64, "100.61"),
    ]
    assert rows[1]["upload_bytes"] == 4 * 26_883 and rows[1]["dtype"] == "float32"
    assert _cli(["comm", "--model", "gemma-2-9b", "--method", "fedsb", "--rank", "0", "--clients", "25"]) == 2
    assert "fedsb: error: rank=0" in capsys.readouterr().err
    assert _cli(["comm", "--model", "nope-model", "--clients", "2"]) == 2
    assert "model='nope-model'" in capsys.readouterr().err
    assert _cli(["comm", "--model", "bert-base", "--method", "fedsb:x", "--clients", "2"]) == 2
    assert "method='fedsb:x'" in capsys.readouterr().err


def test_comm_module_does_not_import_torch():
    code = (
        "import sys; from fedsb import comm; "
        "comm.comm_table('gemma-2-9b', list(comm.METHODS), [32], 25); "
        "comm.comm_table('bert-base', ['fedsb'], [32], 3, client_ranks=[8, 16, 32], federated_init='sketch'); "
        "comm.comm_table('bert-base', ['fedsb', 'ravan'], [8], 3, dtype='int8', wire_scale='row'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(comm.__file__).parents[2])}  # src/
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_int8_bytes_are_one_per_parameter_plus_a_scale_per_tensor() -> None:
    from fedsb.comm import comm_table
    from fedsb.errors import FedsbError

    (f32,) = comm_table("minilm-l6", ["fedsb"], [32], 5)
    (i8,) = comm_table("minilm-l6", ["fedsb"], [32], 5, dtype="int8")
    modules = i8["modules"]
    assert i8["upload_params"] == f32["upload_params"] == modules * 32 * 32
    assert i8["upload_bytes"] == modules * 32 * 32 + 4 * modules  # one fp32 scale per R
    assert f32["upload_bytes"] / i8["upload_bytes"] > 3.9
    assert i8["basis_bytes"] == f32["basis_bytes"]  # the basis still travels in float32
    (fedit,) = comm_table("minilm-l6", ["fedit"], [8], 5, dtype="int8")
    assert fedit["upload_bytes"] == fedit["upload_params"] + 4 * 2 * modules  # A and B, a scale each
    with pytest.raises(FedsbError, match="does not apply to fedex"):
        comm_table("minilm-l6", ["fedex"], [8], 5, dtype="int8")
