"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a shared seeded init, only B trains and is averaged. Exact.

Every party draws the same A per module from a stable hash of (run seed, module path), distinct across
modules (the official code gave every module seed 42). s * mean(B_i) A = mean(s B_i A): linear in B, so
the average is exact; each round moves r * m numbers per layer each way.
"""

from __future__ import annotations

from typing import ClassVar

from fedsb.fed.lora_base import LoraMethod


class FFALoRA(LoraMethod):
    """Trains B only (A frozen from the shared seed); uploads B_i; the server averages B."""

    name: ClassVar[str] = "ffa"
    exact: ClassVar[bool] = True
    train_A: ClassVar[bool] = False
