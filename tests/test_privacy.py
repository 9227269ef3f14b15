"""Differential privacy: DP-SGD moves only the trained tensors, clips per example like an explicit loop,
reports Opacus' own epsilon, persists its ledger across resume; client-level DP-FedAvg; clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.config import TrainConfig, resolve_config
from fedsb.errors import ConfigError
from fedsb.fed.base import SetupContext, get_method_class
from fedsb.privacy.accounting import PrivacyAccount, plan_account, solve_noise_multiplier
from fedsb.privacy.client_level import ClippedNoisyMean
from fedsb.privacy.dpsgd import DPSGD, poisson_batches
from fedsb.privacy.noise import SecureNoise, SeededNoise
from fedsb.train.local import causal_lm_loss, per_example_causal_lm_loss, train_local
from fedsb.train.schedule import Schedule
from tiny import VOCAB, lm_batches, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _method(name: str = "fedsb"):
    cfg = resolve_config(TINY, [f"fed.method={name}", "adapter.rank=4"])
    ctx = SetupContext(cfg=cfg, init_batches=lambda: lm_batches(), num_samples=8, loss_fn=causal_lm_loss)
    return get_method_class(name).create(make_tiny_llama(), ctx)


def _labelled_batch(batch: int = 6, seq: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    """Different numbers of answer tokens per example, so token-pooled and per-example losses differ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    for i in range(batch):
        labels[i, seq - 2 - (i % 4) :] = ids[i, seq - 2 - (i % 4) :]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _account(sigma: float, q: float, delta: float = 1e-3) -> PrivacyAccount:
    return PrivacyAccount("c", sigma, q, delta, "prv", planned_steps=10)


def _sgd(lr: float = 1.0) -> TrainConfig:
    return TrainConfig(optimizer="sgd", lr=lr, batch_size=6, local_steps=1, bf16=False, max_grad_norm=None)


def test_per_example_loss_is_the_mean_of_single_example_losses() -> None:
    model, batch = make_tiny_llama(), _labelled_batch()
    pooled = per_example_causal_lm_loss(model, batch)
    singles = [
        per_example_causal_lm_loss(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(6)
    ]
    assert float(pooled) == pytest.approx(float(torch.stack(singles).mean()), rel=1e-5)
    for i in range(6):  # one example: its own token mean, as HF computes it
        one = {k: v[i : i + 1] for k, v in batch.items()}
        assert float(singles[i]) == pytest.approx(float(model(**one).loss), rel=1e-5)
    assert abs(float(pooled) - float(causal_lm_loss(model, batch))) > 1e-4  # token-pooled differs


@pytest.mark.parametrize("method_name", ["fedsb", "fedit", "ffa"])
def test_dp_step_clips_per_example_like_an_explicit_loop(method_name: str) -> None:
    """sigma = 0, SGD lr 1: the step is -(1/b) sum_i g_i min(1, C/||g_i||), g_i from per-example autograd."""
    method = _method(method_name)
    model, params = method.adapted.model, method.adapted.trainable_parameters()
    batch, C = _labelled_batch(), 0.05
    # explicit loop: per-example gradients of the trained tensors only
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []
    for i in range(6):
        grads = torch.autograd.grad(
            per_example_causal_lm_loss(model, {k: v[i : i + 1] for k, v in batch.items()}),
            list(params.values()),
        )
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        norms.append(norm)
        for (k, _), g in zip(params.items(), grads, strict=True):
            expected[k] -= g * min(1.0, C / (norm + 1e-6)) / 6
    assert max(norms) > C  # clipping is active
    before = {k: p.detach().clone() for k, p in params.items()}
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in params}
    dp = DPSGD(_account(0.0, 6 / 60), max_grad_norm=C, num_examples=60, poisson=False)
    train_local(
        model,
        params,
        lambda e: [batch],
        _sgd(),
        steps=1,
        schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant"),
        loss_fn=per_example_causal_lm_loss,
        privacy=dp,
    )
    for k, p in params.items():
        torch.testing.assert_close(p.detach() - before[k], expected[k], rtol=1e-4, atol=1e-7)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # nothing else moved
    assert dp.account.steps == 1
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())  # no trace
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_noisy_dp_step_moves_only_the_trained_tensors_by_a_sensible_amount() -> None:
    method = _method("fedsb")
    model, params = method.adapted.model, method.adapted.trainable_parameters()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sigma, C, b = 1.0, 0.1, 6
    dp = DPSGD(_account(sigma, b / 60), max_grad_norm=C, num_examples=60, poisson=False)
    train_local(
        model,
        params,
        lambda e: [_labelled_batch()],
        _sgd(lr=1.0),
        steps=1,
        schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant"),
        loss_fn=per_example_causal_lm_loss,
        privacy=dp,
    )
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == set(params)
    step = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in params))
    d = sum(p.numel() for p in params.values())
    expected = sigma * C * math.sqrt(d) / b  # the noise dominates: ||N(0, (sigma C / b)^2 I_d)||
    assert 0.5 * expected < float(step) < 1.5 * expected + C


def test_poisson_batches_are_secret_by_default_seeded_on_request_and_may_be_empty() -> None:
    ds = datasets.Dataset.from_dict({"x": list(range(40))})

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows])}

    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)

    def draw(noise, q: float) -> list[list[int]]:
        return [
            b["x"].tolist() if b else [] for b in poisson_batches(loader, sample_rate=q, steps=50, noise=noise)
        ]

    assert draw(SeededNoise(1), 0.1) == draw(SeededNoise(1), 0.1) != draw(SeededNoise(2), 0.1)
    assert draw(SecureNoise(), 0.1) != draw(SecureNoise(), 0.1)  # never repeats, whatever the seed
    for noise in (SeededNoise(1), SecureNoise()):
        sizes = [len(b) for b in draw(noise, 0.1)]
        assert 2 < sum(sizes) / len(sizes) < 6  # expected q N = 4
    assert any(len(b) == 0 for b in draw(SeededNoise(3), 0.01))  # empty draws happen at small rates
    # the default DP-SGD settings sample with the OS CSPRNG: the same seed gives different batches
    dp = DPSGD(_account(1.0, 0.1), max_grad_norm=0.1, num_examples=40)
    runs = [[len(b) for b in dp.batches(lambda e: loader, 30, seed=7)] for _ in range(2)]
    assert runs[0] != runs[1]
    dp.reproducible_noise = True
    runs = [[len(b) for b in dp.batches(lambda e: loader, 30, seed=7)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_empty_poisson_batches_release_noise_and_are_accounted() -> None:
    method = _method("fedsb")
    model, params = method.adapted.model, method.adapted.trainable_parameters()
    rows = _labelled_batch(batch=8)
    ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in rows.items()})

    def collate(items):
        return {k: torch.tensor([it[k] for it in items]) for k in items[0]}

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    before = {k: p.detach().clone() for k, p in params.items()}
    dp = DPSGD(_account(1.0, 0.02), max_grad_norm=0.1, num_examples=8, poisson=True)
    result, _ = train_local(
        model,
        params,
        lambda e: loader,
        _sgd(lr=0.1),
        steps=6,
        schedule=Schedule(base_lr=0.1, total=6, warmup=0, kind="constant"),
        loss_fn=per_example_causal_lm_loss,
        privacy=dp,
        seed=5,
    )
    assert result.steps == 6 and dp.account.steps == 6 and len(result.losses) < 6  # some draws were empty
    assert any(not torch.equal(p.detach(), before[k]) for k, p in params.items())


def test_reported_epsilon_equals_opacus_accountants() -> None:
    for name, cls in (("prv", PRVAccountant), ("rdp", RDPAccountant)):
        acc = PrivacyAccount("c", 1.1, 0.05, 1e-4, name, planned_steps=300)
        for _ in range(120):
            acc.step()
        ref = cls()
        for _ in range(120):
            ref.step(noise_multiplier=1.1, sample_rate=0.05)
        assert acc.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-4), rel=1e-9)
        assert PrivacyAccount.from_dict(acc.to_dict()).epsilon() == pytest.approx(acc.epsilon(), rel=1e-12)


def test_solved_sigma_matches_opacus_make_private_with_epsilon() -> None:
    """Golden: our sigma for (eps, delta, q, steps) is the one Opacus' PrivacyEngine solves for the same job."""
    data = torch.utils.data.TensorDataset(torch.randn(200, 4), torch.randint(0, 2, (200,)))
    loader = torch.utils.data.DataLoader(data, batch_size=20)
    model = torch.nn.Linear(4, 2)
    engine = PrivacyEngine(accountant="prv")
    _, opt, _ = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        target_epsilon=3.0,
        target_delta=1 / 200,
        epochs=3,
        max_grad_norm=1.0,
    )
    ours = solve_noise_multiplier(
        target_epsilon=3.0, delta=1 / 200, sample_rate=0.1, steps=30, accountant="prv"
    )
    assert ours == pytest.approx(opt.noise_multiplier, rel=1e-9)
    acc = plan_account(
        unit="c",
        target_epsilon=3.0,
        noise_multiplier=None,
        delta=1 / 200,
        sample_rate=0.1,
        planned_steps=30,
        accountant="prv",
    )
    acc.step(30)
    assert 2.9 < acc.epsilon() <= 3.0


def test_unreachable_target_epsilon_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon=0.001 cannot be met .* fix: raise"):
        solve_noise_multiplier(target_epsilon=1e-3, delta=1e-9, sample_rate=1.0, steps=1, accountant="rdp")
    with pytest.raises(ConfigError, match=r"below the PRV accountant's resolution .* privacy.accountant=rdp"):
        solve_noise_multiplier(target_epsilon=1e-3, delta=1e-5, sample_rate=0.5, steps=100, accountant="prv")


def test_privacy_settings_are_validated() -> None:
    with pytest.raises(
        ConfigError, match="exactly one of privacy.target_epsilon and privacy.noise_multiplier"
    ):
        resolve_config(TINY, ["privacy.mode=sample"])
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_config(
            TINY, ["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.noise_multiplier=1"]
        )
    with pytest.raises(ConfigError, match="train.grad_accum=2 is not supported with privacy.mode=sample"):
        resolve_config(TINY, ["privacy.mode=sample", "privacy.target_epsilon=3", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="does not apply to fed.method=flora"):
        resolve_config(TINY, ["privacy.mode=client", "privacy.noise_multiplier=1", "fed.method=flora"])
    with pytest.raises(ConfigError, match="privacy.delta=2"):
        resolve_config(TINY, ["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.delta=2"])
    with pytest.raises(ConfigError, match="privacy.accountant='gdpx'"):
        resolve_config(TINY, ["privacy.accountant=gdpx"])


def test_client_level_mean_is_exact_without_noise_and_clips_each_update() -> None:
    ref = {"a": torch.zeros(3, 3), "b": torch.ones(2)}
    g = torch.Generator().manual_seed(0)
    updates = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ref.items()} for _ in range(3)]
    agg = ClippedNoisyMean(ref, clip=10.0, noise_multiplier=0.0, denominator=3, noise=SecureNoise())
    for u in updates:
        agg.add(u, 100)
    out = agg.result()
    for k in ref:  # no clipping, no noise: the uniform mean of the client models
        torch.testing.assert_close(out[k], torch.stack([u[k] for u in updates]).mean(0), rtol=0, atol=1e-7)
    big = {k: v + 5.0 for k, v in ref.items()}  # ||delta|| = 5 sqrt(11)
    agg = ClippedNoisyMean(ref, clip=1.0, noise_multiplier=0.0, denominator=2, noise=SecureNoise())
    agg.add(big, 1)
    out = agg.result()
    delta = torch.sqrt(sum(((out[k] - ref[k]) ** 2).sum() for k in ref))
    assert float(delta) == pytest.approx(0.5, rel=1e-6)  # clipped to C = 1, divided by m = 2
    released = []
    agg = ClippedNoisyMean(
        ref, clip=1.0, noise_multiplier=2.0, denominator=4, noise=SecureNoise(), on_release=lambda: released.append(1)
    )
    agg.add(ref, 1)
    noise = torch.cat([(v - ref[k]).reshape(-1) for k, v in agg.result().items()])
    assert released == [1] and 0.1 < float(noise.std()) < 1.0  # std sigma C / m = 0.5


def _dp_run(out: Path, *extra: str) -> int:
    return main(
        [
            "run",
            "--config",
            TINY,
            "--output",
            str(out),
            "--no-progress",
            "threads=1",
            "privacy.mode=sample",
            "privacy.target_epsilon=4",
            "fed.rounds=2",
            *extra,
        ]
    )


def test_dp_run_ledger_persists_across_resume(tmp_path: Path) -> None:
    """Bit-identical DP resume needs repeatable noise: privacy.reproducible_noise=true."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _dp_run(full, "privacy.reproducible_noise=true") == 0
    assert _dp_run(cut, "privacy.reproducible_noise=true", "--stop-after-round", "1") == 0
    mid = json.loads((cut / "results.json").read_text())["privacy"]
    assert [r["round"] for r in mid["rounds"]] == [1]
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert a["privacy"] == b["privacy"]  # the same steps, sigmas and epsilons after resuming
    p = a["privacy"]
    assert p["mode"] == "sample" and p["accountant"] == "prv" and p["init"].startswith("covered")
    eps = [acc["epsilon"] for acc in p["accounts"].values()]
    assert p["max_epsilon"] == max(eps) and 3.5 < p["max_epsilon"] <= 4.0  # all planned steps were taken
    for acc in p["accounts"].values():
        # min(1e-5, 1 / (10 N_client)) with N_client = 32 examples, not 1 / number of batches
        assert acc["delta"] == pytest.approx(min(1e-5, 1 / 320))
        assert acc["steps"] == acc["planned_steps"] == 4 and acc["sample_rate"] == pytest.approx(4 / 32)
        ref = get_noise_multiplier(
            target_epsilon=4, target_delta=1e-5, sample_rate=4 / 32, steps=4, accountant="prv"
        )
        assert acc["noise_multiplier"] == pytest.approx(ref)
    assert p["rounds"][0]["max_epsilon"] < p["rounds"][1]["max_epsilon"] == p["max_epsilon"]
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["privacy"]["mode"] == "sample" and manifest["privacy"]["max_grad_norm"] == 0.1
    ra = load_file(str(full / "adapter" / "adapter.safetensors"))
    rb = load_file(str(cut / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)  # bit-identical global R


def test_pooled_init_is_flagged_as_not_covered(tmp_path: Path) -> None:
    assert _dp_run(tmp_path, "init.source=pooled", "fed.rounds=1", "export=false") == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["privacy"]["init"].startswith("NOT COVERED")


def test_client_level_run_accounts_one_release_per_round(tmp_path: Path) -> None:
    assert (
        main(
            [
                "run",
                "--config",
                TINY,
                "--output",
                str(tmp_path),
                "--no-progress",
                "threads=1",
                "privacy.mode=client",
                "privacy.noise_multiplier=0.8",
                "export=false",
            ]
        )
        == 0
    )
    p = json.loads((tmp_path / "results.json").read_text())["privacy"]
    acc = p["accounts"]["server"]
    assert p["mode"] == "client" and acc["steps"] == 2 and acc["sample_rate"] == 1.0
    ref = PRVAccountant()
    for _ in range(2):
        ref.step(noise_multiplier=0.8, sample_rate=1.0)
    assert p["max_epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)  # min(1e-5, 1/(10 x 2))
    assert p["delta"] == 1e-5 and p["delta_rule"].startswith("min(1e-5, 1/(10 N))")


def test_flower_refuses_sample_level_dp_instead_of_overstating_privacy() -> None:
    from fedsb.flower.client import check_flower_config

    with pytest.raises(ConfigError, match="privacy.mode='sample' is not supported by the Flower app"):
        check_flower_config(resolve_config(TINY, ["privacy.mode=sample", "privacy.target_epsilon=3"]))
    check_flower_config(resolve_config(TINY, ["privacy.mode=client", "privacy.noise_multiplier=1"]))


def test_noise_free_steps_have_no_finite_epsilon() -> None:
    acc = PrivacyAccount("c", 0.0, 0.1, 1e-3, "prv", planned_steps=2)
    assert acc.epsilon() == 0.0
    acc.step(2)
    assert acc.epsilon() == math.inf


def test_dp_step_on_an_encoder_with_a_head_clips_per_example_like_an_explicit_loop() -> None:
    """BERT-style encoder + classification head (trained and clipped with R), fp32, sigma = 0, SGD lr 1."""
    from fedsb.init.initialize import attach_basis, compute_basis
    from tiny import make_tiny_bert_cls

    model = make_tiny_bert_cls(num_labels=3)
    for m in model.modules():  # no dropout: the explicit loop and the DP step must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (5, 9), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 1, 2, 1, 0]),
    }
    basis = compute_basis(model, rank=4, init="random", generator=torch.Generator().manual_seed(1))
    adapted = attach_basis(model, basis)
    params = adapted.trainable_parameters()
    assert any("classifier" in k for k in params) and any("lora_sb_R" in k for k in params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    C, expected = 0.05, {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(model(**one).loss, list(params.values()))
        norm = float(torch.sqrt(sum((gr * gr).sum() for gr in grads)))
        for (k, _), gr in zip(params.items(), grads, strict=True):
            expected[k] -= gr * min(1.0, C / (norm + 1e-6)) / 5
    before = {k: p.detach().clone() for k, p in params.items()}
    cfg = TrainConfig(optimizer="sgd", lr=1.0, batch_size=5, local_steps=1, bf16=False, max_grad_norm=None)
    dp = DPSGD(_account(0.0, 5 / 50), max_grad_norm=C, num_examples=50, poisson=False)
    train_local(
        model,
        params,
        lambda e: [batch],
        cfg,
        steps=1,
        schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant"),
        loss_fn=lambda m, b: m(**b).loss,
        privacy=dp,
    )
    for k, p in params.items():
        torch.testing.assert_close(p.detach() - before[k], expected[k], rtol=1e-4, atol=1e-7)
