"""Client-level DP (DP-FedAvg) on the communicated tensors: clip each client's update, noise the mean.

    new = global + (sum_i clip(T_i - global, C) + N(0, sigma^2 C^2 I)) / m

with clip(d, C) = d * min(1, C / ||d||_2) over ALL of a client's tensors together and m the planned number
of clients per round (a fixed denominator, so one client changes the sum by at most C whatever arrives).
For Fed-SB, ||R_i - R||_F = ||s B (R_i - R) A||_F (orthonormal B, A), so clipping R clips the weight update.

Trust model: the server is trusted (it sees each client's unnoised update, as in DP-FedAvg); the guarantee
(one client's whole data) holds for everything the server releases or writes: the noisy global state,
the results and the checkpoints. The noise comes from a `NoiseSource` (the OS CSPRNG by default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedsb.privacy.noise import NoiseSource

Tensors = dict[str, torch.Tensor]  # name -> tensor, as `fedsb.fed.base.Tensors`


class ClippedNoisyMean:
    """The aggregator of one DP-FedAvg round (same interface as `WeightedMean`); uniform weights."""

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        *,
        clip: float,
        noise_multiplier: float,
        denominator: int,
        noise: NoiseSource,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.reference = {k: v.detach().to(torch.float64) for k, v in reference.items()}
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.denominator = int(denominator)
        self.noise = noise
        self.on_release = on_release
        self.sum = {k: torch.zeros_like(v) for k, v in self.reference.items()}
        self.count = 0

    def weight_of(self, num_examples: int) -> float:
        return 1.0

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        delta = {k: tensors[k].detach().to(torch.float64) - ref for k, ref in self.reference.items()}
        norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
        factor = min(1.0, self.clip / (norm + 1e-12))
        for k, d in delta.items():
            self.sum[k].add_(d, alpha=factor)
        self.count += 1

    def result(self) -> Tensors:
        """global + (clipped sum + noise) / m, in fp32; charges the account one release."""
        if self.count == 0:
            raise RuntimeError("no updates were aggregated")
        std = self.noise_multiplier * self.clip
        out: Tensors = {}
        for k, ref in self.reference.items():
            noise = self.noise.gaussian(ref.shape, std=std, dtype=torch.float64)
            out[k] = (ref + (self.sum[k] + noise) / self.denominator).to(torch.float32)
        if self.on_release is not None:
            self.on_release()
        return out
