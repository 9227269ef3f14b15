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
from fedsb.train.local import StepPlan, causal_lm_loss, per_example_causal_lm_loss, train_local
from fedsb.train.schedule import Schedule
from tiny import VOCAB, lm_batches, make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("method_name", ["fedsb", "fedit", "ffa", "ravan", "fedsvd"])
def test_dp_step_clips_per_example_like_an_explicit_loop(method_name: str) -> None:
    """sigma = 0, SGD lr 1: the step is -(1/b) sum_i g_i min(1, C/||g_i||), g_i from per-example autograd."""
    check_dp_step_against_explicit_loop(_method(method_name))


def check_dp_step_against_explicit_loop(method, must_move: tuple[str, ...] = ()) -> None:
    """One DP-SGD step of `method`'s trained tensors equals the explicit per-example loop; the tensors
    named in `must_move` get a non-zero update (so the comparison is not trivial for them)."""
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
        StepPlan(steps=1, schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant")),
        loss_fn=per_example_causal_lm_loss,
        privacy=dp,
    )
    for k, p in params.items():
        torch.testing.assert_close(p.detach() - before[k], expected[k], rtol=1e-4, atol=1e-7)
    assert all(float(expected[k].abs().max()) > 1e-6 for k in must_move)
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
        StepPlan(steps=1, schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant")),
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
            b["x"].tolist() if b else []
            for b in poisson_batches(loader, sample_rate=q, steps=50, noise=noise)
        ]

    assert draw(SeededNoise(1), 0.1) == draw(SeededNoise(1), 0.1) != draw(SeededNoise(2), 0.1)
    assert draw(SecureNoise(), 0.1) != draw(SecureNoise(), 0.1)  # never repeats, whatever the seed
    for noise in (SeededNoise(1), SecureNoise()):
        sizes = [len(b) for b in draw(noise, 0.1)]
        assert 2 < sum(sizes) / len(sizes) < 6  # expected q N = 4
    assert any(len(b) == 0 for b in draw(SeededNoise(3), 0.01))  # empty draws happen at small rates
    # the default DP-SGD settings sample with the OS CSPRNG: the same seed gives different batches
    dp = DPSGD(_account(1.0, 0.1), max_grad_norm=0.1, num_examples=40)
    runs = [
        [b["x"].tolist() if b else [] for b in dp.batches(lambda e: loader, 30, seed=7)] for _ in range(2)
    ]
    assert runs[0] != runs[1]
    dp.reproducible_noise = True
    runs = [
        [b["x"].tolist() if b else [] for b in dp.batches(lambda e: loader, 30, seed=7)] for _ in range(2)
    ]
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
        StepPlan(steps=6, schedule=Schedule(base_lr=0.1, total=6, warmup=0, kind="constant"), seed=5),
        loss_fn=per_example_causal_lm_loss,
        privacy=dp,
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
        ref,
        clip=1.0,
        noise_multiplier=2.0,
        denominator=4,
        noise=SecureNoise(),
        on_release=lambda: released.append(1),
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


def test_noise_free_steps_have_no_finite_epsilon() -> None:
    acc = PrivacyAccount("c", 0.0, 0.1, 1e-3, "prv", planned_steps=2)
    assert acc.epsilon() == 0.0
    acc.step(2)
    assert acc.epsilon() == math.inf


def test_dp_step_on_an_encoder_with_a_head_clips_per_example_like_an_explicit_loop() -> None:
    """BERT-style encoder + classification head (trained and clipped with R), fp32, sigma = 0, SGD lr 1."""
    from fedsb.init.initialize import BasisSpec, attach_basis, compute_basis
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
    basis = compute_basis(model, BasisSpec(rank=4, init="random"), generator=torch.Generator().manual_seed(1))
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
        StepPlan(steps=1, schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant")),
        loss_fn=lambda m, b: m(**b).loss,
        privacy=dp,
    )
    for k, p in params.items():
        torch.testing.assert_close(p.detach() - before[k], expected[k], rtol=1e-4, atol=1e-7)


# ---- issue 13: secret noise, fp32 clipping, nothing unnoised leaves a client, delta defaults -------------


def test_secure_noise_is_gaussian_secret_and_never_repeats() -> None:
    from fedsb.privacy.noise import noise_source
    from fedsb.seeding import derive_seed

    src = SecureNoise()
    a = src.gaussian((200_000,), std=0.5, dtype=torch.float64)
    assert abs(float(a.mean())) < 0.01 and float(a.std()) == pytest.approx(0.5, rel=0.01)
    assert 2.9 < float(((a / a.std()) ** 4).mean()) < 3.1  # Gaussian kurtosis
    assert not torch.equal(a, src.gaussian((200_000,), std=0.5, dtype=torch.float64))
    assert not torch.any(src.gaussian((3,), std=0.0, dtype=torch.float32))  # sigma = 0: no noise
    u = src.uniform(100_000)
    assert 0 < float(u.min()) and float(u.max()) <= 1 and abs(float(u.mean()) - 0.5) < 0.01
    # the run seed decides nothing unless privacy.reproducible_noise=true
    assert isinstance(noise_source(reproducible=False, seed=0, purpose=["dp-noise"]), SecureNoise)
    seeded = noise_source(reproducible=True, seed=0, purpose=["dp-noise"])
    again = SeededNoise(derive_seed(0, "dp-noise"))
    shape = (4, 4)
    assert torch.equal(
        seeded.gaussian(shape, std=1.0, dtype=torch.float32),
        again.gaussian(shape, std=1.0, dtype=torch.float32),
    )


def _one_dp_step(method, dp, seed: int, lr: float = 1.0) -> dict[str, torch.Tensor]:
    """One SGD DP-SGD step on a fixed batch of 6 from the method's current state; returns the change."""
    params = method.adapted.trainable_parameters()
    start = {k: p.detach().clone() for k, p in params.items()}
    train_local(
        method.adapted.model,
        params,
        lambda e: [_labelled_batch()],
        _sgd(lr=lr),
        StepPlan(steps=1, schedule=Schedule(base_lr=lr, total=1, warmup=0, kind="constant"), seed=seed),
        loss_fn=per_example_causal_lm_loss,
        privacy=dp,
    )
    change = {k: p.detach() - start[k] for k, p in params.items()}
    method.adapted.set_state(start)
    return change


def test_dp_sgd_noise_cannot_be_regenerated_from_the_seed_unless_reproducible() -> None:
    """The attack of issue 13 on one DP-SGD step: regenerate the noise from the published seed, subtract it.

    With the default (secret) noise the residual is at the noise scale; with privacy.reproducible_noise=true
    the un-noised update comes back to float rounding."""
    from fedsb.seeding import derive_seed

    method = _method("fedsb")
    sigma, C, b = 1.0, 0.1, 6
    seed = derive_seed(0, "dropout", "client-00", 1)  # what the simulator passes for client-00, round 1
    clean = _one_dp_step(
        method, DPSGD(_account(0.0, b / 60), max_grad_norm=C, num_examples=60, poisson=False), seed
    )
    d = sum(v.numel() for v in clean.values())
    scale = sigma * C * math.sqrt(d) / b  # ||noise|| in the update
    residuals = {}
    for reproducible in (False, True):
        dp = DPSGD(
            _account(sigma, b / 60),
            max_grad_norm=C,
            num_examples=60,
            poisson=False,
            reproducible_noise=reproducible,
        )
        noisy = _one_dp_step(method, dp, seed)
        attacker = SeededNoise(derive_seed(seed, "dp-noise"))  # the code and the seed are public
        recovered = {
            k: v + attacker.gaussian(v.shape, std=sigma * C, dtype=torch.float32) / b
            for k, v in noisy.items()
        }
        residuals[reproducible] = float(
            torch.sqrt(sum(((recovered[k] - clean[k]) ** 2).sum() for k in clean))
        )
    assert residuals[True] < 1e-5 * scale  # reproducible: the un-noised update is recovered
    assert 0.7 < residuals[False] / scale < 2.1  # secret: the residual is noise-sized (~sqrt(2) x scale)


def test_per_example_clipping_is_fp32_under_bf16_autocast() -> None:
    """Clipped per-example norms <= C (1 + 1e-6) with train.bf16=true (bf16 norms reached 1.0036 C).

    One example per step, sigma = 0, SGD lr 1 from R = 0: the new R is minus that example's clipped gradient."""
    method = _method("fedsb")
    model, params = method.adapted.model, method.adapted.trainable_parameters()
    method.adapted.set_state({k: torch.zeros_like(v) for k, v in method.adapted.get_state().items()})
    zero = method.adapted.get_state()
    cfg = TrainConfig(optimizer="sgd", lr=1.0, batch_size=1, local_steps=1, bf16=True, max_grad_norm=None)
    C, batch, norms = 1e-3, _labelled_batch(batch=12, seed=5), []
    for i in range(12):
        method.adapted.set_state(zero)
        one = {k: v[i : i + 1] for k, v in batch.items()}
        dp = DPSGD(_account(0.0, 1 / 50), max_grad_norm=C, num_examples=50, poisson=False)
        train_local(
            model,
            params,
            lambda e, one=one: [one],
            cfg,
            StepPlan(steps=1, schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant")),
            loss_fn=per_example_causal_lm_loss,
            privacy=dp,
        )
        norms.append(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params.values()))))
    assert max(norms) <= C * (1 + 1e-6), max(norms) / C
    assert min(norms) > C * (1 - 1e-4)  # clipping was active on every example


def test_delta_defaults_to_min_1e5_and_a_tenth_of_1_over_n_and_large_deltas_are_refused() -> None:
    from fedsb.privacy.ledger import PrivacyLedger

    sizes, steps = {"a": 3, "b": 50_000}, {"a": 2, "b": 2}
    cfg = resolve_config(TINY, ["privacy.mode=sample", "privacy.noise_multiplier=1.0"])
    ledger = PrivacyLedger.plan(cfg, sizes, steps, init_info={})
    assert {u: a.delta for u, a in ledger.accounts.items()} == {"a": 1e-5, "b": pytest.approx(2e-6)}
    assert ledger.summary()["delta_rule"] == "min(1e-5, 1/(10 N)), N_i = the client's examples"
    client = resolve_config(TINY, ["privacy.mode=client", "privacy.noise_multiplier=1.0"])
    many = dict.fromkeys([f"c{i}" for i in range(200_000)], 1)
    assert PrivacyLedger.plan(client, sizes, steps, init_info={}).accounts["server"].delta == 1e-5
    assert PrivacyLedger.plan(client, many, steps, init_info={}).accounts["server"].delta == pytest.approx(
        5e-7
    )
    large = resolve_config(TINY, ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.delta=0.5"])
    with pytest.raises(
        ConfigError, match=r"privacy.delta=0.5 is >= 1/N = 1/3 .* privacy.allow_large_delta=true"
    ):
        PrivacyLedger.plan(large, sizes, steps, init_info={})
    with pytest.raises(ConfigError, match=r"privacy.delta=0.6 is >= 1/N = 1/2 \(2 clients\)"):
        PrivacyLedger.plan(
            resolve_config(
                TINY, ["privacy.mode=client", "privacy.noise_multiplier=1.0", "privacy.delta=0.6"]
            ),
            {"a": 3, "b": 4},
            steps,
            init_info={},
        )
    allowed = resolve_config(
        TINY,
        [
            "privacy.mode=sample",
            "privacy.noise_multiplier=1.0",
            "privacy.delta=0.2",
            "privacy.allow_large_delta=true",
        ],
    )
    summary = PrivacyLedger.plan(allowed, sizes, steps, init_info={}).summary()
    assert summary["delta"] == 0.2 and "allow_large_delta=true" in summary["delta_rule"]


def test_a_private_client_sends_only_privatized_tensors_and_accounted_state(tmp_path: Path, capsys) -> None:
    assert _dp_run(tmp_path, "fed.rounds=1", "export=false", "eval.initial=false") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (record,) = results["rounds"]
    for cid, metrics in record["client_metrics"].items():
        assert set(metrics) == {"num_examples", "epsilon", "noise_multiplier", "dp_steps"}, cid
        assert metrics["num_examples"] == results["privacy"]["client_sizes"][cid] == 32  # the planned size
    assert math.isnan(record["train_loss"])  # no client loss crossed the boundary
    released = results["privacy"]["released"]
    assert (
        any("kept" in k for k in released)
        and "training losses (loss, first_loss)" in released["kept_on_clients"]
    )
    assert released["holds_against"].startswith("a reader of everything the run writes")
    assert results["privacy"]["noise"].startswith("secret: os.urandom")
    _, _, state = load_checkpoint_state(tmp_path)
    assert all("loss" not in m for r in state["history"] for m in r["client_metrics"].values())
    out = capsys.readouterr().out
    assert "privacy noise" in out and "secret (OS CSPRNG)" in out


def load_checkpoint_state(run: Path):
    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def test_an_update_whose_count_differs_from_the_privacy_plan_is_rejected() -> None:
    from fedsb.errors import UpdateRejected
    from fedsb.fed.base import ClientUpdate
    from fedsb.fed.validate import validate_update

    update = ClientUpdate("c0", 1, 31, {"r": torch.zeros(2, 2)})
    kwargs = dict(
        round=1, spec={"r": (2, 2)}, wire_dtype=torch.float32, fingerprint=None, sampled=["c0"], seen=[]
    )
    validate_update(update, **kwargs)  # without DP any positive count is accepted
    with pytest.raises(
        UpdateRejected, match=r"num_examples=31 differs from the size the privacy plan used \(32\)"
    ):
        validate_update(update, **kwargs, declared_sizes={"c0": 32})


def _final_global_state(run: Path):
    from fedsb.trained import load_trained

    method, _, _ = load_trained(run)
    return method.state


def test_seed_attack_recovers_the_unnoised_mean_only_with_reproducible_noise(tmp_path: Path, capsys) -> None:
    """Issue 13's attack on a tiny client-level DP run, with only the run directory and the public code:
    read the seed from config.yaml, regenerate the server's round-1 noise, subtract it from the released R.

    Secret noise (the default): the residual is at the noise scale. privacy.reproducible_noise=true: the
    un-noised mean is recovered to float rounding, and the run says the guarantee does not hold."""
    import yaml

    from fedsb.seeding import derive_seed

    base = [
        "threads=1", "privacy.mode=client", "privacy.clip_update=0.05", "fed.rounds=1", "eval.initial=false",
        "data.test_size=4", "export=false",
    ]  # fmt: skip

    def run_cli(out: Path, *extra: str) -> int:
        return main(["run", "--config", TINY, "--no-progress", "--output", str(out), *base, *extra])

    sigma, C, m = 0.5, 0.05, 2  # m: clients per round, the fixed denominator
    assert run_cli(tmp_path / "clean", "privacy.noise_multiplier=0") == 0
    clean = _final_global_state(tmp_path / "clean")  # the un-noised mean (round-1 training ignores sigma)
    d = sum(v.numel() for v in clean.values())
    scale = sigma * C * math.sqrt(d) / m
    residuals = {}
    for reproducible in ("false", "true"):
        run = tmp_path / f"reproducible-{reproducible}"
        flags = [f"privacy.noise_multiplier={sigma}", f"privacy.reproducible_noise={reproducible}"]
        assert run_cli(run, *flags) == 0
        released = _final_global_state(run)
        seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
        attacker = SeededNoise(derive_seed(seed, "client-dp-noise", 1))
        recovered = {
            k: v.double() - attacker.gaussian(v.shape, std=sigma * C, dtype=torch.float64) / m
            for k, v in released.items()
        }
        residuals[reproducible] = float(
            torch.sqrt(sum(((recovered[k] - clean[k].double()) ** 2).sum() for k in clean))
        )
        table = capsys.readouterr().out
        manifest = json.loads((run / "manifest.json").read_text())["privacy"]
        if reproducible == "true":
            assert (
                manifest["noise"].startswith("REPRODUCIBLE, NOT SECRET")
                and "does NOT hold" in manifest["noise"]
            )
            assert "REPRODUCIBLE from the run seed: the guarantee does NOT hold" in table
        else:
            assert manifest["noise"].startswith("secret") and "secret (OS CSPRNG)" in table
    assert residuals["true"] < 1e-5 * scale  # recovered: the guarantee does not hold against the config
    assert 0.7 < residuals["false"] / scale < 2.1  # not recoverable: the residual is the (secret) noise


def test_a_refused_resume_override_changes_nothing_and_a_plain_resume_still_works(
    tmp_path: Path, capsys
) -> None:
    assert _dp_run(tmp_path, "export=false", "eval.initial=false", "--stop-after-round", "1") == 0
    files = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    refused = {
        "fed.rounds=5": "fed.rounds=5 cannot change on a DP run",
        "train.lr=0.1": "train.lr=0.1 cannot change when resuming",
    }
    for override, message in refused.items():
        assert main(["run", "--resume", str(tmp_path), "--no-progress", override]) == 2
        err = capsys.readouterr().err
        assert message in err and "fix:" in err
        assert {
            p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()
        } == files  # nothing written
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["rounds_completed"] == 2
