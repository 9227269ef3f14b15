"""The local trainer: answer-only loss, schedules, accumulation, only trainable tensors move, determinism."""

from __future__ import annotations

import pytest
import torch

from fedsb.config import TrainConfig
from fedsb.data.tasks import collate_for_training
from fedsb.init.initialize import BasisSpec, GradientSource, attach_basis, compute_basis
from fedsb.train.local import StepPlan, causal_lm_loss, steps_for, train_local
from fedsb.train.schedule import Schedule, round_schedule
from tiny import make_tiny_gpt2, make_tiny_llama


def _features(n: int = 6, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        a = int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(4, 64, (p + a,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * (p + a), "labels": [-100] * p + ids[p:]})
    return out


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_answer_only_loss_equals_hf_loss(make) -> None:
    model = make().eval()
    feats = _features()
    left = collate_for_training(feats, pad_token_id=0)
    # reference: each example alone (no padding at all), HF's own loss, pooled over answer tokens
    total, count = 0.0, 0
    for f in feats:
        ids = torch.tensor([f["input_ids"]])
        labels = torch.tensor([f["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    ours = causal_lm_loss(model, left)
    assert float(ours) == pytest.approx(total / count, rel=1e-5)
    assert float(model(**left).loss) == pytest.approx(total / count, rel=1e-5)  # HF on the same padded batch


def test_answer_only_loss_gradients_match_hf() -> None:
    model = make_tiny_llama()
    batch = collate_for_training(_features(), pad_token_id=0)
    causal_lm_loss(model, batch).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-4)


def test_schedule_shapes() -> None:
    s = Schedule(base_lr=1.0, total=10, warmup=2, kind="linear")
    assert [round(s.lr(k), 3) for k in range(10)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
    ]
    c = Schedule(base_lr=1.0, total=4, warmup=0, kind="cosine")
    assert c.lr(0) == pytest.approx(1.0) and c.lr(2) == pytest.approx(0.5)
    assert Schedule(base_lr=0.1, total=5, warmup=0, kind="constant").lr(4) == 0.1
    g, off = round_schedule(
        base_lr=1.0, kind="linear", warmup_ratio=0.1, scope="global", steps_per_round=5, rounds=4, round=3
    )
    assert (g.total, g.warmup, off) == (20, 2, 10)
    r, off = round_schedule(
        base_lr=1.0, kind="linear", warmup_ratio=0.1, scope="round", steps_per_round=5, rounds=4, round=3
    )
    assert (r.total, off) == (5, 0)


def test_steps_for_epochs() -> None:
    assert steps_for(100, TrainConfig(local_steps=7)) == 7
    assert steps_for(100, TrainConfig(local_steps=None, local_epochs=1.5, batch_size=16, grad_accum=2)) == 5


def _adapted():
    model = make_tiny_llama()
    feats = _features(8)
    basis = compute_basis(
        model,
        BasisSpec(rank=4, eta=1e-2),
        GradientSource(batches=[collate_for_training(feats, 0)], num_samples=8, loss_fn=causal_lm_loss),
    )
    return attach_basis(model, basis), feats


def _epoch_maker(feats):
    def make(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(feats), generator=g).tolist()
        return [
            collate_for_training([feats[i] for i in order[j : j + 2]], 0) for j in range(0, len(order), 2)
        ]

    return make


def test_train_local_moves_only_r_and_is_deterministic() -> None:
    cfg = TrainConfig(lr=1e-2, local_steps=3, grad_accum=2, batch_size=2, bf16=False)
    sched = Schedule(base_lr=cfg.lr, total=3, warmup=1)
    adapted, feats = _adapted()
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    rng = torch.get_rng_state()
    res, opt_state = train_local(
        adapted.model,
        adapted.trainable_parameters(),
        _epoch_maker(feats),
        cfg,
        StepPlan(steps=3, schedule=sched, seed=1),
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert res.steps == 3 and res.num_examples == 3 * 2 * 2 and len(res.losses) == 3
    after = adapted.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == set(adapted.trainable_names())
    assert all(
        v.dtype == torch.float32 for st in opt_state["state"].values() for v in st.values() if v.dim() > 0
    )
    # same inputs, same seed: identical result
    adapted2, _ = _adapted()
    res2, _ = train_local(
        adapted2.model,
        adapted2.trainable_parameters(),
        _epoch_maker(feats),
        cfg,
        StepPlan(steps=3, schedule=sched, seed=1),
    )
    assert res2.losses == res.losses
    a, b = adapted.get_state(), adapted2.get_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.grad is None for p in adapted.model.parameters())


def test_optimizer_state_carries_over() -> None:
    cfg = TrainConfig(lr=1e-2, local_steps=2, batch_size=2, bf16=False)
    sched = Schedule(base_lr=cfg.lr, total=4, warmup=0)
    adapted, feats = _adapted()
    _, state = train_local(
        adapted.model,
        adapted.trainable_parameters(),
        _epoch_maker(feats),
        cfg,
        StepPlan(steps=2, schedule=sched),
    )
    assert all(int(s["step"]) == 2 for s in state["state"].values())
    _, state2 = train_local(
        adapted.model,
        adapted.trainable_parameters(),
        _epoch_maker(feats),
        cfg,
        StepPlan(steps=2, schedule=sched, step_offset=2, optimizer_state=state),
    )
    assert all(int(s["step"]) == 4 for s in state2["state"].values())


def test_bf16_autocast_keeps_r_fp32() -> None:
    cfg = TrainConfig(lr=1e-2, local_steps=2, batch_size=2, bf16=True)
    adapted, feats = _adapted()
    res, state = train_local(
        adapted.model,
        adapted.trainable_parameters(),
        _epoch_maker(feats),
        cfg,
        StepPlan(steps=2, schedule=Schedule(base_lr=1e-2, total=2, warmup=0)),
    )
    assert all(p.dtype == torch.float32 for p in adapted.trainable_parameters().values())
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_diverging_loss_raises() -> None:
    adapted, feats = _adapted()
    cfg = TrainConfig(lr=1e-2, local_steps=1, batch_size=2, bf16=False)

    def nan_loss(model, batch):
        return causal_lm_loss(model, batch) * float("nan")

    with pytest.raises(FloatingPointError, match="lower train.lr"):
        train_local(
            adapted.model,
            adapted.trainable_parameters(),
            _epoch_maker(feats),
            cfg,
            StepPlan(steps=1, schedule=Schedule(base_lr=1e-2, total=1, warmup=0)),
            loss_fn=nan_loss,
        )
