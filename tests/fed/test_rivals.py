"""The 2025 rivals, RAVAN and FedSVD: their layers and server rules beyond the shared exactness table
(tests/fed/test_methods.py), their bytes against `fedsb comm`, PEFT export, DP, and Flower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedsb import comm
from fedsb.cli import main
from fedsb.config import resolve_config
from fedsb.errors import ConfigError, FedsbError
from fedsb.export import export_peft
from fedsb.fed.base import ClientUpdate, SetupContext, get_method_class
from fedsb.fed.fedsvd import refactorize
from fedsb.fed.ledger import Ledger
from fedsb.fed.lora_base import lora_names
from fedsb.fed.rounds import Server, decode, encode
from fedsb.fed.sampling import ClientSampler
from fedsb.train.local import causal_lm_loss
from tiny import lm_batches, make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _method(name: str, *extra: str):
    cfg = resolve_config(TINY, [f"fed.method={name}", "adapter.rank=4", *extra])
    ctx = SetupContext(cfg=cfg, init_batches=lambda: lm_batches(), num_samples=8, loss_fn=causal_lm_loss)
    return get_method_class(name).create(make_tiny_llama(), ctx)


def _perturb(adapted, seed: int = 7, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    adapted.set_state(
        {k: v + scale * torch.randn(v.shape, generator=g) for k, v in adapted.get_state().items()}
    )


# ---- RAVAN -----------------------------------------------------------------------------------------------


def test_ravan_heads_split_one_orthonormal_basis_into_mutually_orthogonal_subspaces() -> None:
    method = _method("ravan")
    for layer in method.adapted.layers.values():
        assert (layer.heads, layer.head_rank, layer.rank) == (4, 4, 16)
        B, A = layer.ravan_B.double(), layer.ravan_A.double()  # (m, 16), (16, n)
        torch.testing.assert_close(B.T @ B, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.equal(layer.delta_weight(), torch.zeros_like(layer.delta_weight()))  # H = 0: W0
    names = method.adapted.trainable_names()
    path = next(iter(method.adapted.layers))
    assert [n for n in names if n.startswith(path + ".")] == [
        *(f"{path}.ravan_H.{k}.weight" for k in range(4)),
        f"{path}.ravan_s.weight",
    ]
    assert set(method.upload_spec()) == {
        f"{p}.ravan_H.{k}.weight" for p in method.adapted.layers for k in range(4)
    }
    again = _method("ravan")
    assert again.basis_fingerprint == method.basis_fingerprint  # the server's draw is seeded
    assert _method("ravan", "seed=1").basis_fingerprint != method.basis_fingerprint


def test_ravan_layer_computes_its_delta_weight_sum_of_s_k_b_k_h_k_a_k() -> None:
    method = _method("ravan", "adapter.scaling=0.7")
    _perturb(method.adapted, scale=0.3)  # s_k != 1, H_k != 0
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    for layer in method.adapted.layers.values():
        if layer.in_features != 32:
            continue
        s = layer.ravan_s.weight.detach()
        assert float((s - 1).abs().min()) > 1e-3
        r = layer.head_rank
        by_head = sum(
            s[k] * layer.ravan_B[:, k * r : (k + 1) * r] @ H.weight @ layer.ravan_A[k * r : (k + 1) * r]
            for k, H in enumerate(layer.ravan_H)
        )
        torch.testing.assert_close(layer.delta_weight(), 0.7 * by_head.detach(), atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x), layer.base_layer(x) + x @ layer.delta_weight().T, atol=1e-5, rtol=1e-5
            )


def test_ravan_lora_sb_init_starts_where_fed_sb_at_rank_h_times_r_starts() -> None:
    ravan = _method("ravan", "ravan.init=lora-sb", "ravan.heads=2", "adapter.rank=2")
    fedsb = _method("fedsb", "adapter.rank=4")
    for path, layer in ravan.adapted.layers.items():
        torch.testing.assert_close(
            layer.delta_weight(), fedsb.adapted.layers[path].delta_weight(), atol=1e-6, rtol=1e-5
        )
    assert float(next(iter(ravan.adapted.layers.values())).delta_weight().abs().max()) > 0
    zero = ravan.untuned_state()
    ravan.adapted.set_state(zero)
    assert all(float(layer.delta_weight().abs().max()) == 0 for layer in ravan.adapted.layers.values())


def test_ravan_trims_capped_layers_to_whole_heads_and_refuses_more_heads_than_a_layer_allows() -> None:
    method = _method("ravan", "adapter.rank=5", "ravan.heads=3")  # 15 fits 32 x 32; k/v (16 x 32) cap at 16
    ranks = {
        p.rsplit(".", 1)[-1]: (layer.head_rank, layer.rank) for p, layer in method.adapted.layers.items()
    }
    assert ranks["q_proj"] == (5, 15) and ranks["k_proj"] == (5, 15)  # 16 // 3 = 5 heads' worth
    small = _method("ravan", "adapter.rank=8", "ravan.heads=3")  # k/v: 16 // 3 = 5 < 8
    assert {p.rsplit(".", 1)[-1]: lay.head_rank for p, lay in small.adapted.layers.items()}["k_proj"] == 5
    with pytest.raises(FedsbError, match="ravan.heads"):
        _method("ravan", "adapter.rank=1", "ravan.heads=17")  # more heads than k_proj's rank 16
    with pytest.raises(ConfigError, match="ravan.heads"):
        resolve_config(TINY, ["ravan.heads=0"])
    with pytest.raises(ConfigError, match="ravan.init"):
        resolve_config(TINY, ["ravan.init=pissa"])


def test_ravan_uploads_s_times_h_because_averaging_s_and_h_apart_is_not_exact() -> None:
    method = _method("ravan")
    layer = next(iter(method.adapted.layers.values()))
    clients = []
    for seed in (1, 2):
        _perturb(method.adapted, seed=seed, scale=0.3)  # s_k = 1 + noise, H_k = noise
        sent = method.client_upload(method.adapted)
        s = layer.ravan_s.weight.detach().clone()
        H = [h.weight.detach().clone() for h in layer.ravan_H]
        torch.testing.assert_close(sent[f"{next(iter(method.adapted.layers))}.ravan_H.1.weight"], s[1] * H[1])
        clients.append((s, H, layer.delta_weight().double()))
        method.install_global()
    products = torch.stack([c[1][1] * c[0][1] for c in clients]).mean(0)
    apart = torch.stack([c[0][1] for c in clients]).mean() * torch.stack([c[1][1] for c in clients]).mean(0)
    assert float((products - apart).abs().max()) > 1e-3  # mean(s) mean(H) != mean(s H)
    fixed = _method("ravan", "ravan.train_scales=false")
    assert not any(n.endswith("ravan_s.weight") for n in fixed.adapted.trainable_names())
    _perturb(fixed.adapted)
    assert all(
        torch.equal(fixed.client_upload(fixed.adapted)[k], v) for k, v in fixed.adapted.get_state().items()
    )


def test_ravan_exports_losslessly_as_one_peft_lora_of_rank_h_times_r(tmp_path: Path) -> None:
    method = _method("ravan", "adapter.scaling=0.5")
    _perturb(method.adapted, scale=0.3)
    base_dir = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_dir)
    summary = export_peft(method.adapted, tmp_path / "peft", base_model=str(base_dir))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert summary["rank"] == cfg["r"] == 16 and cfg["lora_alpha"] == 0.5 * 16
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).float().eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        ours = method.adapted.model.eval()(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    assert float((ours - plain).abs().max()) > 1e-3  # the adapter changes the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# ---- FedSVD ----------------------------------------------------------------------------------------------


def test_refactorize_keeps_the_product_and_returns_the_svd_of_it() -> None:
    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(20, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 30, generator=g, dtype=torch.float64),
    )
    B2, A2 = refactorize(B, A)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-12, rtol=0)
    torch.testing.assert_close(A2 @ A2.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    S = torch.linalg.svdvals(B @ A)[:4]
    torch.testing.assert_close(B2.norm(dim=0), S, atol=1e-12, rtol=0)  # B = U S: column norms = sigma
    torch.testing.assert_close(B2.T @ B2, torch.diag(S**2), atol=1e-10, rtol=0)
    Bz, Az = refactorize(torch.zeros(20, 4, dtype=torch.float64), A)  # nothing learned: still orthonormal
    assert float(Bz.abs().max()) == 0
    torch.testing.assert_close(Az @ Az.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


class SeparateClients:
    """Flower-style clients on their OWN model copy, fed the encoded download like a SuperNode."""

    def __init__(self, server_method, wire: str) -> None:
        self.party = _method("fedsvd", f"fed.wire_dtype={wire}")
        self.wire = server_method.wire_dtype
        self.models: dict[str, dict[str, torch.Tensor]] = {}

    def train_round(self, round: int, client_ids, download):
        self.party.client_receive(self.party.adapted, decode(download), round)
        start = self.party.adapted.get_state()
        for i, cid in enumerate(client_ids):
            g = torch.Generator().manual_seed(100 * round + i)
            sent = encode(
                {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()}, self.wire
            )
            self.party.adapted.set_state(decode(sent))  # the client's model, with what it sends
            self.models[cid] = {
                p: layer.base_layer.weight.double() + layer.delta_weight().detach().double()
                for p, layer in self.party.adapted.layers.items()
            }
            yield ClientUpdate(cid, round, 10 + i, sent, None, {"loss": 1.0})


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_fedsvd_global_product_is_the_mean_of_client_products_on_separate_parties(wire: str) -> None:
    """The server re-factorizes with the A the clients trained with, i.e. as the wire carried it."""
    method = _method("fedsvd", f"fed.wire_dtype={wire}")
    server = Server(method, ClientSampler(["a", "b", "c"], 1.0, seed=0), Ledger(wire), wire_dtype=wire)
    clients = SeparateClients(method, wire)
    for rnd in (1, 2, 3):  # from round 2 on, A is the previous round's V^T (not representable in bf16)
        clients.models.clear()
        server.run_round(rnd, clients)
        sizes = {"a": 10, "b": 11, "c": 12}
        for path, layer in method.adapted.layers.items():
            expected = sum(sizes[c] * m[path] for c, m in clients.models.items()) / sum(sizes.values())
            got = layer.base_layer.weight.double() + layer.delta_weight().detach().double()
            assert float((got - expected).abs().max()) < 1e-6, (wire, rnd, path)
            A = layer.lora_A.weight.double()
            torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    down = method.download()
    a_name, b_name = lora_names(next(iter(method.adapted.layers)))
    assert {a_name, b_name} <= set(down) and a_name not in method.upload_spec()


def test_fedsvd_trains_only_b_and_its_first_a_is_ffas_seeded_a() -> None:
    svd, ffa = _method("fedsvd"), _method("ffa")
    assert svd.adapted.trainable_names() == ffa.adapted.trainable_names()
    for p, layer in svd.adapted.layers.items():
        assert torch.equal(layer.lora_A.weight, ffa.adapted.layers[p].lora_A.weight)


# ---- both: bytes, DP, Flower -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ravan", "fedsvd"])
def test_ledger_bytes_equal_the_comm_formulas(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    args = ["run", "--config", TINY, "--no-progress", "--output", str(out), f"fed.method={name}"]
    assert main([*args, "adapter.rank=4", "export=false", "eval.initial=false", "threads=1"]) == 0
    from fedsb.trained import load_trained

    results = json.loads((out / "results.json").read_text())
    method, _, _ = load_trained(out)  # the run's own model: its layer shapes
    shapes = [(p, layer.out_features, layer.in_features) for p, layer in method.adapted.layers.items()]
    expected = getattr(comm, name)(shapes, 4, 2, 0)
    ledger = results["ledger"]
    for e in ledger["entries"]:
        assert e["params"] == (expected.upload if e["direction"] == "up" else expected.download)
        assert e["bytes"] == 4 * e["params"]
    assert ledger["totals"]["bytes_one_time"] == 2 * 4 * expected.basis  # the bases once to each client
    assert len(ledger["entries"]) == 2 * 2 * 2  # 2 clients, up and down, 2 rounds


def test_ravan_and_fedsvd_comm_rows_and_cli(capsys) -> None:
    shapes, head = comm.module_shapes("bert-base")
    sb, rv = comm.fedsb(shapes, 64, 5, head), comm.ravan(shapes, 32, 5, head, heads=4)
    assert rv.upload == rv.download == sb.upload  # 4 heads of 32^2 = one 64^2 core
    assert rv.basis == 2 * sb.basis  # rank 4 x 32 = 128 bases, once
    svd, ffa = comm.fedsvd(shapes, 8, 5, head), comm.ffa(shapes, 8, 5, head)
    assert svd.upload == ffa.upload and svd.download == comm.fedit(shapes, 8, 5, head).download
    small = comm.ravan([("k", 16, 32)], 8, 3, heads=3)
    assert small.upload == 3 * 5 * 5 and small.capped == (("k", 5),)
    with pytest.raises(FedsbError, match="heads"):
        comm.ravan([("k", 16, 32)], 8, 3, heads=17)
    assert (
        main(["comm", "--model", "bert-base", "--method", "ravan:32", "fedsvd:8", "--clients", "5", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method_name"], r["upload_params"]) for r in rows] == [
        ("RAVAN", rv.upload),
        ("FedSVD", svd.upload),
    ]
    assert rows[0]["heads"] == 4 and "heads" not in rows[1]


def test_dp_step_gives_ravan_scales_their_own_per_example_gradients() -> None:
    """With H != 0 the scales get real gradients; Opacus computes them per example (functorch fallback)."""
    from test_privacy import check_dp_step_against_explicit_loop

    method = _method("ravan")
    _perturb(method.adapted, scale=0.5)
    check_dp_step_against_explicit_loop(
        method, must_move=tuple(n for n in method.adapted.trainable_names() if "ravan_s" in n)
    )


@pytest.mark.parametrize("name", ["ravan", "fedsvd"])
def test_client_level_dp_runs_for_the_new_methods(name: str, tmp_path: Path) -> None:
    args = ["run", "--config", TINY, "--no-progress", "--output", str(tmp_path), f"fed.method={name}"]
    extra = [
        "privacy.mode=client",
        "privacy.noise_multiplier=0.5",
        "fed.rounds=1",
        "export=false",
        "threads=1",
    ]
    assert main([*args, *extra, "eval.initial=false"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["privacy"]["mode"] == "client"


@pytest.mark.parametrize("name", ["ravan", "fedsvd"])
def test_flower_matches_the_simulator_and_its_bytes_equal_the_ledger(name: str, tmp_path: Path) -> None:
    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
    from fedsb.flower.client_app import app as client_app
    from fedsb.flower.protocol import AppSettings
    from fedsb.flower.server_app import run_flower_job
    from fedsb.run import run_job
    from flower_grid import LocalGrid

    base = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"]
    overrides = [*base, f"fed.method={name}"]
    run_job(resolve_config(TINY, [*overrides, f"output_dir={tmp_path / 'sim'}"]), echo=lambda s: None)
    settings = AppSettings(config=TINY, overrides=" ".join(overrides), output_dir=str(tmp_path / "flwr"))
    res = run_flower_job(LocalGrid(client_app, 2), settings)

    def state(out: Path) -> dict[str, torch.Tensor]:
        _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        return {k: v for k, v in tensors.items() if k.startswith("global/")}

    a, b = state(tmp_path / "sim"), state(tmp_path / "flwr")
    assert set(a) == set(b) and len(a) > 14
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert max(float(v.abs().max()) for v in a.values()) > 1e-4  # trained, so equality is not trivial
    wire, ledger = res["flower_wire"], res["ledger"]
    for direction in ("up", "down"):
        flwr_bytes = sum(w["bytes"] for w in wire if w["round"] > 0 and w["direction"] == direction)
        assert flwr_bytes == ledger["totals"][f"bytes_{direction}"] > 0
    setup = sum(w["bytes"] for w in wire if w["round"] == 0)
    assert setup == sum(e["bytes"] for e in ledger["one_time"])
    assert (setup > 0) == (name == "ravan")  # RAVAN's bases travel once; FedSVD's A every round


@pytest.mark.parametrize("name", ["ravan", "fedsvd"])
def test_secagg_plus_matches_plain_averaging_within_quantization(name: str, tmp_path: Path) -> None:
    """Both aggregates are a weighted mean of what clients send, so SecAgg+ applies (tests/flower/test_flower_secagg)."""
    from flwr.app import Context, RecordDict

    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
    from fedsb.flower.client_app import app as client_app
    from fedsb.flower.protocol import AppSettings
    from fedsb.flower.secagg import SecAggSettings
    from fedsb.flower.server_app import run_flower_job
    from flower_grid import LocalGrid

    overrides = [
        *("threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"),
        *("data.train_size=60", "partition.num_clients=3", "fed.rounds=1", "train.local_steps=2"),
        f"fed.method={name}",
    ]
    settings = SecAggSettings(max_weight=100.0)
    server_ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

    def global_state(out: Path) -> dict[str, torch.Tensor]:
        _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}

    secure = AppSettings(
        config=TINY, overrides=" ".join(overrides), output_dir=str(tmp_path / "s"), secagg=True
    )
    run_flower_job(LocalGrid(client_app, 3), secure, server_ctx, secagg=settings)
    plain = run_flower_job(
        LocalGrid(client_app, 3),
        AppSettings(config=TINY, overrides=" ".join(overrides), output_dir=str(tmp_path / "p")),
    )
    ref = global_state(Path(plain["output_dir"]))
    bound = 3 * (2 * settings.clipping_range / settings.quantization_range) / (60 / settings.max_weight)
    got = global_state(tmp_path / "s")
    if name == "fedsvd":  # compare the products B A: the factors of a re-factorization may rotate
        A_got = {k.removeprefix("A/"): v for k, v in got.items() if k.startswith("A/")}
        A_ref = {k.removeprefix("A/"): v for k, v in ref.items() if k.startswith("A/")}
        moved = []
        for path in A_ref:
            b = lora_names(path)[1]
            ours = got[b].double() @ A_got[path].double()
            theirs = ref[b].double() @ A_ref[path].double()
            assert float((ours - theirs).abs().max()) <= 4 * bound, path  # r = 4 rows of |A| <= 1
            moved.append(float(theirs.abs().max()))
        assert A_ref and max(moved) > 10 * 4 * bound, max(moved)  # the comparison is not trivially satisfied
        return
    worst = max(float((got[k] - ref[k]).abs().max()) for k in got)
    assert worst <= bound and max(float(v.abs().max()) for v in got.values()) > 100 * bound


def test_compare_runs_the_rivals_and_the_init_ablation_at_one_rank(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    methods = ["ravan:2", "fedsvd:2", "fedsb:4", "fedsb:4/init.method=lora-xs", "fedsb:4/init.method=random"]
    args = ["compare", "--config", TINY, "--output", str(out), "--no-progress"]
    settings = ["fed.rounds=1", "export=false", "threads=1", "eval.initial=false"]
    assert main([*args, *settings, "--methods", *methods]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == ["ravan-r2", "fedsvd-r2", "fedsb-r4", "fedsb-r4-lora-xs", "fedsb-r4-random"]
    assert rows["fedsb-r4-random"]["settings"] == ["init.method=random"]
    inits = {v: json.loads((out / v / "results.json").read_text())["init"].get("method") for v in rows}
    assert inits["fedsb-r4"] == "lora-sb" and inits["fedsb-r4-lora-xs"] == "lora-xs"
    assert inits["fedsb-r4-random"] == "random" and inits["ravan-r2"] == "random"
    per_round = {v: r["bytes_per_round"] for v, r in rows.items()}
    assert per_round["ravan-r2"] == per_round["fedsb-r4"]  # 4 heads of 2 x 2 = one 4 x 4 core
    assert per_round["fedsb-r4"] == per_round["fedsb-r4-lora-xs"] == per_round["fedsb-r4-random"]
    assert main(["compare", "--config", TINY, "--output", str(out), "--methods", "fedsb:4/init.method"]) == 2
    assert main(["compare", "--config", TINY, "--output", str(out), "--methods", "fedsb:4", "fedsb:4"]) == 2


def test_ravan_bases_are_hashed_live_and_a_changed_basis_is_refused() -> None:
    from fedsb.errors import CheckpointError

    method = _method("ravan")
    assert method.client_fingerprint(method.adapted) == method.basis_fingerprint == method.basis.fingerprint
    with torch.no_grad():
        next(iter(method.adapted.layers.values())).ravan_A[0, 0] += 1e-3  # an in-place change of A_1
    assert method.client_fingerprint(method.adapted) != method.basis_fingerprint  # its updates are rejected
    with pytest.raises(CheckpointError, match="refusing to export"):
        method.verify_basis(before="export the run")
