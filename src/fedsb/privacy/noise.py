"""Where every random draw of a privacy mechanism comes from: the OS CSPRNG, or (research only) the seed.

A DP guarantee holds only if the noise is unknown to the reader of the release. The run seed is published
(config.yaml, manifest.json), so noise derived from it can be regenerated and subtracted. Hence:

* `SecureNoise` (the default) reads `os.urandom` -- the operating system's cryptographically secure
  generator (getrandom(2) on Linux) -- and turns its bytes into draws in float64: uniforms
  u = (k + 1) 2^-53 in (0, 1] from 53 random bits k, Gaussians by Box-Muller
  z = sqrt(-2 ln u1) cos(2 pi u2), z' = sqrt(-2 ln u1) sin(2 pi u2). Every Gaussian is the sum of four
  such draws divided by 2 (still N(0, 1)), the recipe of Opacus' `secure_mode` against floating-point
  attacks on the sampler (arXiv 2107.10138, section 5.1). We do not use Opacus' `secure_mode` itself: it
  needs `torchcsprng`, which has no build for our torch; and we do not seed a `torch.Generator` from
  urandom either, since that generator is a Mersenne Twister (not a CSPRNG: its state is recoverable from
  its outputs). Secure draws are never repeatable, so a resumed run continues with fresh noise.
* `SeededNoise` draws from a `torch.Generator` seeded with a hash of the run seed and the draw's purpose:
  repeatable (bit-identical resume, identical engines), for research only, enabled with
  `privacy.reproducible_noise=true`; the stated (epsilon, delta) then does NOT hold against anyone who can
  read the config. Its draws are exactly those of the Opacus code it replaces (`torch.normal`,
  `torch.rand` with that generator).

Client sampling (fed.clients_per_round) stays seeded and public: the client-level accountant claims no
amplification from it, and record-level DP-SGD does not depend on which clients take part.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from fedsb.seeding import derive_seed

SECURE_SOURCE = "os.urandom (OS CSPRNG), float64 Box-Muller, sum of 4 draws / 2"
REPRODUCIBLE_WARNING = (
    "privacy.reproducible_noise=true: every privacy draw (DP noise, Poisson sampling) was derived from the "
    "run seed, which config.yaml and manifest.json publish; the stated (epsilon, delta) does NOT hold "
    "against anyone who can read them (research use only)"
)


class NoiseSource(Protocol):
    """The randomness of one privacy mechanism (one client's DP-SGD, one round's client-level noise)."""

    secure: bool

    def uniform(self, n: int) -> torch.Tensor:
        """(n,) uniforms in [0, 1) or (0, 1] on the CPU (Poisson sampling masks)."""
        ...

    def gaussian(
        self, shape: Sequence[int], *, std: float, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A tensor of independent N(0, std^2) draws with `shape`, `dtype`, on `device`."""
        ...


class SecureNoise:
    """Draws from the OS CSPRNG (see the module docstring); unrepeatable by design."""

    secure = True

    @staticmethod
    def _uniform64(n: int) -> np.ndarray:
        """(n,) float64 uniforms (k + 1) 2^-53 in (0, 1], k = 53 bits of os.urandom."""
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # (n,) 53-bit integers
        return (bits.astype(np.float64) + 1.0) * 2.0**-53

    def uniform(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self._uniform64(n))

    def _standard_normal(self, n: int) -> np.ndarray:
        """(n,) float64 N(0, 1) draws by Box-Muller on pairs of CSPRNG uniforms."""
        half = -(-n // 2)
        u1, u2 = self._uniform64(half), self._uniform64(half)  # u1 in (0, 1]: log(u1) is finite
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def gaussian(
        self, shape: Sequence[int], *, std: float, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """N(0, std^2): (z_1 + z_2 + z_3 + z_4) / 2 * std in float64, cast once to `dtype`."""
        shape = tuple(int(s) for s in shape)
        if std == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        n = math.prod(shape)
        z = sum(self._standard_normal(n) for _ in range(4)) / 2.0  # (n,) float64, still N(0, 1)
        return torch.from_numpy(z * std).reshape(shape).to(device=device, dtype=dtype)


class SeededNoise:
    """Draws from a `torch.Generator` seeded from the run seed: repeatable, NOT secret (research only)."""

    secure = False

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed % (2**63))

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)  # what Opacus' Poisson sampler draws

    def gaussian(
        self, shape: Sequence[int], *, std: float, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if std == 0:  # as Opacus: no draw at all
            return torch.zeros(shape, dtype=dtype, device=device)
        noise = torch.normal(mean=0.0, std=std, size=shape, generator=self.generator, dtype=dtype)
        return noise.to(device)


def noise_source(*, reproducible: bool, seed: int, purpose: Sequence[object]) -> NoiseSource:
    """`SecureNoise()` by default; with `reproducible`, `SeededNoise(derive_seed(seed, *purpose))`."""
    if reproducible:
        return SeededNoise(derive_seed(seed, *purpose))
    return SecureNoise()


def noise_statement(reproducible: bool) -> str:
    """What the manifest, the results and the final table say about the noise."""
    if reproducible:
        return "REPRODUCIBLE, NOT SECRET: " + REPRODUCIBLE_WARNING
    return f"secret: {SECURE_SOURCE}; never derived from the run seed (a resumed run draws fresh noise)"
