"""privacy.head_clip_share: per-group clipping budgets (head C sqrt(f), adapter C sqrt(1 - f)) under DP-SGD.

The adapter's share of each example's clipped gradient rises from what a fresh head leaves it to about 1 - f;
the clipping equals Opacus' per-layer optimizer with one group per tensor; the noise and the epsilon equal
flat clipping's at C; the simulator and Flower agree; bad settings are refused naming the key."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPPerLayerOptimizer

from fedsb.config import TrainConfig, resolve_config
from fedsb.errors import ConfigError, FedsbError
from fedsb.privacy.accounting import PrivacyAccount
from fedsb.privacy.dpsgd import DPSGD, GroupClippedDPOptimizer
from fedsb.privacy.noise import SeededNoise
from fedsb.train.local import StepPlan, per_example_causal_lm_loss, train_local
from fedsb.train.schedule import Schedule
from tiny import VOCAB, make_tiny_bert_cls

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _account(sigma: float, q: float) -> PrivacyAccount:
    return PrivacyAccount("c", sigma, q, 1e-3, "prv", planned_steps=10)


def _sgd(batch: int) -> TrainConfig:
    return TrainConfig(
        optimizer="sgd", lr=1.0, batch_size=batch, local_steps=1, bf16=False, max_grad_norm=None
    )


def _one_step() -> StepPlan:
    return StepPlan(steps=1, schedule=Schedule(base_lr=1.0, total=1, warmup=0, kind="constant"), seed=3)


def _bert_with_adapter():
    """tiny-bert + a fresh 3-label head + LoRA-SB r = 4 (random basis), dropout off; (model, trained params)."""
    from fedsb.init.initialize import BasisSpec, attach_basis, compute_basis

    model = make_tiny_bert_cls(num_labels=3)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    basis = compute_basis(model, BasisSpec(rank=4, init="random"), generator=torch.Generator().manual_seed(1))
    adapted = attach_basis(model, basis)
    return model, adapted.trainable_parameters()


def _examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, 9), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [
        {
            "input_ids": ids[i : i + 1],
            "attention_mask": torch.ones_like(ids[i : i + 1]),
            "labels": labels[i : i + 1],
        }
        for i in range(n)
    ]


def _clipped_update(model, params, batch, dp: DPSGD) -> dict[str, torch.Tensor]:
    """One DP-SGD step at sigma = 0, SGD lr 1, one example: minus that example's clipped gradient."""
    start = {k: p.detach().clone() for k, p in params.items()}
    train_local(
        model, params, lambda e: [batch], _sgd(1), _one_step(), loss_fn=lambda m, b: m(**b).loss, privacy=dp
    )
    change = {k: start[k] - p.detach() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(start[k])
    return change


def _sq(change: dict[str, torch.Tensor], head: bool) -> float:
    return float(sum((v.double() ** 2).sum() for k, v in change.items() if ("classifier" in k) == head))


def test_head_clip_share_gives_the_adapter_its_budget_where_flat_clipping_leaves_it_little() -> None:
    """Per example: flat clipping keeps the raw split (the fresh head dominates); f = 0.5 clips the head to
    C/sqrt(2) and the adapter to C/sqrt(2), so the adapter's share of the clipped squared norm is ~0.5."""
    model, params = _bert_with_adapter()
    assert any("classifier" in k for k in params) and any("lora_sb_R" in k for k in params)
    C = 1e-4  # far below every group's norm: both groups are clipped
    shares: dict[str | float, list[float]] = {"flat": [], 0.5: [], 0.1: []}
    for batch in _examples():
        for f in shares:
            dp = DPSGD(
                _account(0.0, 1 / 50),
                max_grad_norm=C,
                num_examples=50,
                poisson=False,
                head_clip_share=None if f == "flat" else f,
            )
            change = _clipped_update(model, params, batch, dp)
            head, adapter = _sq(change, head=True), _sq(change, head=False)
            assert (head + adapter) ** 0.5 <= C * (1 + 1e-5)  # the total stays within C
            if f != "flat":
                assert head**0.5 <= C * f**0.5 * (1 + 1e-5) and adapter**0.5 <= C * (1 - f) ** 0.5 * (
                    1 + 1e-5
                )
            shares[f].append(adapter / (head + adapter))
    median = {f: sorted(s)[len(s) // 2] for f, s in shares.items()}
    assert median["flat"] < 0.2, median  # the head takes most of a flat clip
    assert median[0.5] == pytest.approx(0.5, abs=0.02), median
    assert median[0.1] == pytest.approx(0.9, abs=0.02), median


def test_group_clipping_with_one_group_per_tensor_equals_opacus_per_layer_clipping() -> None:
    """Opacus' DPPerLayerOptimizer is the per-tensor special case: same clipped sums, same noise scale."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    norms = [0.05, 0.2, 0.01, 0.3]  # weight and bias of each layer
    summed = []
    for make in ("ours", "opacus"):
        model = copy.deepcopy(net)
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        common = {"noise_multiplier": 1.0, "expected_batch_size": 7, "loss_reduction": "mean"}
        if make == "ours":
            opt = GroupClippedDPOptimizer(
                sgd, group_of=[0, 1, 2, 3], group_norms=norms, noise=SeededNoise(0), **common
            )
        else:
            opt = DPPerLayerOptimizer(sgd, max_grad_norm=norms, **common)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.clip_and_accumulate()
        summed.append([p.summed_grad.clone() for p in model.parameters()])
        assert opt.max_grad_norm == pytest.approx(sum(c * c for c in norms) ** 0.5)
        hooks.cleanup()
    for a, b in zip(*summed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="every group used"):
        GroupClippedDPOptimizer(
            torch.optim.SGD(net.parameters(), lr=1.0), group_of=[0, 0, 0, 0], group_norms=[0.1, 0.1],
            noise=SeededNoise(0), noise_multiplier=1.0, expected_batch_size=1,
        )  # fmt: skip


def test_head_clip_share_leaves_the_noise_and_the_accounting_as_flat_clipping_at_c() -> None:
    """sigma and epsilon are planned from (q, steps, delta) alone; the noise std is sigma C on every
    coordinate: a noise-only step (empty Poisson draw) is bit-identical with and without the split."""
    from fedsb.privacy.ledger import PrivacyLedger

    sizes, steps = {"client-00": 40, "client-01": 60}, {"client-00": 5, "client-01": 5}
    plans = {}
    for extra in ([], ["privacy.head_clip_share=0.3"]):
        cfg = resolve_config(TINY, ["privacy.mode=sample", "privacy.target_epsilon=3", *extra])
        plans[bool(extra)] = PrivacyLedger.plan(cfg, sizes, steps, init_info={})
    for cid, n in sizes.items():
        flat, split = plans[False].accounts[cid], plans[True].accounts[cid]
        assert split.noise_multiplier == flat.noise_multiplier
        opacus_sigma = get_noise_multiplier(
            target_epsilon=3, target_delta=split.delta, sample_rate=4 / n, steps=10, accountant="prv"
        )
        assert split.noise_multiplier == pytest.approx(opacus_sigma, rel=1e-3)
    assert plans[True].dpsgd_for("client-00").head_clip_share == 0.3
    assert (
        plans[True].summary()["head_clip_share"] == 0.3 and plans[False].summary()["head_clip_share"] is None
    )

    model, params = _bert_with_adapter()
    updates = []
    for f in (None, 0.3):
        dp = DPSGD(_account(1.3, 1 / 50), max_grad_norm=0.1, num_examples=50, poisson=False)
        dp.head_clip_share, dp.reproducible_noise = f, True
        start = {k: p.detach().clone() for k, p in params.items()}
        private = dp.attach(model, torch.optim.SGD(list(params.values()), lr=1.0), seed=11)
        assert private.optimizer.max_grad_norm == pytest.approx(0.1)  # the noise is sigma x C, C unchanged
        private.zero_grad()
        private.noise_only_step()
        private.detach()
        updates.append({k: p.detach() - start[k] for k, p in params.items()})
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
        assert dp.account.steps == 1
        eps = dp.account.epsilon()
    for k in params:
        assert torch.equal(updates[0][k], updates[1][k]) and float(updates[0][k].abs().max()) > 0
    assert eps == _account_after_one_step()


def _account_after_one_step() -> float:
    acc = _account(1.3, 1 / 50)
    acc.step()
    return acc.epsilon()


@pytest.mark.parametrize(
    "extra,what",
    [
        (["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.head_clip_share=1.0"], "strictly between"),
        (["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.head_clip_share=0"], "strictly between"),
        (["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.head_clip_share=true"], "strictly between"),
        (
            ["privacy.mode=sample", "privacy.target_epsilon=3", "privacy.head_clip_share=0.5",
             "adapter.extra_trainable=[]"],
            "trains no head",
        ),
        (["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.head_clip_share=0.5"], "mode=sample"),
        (["privacy.head_clip_share=0.5"], "not private"),
    ],
)  # fmt: skip
def test_bad_head_clip_share_settings_are_refused_naming_the_key(extra: list[str], what: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(TINY, extra)
    assert "privacy.head_clip_share" in str(err.value) and what in str(err.value), str(err.value)


def test_head_clip_share_on_a_model_without_a_head_is_refused_before_any_hook() -> None:
    """An LM task trains no head: the split cannot apply; the error names the key and leaves no hook."""
    from fedsb.fed.base import SetupContext, get_method_class
    from fedsb.train.local import causal_lm_loss
    from tiny import lm_batches, make_tiny_llama

    cfg = resolve_config(TINY, ["adapter.rank=4"])
    ctx = SetupContext(cfg=cfg, init_batches=lambda: lm_batches(), num_samples=8, loss_fn=causal_lm_loss)
    method = get_method_class("fedsb").create(make_tiny_llama(), ctx)
    model, params = method.adapted.model, method.adapted.trainable_parameters()
    dp = DPSGD(_account(1.0, 0.1), max_grad_norm=0.1, num_examples=40, poisson=False, head_clip_share=0.5)
    with pytest.raises(FedsbError) as err:
        train_local(
            model, params, lambda e: lm_batches(), _sgd(4), _one_step(), loss_fn=per_example_causal_lm_loss,
            privacy=dp,
        )  # fmt: skip
    assert err.value.field == "privacy.head_clip_share" and "no head" in str(err.value)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def _classify_config(tmp: Path) -> Path:
    """A tiny-bert sentiment run on a user jsonl file, as a config file (the Flower app reads a file)."""
    rng = random.Random(0)
    for split, n in (("train", 160), ("test", 16)):
        rows = []
        for _ in range(n):
            label = rng.randrange(2)
            word = rng.choice(["great", "fine", "lovely"] if label else ["awful", "bad", "dull"])
            rows.append(json.dumps({"sentence": f"the film was {word}", "label": ["neg", "pos"][label]}))
        (tmp / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    text = f"""
model: {{name: tiny-bert}}
adapter: {{rank: 4}}
init: {{server_size: 3, min_samples: 2}}
data:
  task: classify
  train_size: null
  test_size: null
  max_length: 32
  options:
    label_names: [neg, pos]
    columns: {{text: sentence, label: label}}
    data_files: {{train: {tmp / "train.jsonl"}, test: {tmp / "test.jsonl"}}}
partition: {{num_clients: 2}}
train: {{batch_size: 8, local_steps: 2, lr: 0.05}}
fed: {{rounds: 2}}
eval: {{batch_size: 16, every: 100}}
privacy: {{mode: sample, noise_multiplier: 0.8, head_clip_share: 0.5, reproducible_noise: true}}
"""
    path = tmp / "classify.yaml"
    path.write_text(text)
    return path


def final_state(out: Path) -> dict[str, torch.Tensor]:
    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint

    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def test_head_clip_share_over_flower_matches_the_simulator(tmp_path: Path) -> None:
    """The Flower node reads the split from the run's config: the same R and head, the same privacy summary."""
    from fedsb.flower.client_app import app as client_app
    from fedsb.flower.protocol import AppSettings
    from fedsb.flower.server_app import run_flower_job
    from fedsb.run import run_job
    from flower_grid import LocalGrid

    config = _classify_config(tmp_path)
    base = "threads=1 progress=false export=false"
    cfg = resolve_config(str(config), [*base.split(), f"output_dir={tmp_path / 'sim'}"])
    ref = run_job(cfg, echo=lambda s: None)
    settings = AppSettings(config=str(config), overrides=base, output_dir=str(tmp_path / "flwr"))
    res = run_flower_job(LocalGrid(client_app, 2), settings)
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    assert any("classifier" in k for k in a) and any(k.endswith("lora_sb_R.weight") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert res["privacy"] == json.loads(json.dumps(ref["privacy"]))
    assert ref["privacy"]["head_clip_share"] == 0.5 and ref["privacy"]["max_epsilon"] > 0
