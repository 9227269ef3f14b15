"""Record-level DP-SGD inside a client, through Opacus: per-example gradients of the trained tensors only.

One step: a Poisson batch (each of the client's N examples independently with probability q = b / N),
per-example gradients g_i of R (and a trained head) from Opacus' hooks, g_i <- g_i * min(1, C / ||g_i||),
g = (sum_i g_i + N(0, sigma^2 C^2 I)) / (q N), then the optimizer step. The frozen model gets no hooks
and no gradients. The client's `PrivacyAccount` persists across rounds and records every step.

With privacy.head_clip_share = f (`GroupClippedDPOptimizer`), the trained tensors form two groups, the
classification head and the adapter, and each example's gradient is clipped per group: the head's part to
C_h = C sqrt(f), the adapter's to C_a = C sqrt(1 - f). Under flat clipping a freshly initialised head holds
~99.8 % of an example's squared gradient norm (benchmarks/README.md, bench_dp.py), so the adapter keeps
only ~4 % of C after clipping; per-group budgets give it C_a whatever the head's gradient is.

Two things differ from stock Opacus, both in small subclasses of its own classes: every random draw (the
Poisson masks, the Gaussian noise) comes from a `NoiseSource` (the OS CSPRNG unless
privacy.reproducible_noise=true), and the per-example gradients are cast to float32 before their norms,
the clipping and the sum, so under bf16 autocast the clipped norms are <= C to fp32 precision (in bf16 the
norms were off by up to ~0.4%, and the accountant assumes exactly C).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from fedsb.errors import FedsbError
from fedsb.privacy.accounting import PrivacyAccount
from fedsb.privacy.noise import NoiseSource, noise_source
from fedsb.train.batches import Batch, cycle_epochs

# Opacus' backward hooks sit on modules whose inputs need no gradient (R's input is A x): expected here.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


class PoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler (each index independently with probability q) drawing from a `NoiseSource`."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, noise: NoiseSource) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.noise = noise

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.noise.uniform(self.num_samples) < self.sample_rate  # (N,) bool
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


class NoisedDPOptimizer(DPOptimizer):
    """Opacus' `DPOptimizer` with fp32 per-example gradients and noise from a `NoiseSource`.

    `_get_flat_grad_sample` feeds both the per-example norms and the clipped sum, so casting there makes
    the whole clip-and-accumulate run in float32 whatever dtype the hooks computed under autocast.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: NoiseSource, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, secure_mode=False, **kwargs)
        self.noise = noise

    def _get_flat_grad_sample(self, p: torch.Tensor) -> torch.Tensor:
        return super()._get_flat_grad_sample(p).to(torch.float32)

    def add_noise(self) -> None:
        """p.grad = summed clipped gradients + N(0, sigma^2 C^2 I), the noise from `self.noise`."""
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.noise.gaussian(
                p.summed_grad.shape,
                std=self.noise_multiplier * self.max_grad_norm,
                dtype=p.summed_grad.dtype,
                device=p.summed_grad.device,
            )
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class GroupClippedDPOptimizer(NoisedDPOptimizer):
    """Per-example clipping with one budget per group of trained tensors, noise calibrated to their total.

    For example i and group g (a set of tensors), g_i,g <- g_i,g * min(1, C_g / ||g_i,g||), the norm over
    the group's tensors; then the sum plus N(0, sigma^2 C^2 I) on every coordinate, C = sqrt(sum_g C_g^2).

    Privacy argument: after clipping, ||g_i||^2 = sum_g ||g_i,g||^2 <= sum_g C_g^2 = C^2, so adding or
    removing one example moves the clipped sum by at most C in L2, exactly as flat clipping at C does; the
    Gaussian mechanism with std sigma C is then the same mechanism with the same sensitivity, and the same
    accountant (sigma, q, steps) gives the same epsilon. The group split is fixed before training (public
    configuration, data-independent), so it leaks nothing. Opacus' own `DPPerLayerOptimizer` is the special
    case with one group per tensor (the same noise rule: its max_grad_norm is the L2 norm of the list).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        group_of: list[int],
        group_norms: list[float],
        noise: NoiseSource,
        **kwargs: Any,
    ) -> None:
        total = float(torch.tensor(group_norms, dtype=torch.float64).norm())  # C = sqrt(sum_g C_g^2)
        super().__init__(optimizer, noise=noise, max_grad_norm=total, **kwargs)
        if len(group_of) != len(self.params) or set(group_of) != set(range(len(group_norms))):
            raise ValueError(
                f"group_of ({len(group_of)} entries over {sorted(set(group_of))}) must give each of the "
                f"{len(self.params)} trained tensors one of the {len(group_norms)} groups, every group used"
            )
        self.group_of = list(group_of)
        self.group_norms = [float(c) for c in group_norms]

    def clip_and_accumulate(self) -> None:
        """p.summed_grad = sum_i g_i,g(p) * min(1, C_g / ||g_i,g||), in float32."""
        samples = self.grad_samples  # per tensor (B, ...) float32 (`_get_flat_grad_sample`)
        sq = [s.flatten(1).pow(2).sum(dim=-1) for s in samples]  # per tensor (B,)
        factors = []
        for g, c in enumerate(self.group_norms):
            norm = torch.stack([n for n, k in zip(sq, self.group_of, strict=True) if k == g]).sum(0).sqrt()
            factors.append((c / (norm + 1e-6)).clamp(max=1.0))  # (B,)
        for p, sample, g in zip(self.params, samples, self.group_of, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = torch.einsum("i,i...", factors[g].to(sample.device), sample)  # (*p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


#: the groups of privacy.head_clip_share, in the order of their budgets
CLIP_GROUPS = ("head", "adapter")


def clip_groups(model: nn.Module, params: list[torch.Tensor], share: float) -> list[int]:
    """Per trained tensor: 1 (adapter) if it lies in an adapter layer, else 0 (head: the extra modules)."""
    from fedsb.adapters.layer import AdapterLayer

    adapter = {id(p) for m in model.modules() if isinstance(m, AdapterLayer) for p in m.parameters()}
    groups = [1 if id(p) in adapter else 0 for p in params]
    missing = [name for k, name in enumerate(CLIP_GROUPS) if k not in groups]
    if missing:
        raise FedsbError(
            field="privacy.head_clip_share",
            value=share,
            what=f"splits the clipping budget between a head and an adapter, but this run trains no "
            f"{' and no '.join(missing)} tensor",
            fix="use it only for a classification task with a trained head (adapter.extra_trainable auto or "
            "a list naming the head), or set privacy.head_clip_share=null",
        )
    return groups


def poisson_batches(
    loader: DataLoader, *, sample_rate: float, steps: int, noise: NoiseSource
) -> Iterator[Batch]:
    """`steps` Poisson batches over `loader`'s dataset, collated by its collate_fn; an empty draw gives {}."""
    if not isinstance(loader, DataLoader):
        raise FedsbError(
            field="client loader",
            value=type(loader).__name__,
            fix="give DP-SGD a torch DataLoader (it resamples its dataset with Poisson sampling)",
        )
    ds, collate = loader.dataset, loader.collate_fn
    sampler = PoissonSampler(num_samples=len(ds), sample_rate=sample_rate, steps=steps, noise=noise)
    fetch = getattr(ds, "__getitems__", None)  # one batched read (HF datasets) instead of one per row
    for indices in sampler:
        if not len(indices):
            yield {}
            continue
        rows = fetch([int(i) for i in indices]) if fetch else [ds[int(i)] for i in indices]
        yield collate(rows)


@dataclass
class DPSGD:
    """DP-SGD settings of one client for one round: its account (sigma, q, delta), the clipping norm C, and
    where its randomness comes from (the OS CSPRNG; the given seed only with `reproducible_noise`)."""

    account: PrivacyAccount
    max_grad_norm: float
    num_examples: int
    poisson: bool = True
    reproducible_noise: bool = False
    head_clip_share: float | None = None

    def group_norms(self) -> list[float] | None:
        """[C_head, C_adapter] = [C sqrt(f), C sqrt(1 - f)] for head_clip_share f (None: flat clipping)."""
        f = self.head_clip_share
        if f is None:
            return None
        return [self.max_grad_norm * f**0.5, self.max_grad_norm * (1.0 - f) ** 0.5]

    def noise(self, seed: int, purpose: str) -> NoiseSource:
        return noise_source(reproducible=self.reproducible_noise, seed=seed, purpose=[purpose])

    @property
    def expected_batch_size(self) -> float:
        return self.account.sample_rate * self.num_examples

    def batches(self, make_epoch: Callable[[int], Iterable[Batch]], steps: int, seed: int) -> Iterator[Batch]:
        """Poisson batches at rate q (or, with poisson=False, the loader's own shuffled batches)."""
        if not self.poisson:
            return cycle_epochs(make_epoch)
        return poisson_batches(
            make_epoch(0),
            sample_rate=self.account.sample_rate,
            steps=steps,
            noise=self.noise(seed, "poisson"),
        )

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> PrivateStep:
        """Hook Opacus onto the model's trainable modules and wrap the optimizer (undo with `.detach()`)."""
        return PrivateStep(self, model, optimizer, seed)


class PrivateStep:
    """Opacus attached to a model for one local round: per-sample gradient hooks and a `DPOptimizer`."""

    def __init__(self, dp: DPSGD, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        self.dp = dp
        self.model = model
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        norms = dp.group_norms()
        # the head / adapter split, refused (no head, no adapter) before any hook is attached
        groups = None if dp.head_clip_share is None else clip_groups(model, self.params, dp.head_clip_share)
        try:
            self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as exc:
            raise FedsbError(
                field="privacy.mode",
                value="sample",
                what=f"cannot hook this model's trainable modules ({exc})",
                fix="train only adapter factors and linear heads under DP",
            ) from None
        common: dict[str, Any] = {
            "noise": dp.noise(seed, "dp-noise"),
            "noise_multiplier": dp.account.noise_multiplier,
            "expected_batch_size": max(1, round(dp.expected_batch_size)),
            "loss_reduction": "mean",
        }
        if norms is None or groups is None:
            self.optimizer: NoisedDPOptimizer = NoisedDPOptimizer(
                optimizer, max_grad_norm=dp.max_grad_norm, **common
            )
        else:
            self.optimizer = GroupClippedDPOptimizer(optimizer, group_of=groups, group_norms=norms, **common)
        self.checked = False

    def step(self) -> None:
        """Clip the per-example gradients, add noise, step, and charge the account one step.

        The first step of a round checks itself (opacus#820-style silent failures): every trained tensor
        moved, and no frozen parameter holds a gradient.
        """
        before = None if self.checked else [p.detach().clone() for p in self.params]
        self.optimizer.step()
        self.dp.account.step()
        if before is not None:
            self._self_check(before)

    def _self_check(self, before: list[torch.Tensor]) -> None:
        self.checked = True
        still = [  # a tensor with a non-zero (noised) gradient must move
            i
            for i, (p, b) in enumerate(zip(self.params, before, strict=True))
            if torch.equal(p, b) and p.grad is not None and bool(p.grad.any())
        ]
        if still and any(group["lr"] > 0 for group in self.optimizer.param_groups):
            raise RuntimeError(f"DP-SGD self-check: {len(still)} trained tensor(s) did not move in a step")
        trained = {id(p) for p in self.params}
        leaked = [n for n, p in self.model.named_parameters() if id(p) not in trained and p.grad is not None]
        if leaked:
            raise RuntimeError(f"DP-SGD self-check: frozen parameters received gradients: {leaked[:3]}")

    def noise_only_step(self) -> None:
        """An empty Poisson batch still releases the noise: the step runs on zero summed gradients."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def detach(self) -> None:
        """Remove every hook and every attribute Opacus added to the parameters."""
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.cleanup()  # hooks, grad_sample and the other per-parameter attributes of the hooks
        for p in self.params:
            if hasattr(p, "summed_grad"):  # the DPOptimizer's own, which cleanup() does not know
                delattr(p, "summed_grad")


def private_state(dp: DPSGD | None) -> dict[str, Any]:
    """What a client reports about its privacy after a round (merged into its update's metrics)."""
    if dp is None:
        return {}
    return {
        "epsilon": dp.account.epsilon(),
        "noise_multiplier": dp.account.noise_multiplier,
        "dp_steps": dp.account.steps,
    }
