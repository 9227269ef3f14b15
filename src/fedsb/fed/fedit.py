"""FedIT (Zhang et al., ICASSP 2024): FedAvg of the LoRA factors A and B separately. Inexact.

The global update s * mean(B) mean(A) differs from the mean of the clients' updates s * mean(B_i A_i) by
-s * sum_i p_i (B_i - mean B)(A_i - mean A): minus the weighted covariance of the factors, zero only when
all clients hold identical factors. Clients train and send A_i and B_i (r(m + n) per layer each way).
"""

from __future__ import annotations

from typing import ClassVar

from fedsb.fed.lora_base import LoraMethod


class FedIT(LoraMethod):
    """Trains A and B; uploads both; the server averages each factor; broadcasts mean(A), mean(B)."""

    name: ClassVar[str] = "fedit"
    exact: ClassVar[bool] = False
    train_A: ClassVar[bool] = True
