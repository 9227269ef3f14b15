"""Server optimizers on the global state (FedOpt, Reddi et al. 2021): FedAvgM, FedAdam, FedYogi.

Each round's aggregate M = sum_i p_i T_i (the exact weighted mean of the client models) gives the
pseudo-gradient Delta = M - T for the global state T; a `torch.optim` optimizer steps T with
grad = -Delta:

    avgm:  v = mu v + Delta,                     T = T + lr v          (torch.optim.SGD, momentum mu)
    adam:  m = b1 m + (1 - b1) Delta,  v = b2 v + (1 - b2) Delta^2,
           T = T + lr m_hat / (sqrt(v_hat) + eps)                     (torch.optim.Adam)
    yogi:  m as adam,  v = v - (1 - b2) sign(v - Delta^2) Delta^2,
           T = T + lr m_hat / (sqrt(v_hat) + eps)                     (`Yogi` below)

with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t) (torch's bias correction, as in Flower's FedAdam /
FedYogi; Reddi et al. state them without it). `avg` (T = M) uses no optimizer at all: plain averaging
is today's code path, bit for bit. For Fed-SB the state is R: momentum and server SGD act linearly, so
with orthonormal B, A they are the same optimizer applied to Delta W in the subspace; Adam and Yogi act
per coordinate of R (a different basis from W's). Their state is 1-2 tensors of the global state's size
(r^2 per module for Fed-SB), checkpointed with the run (`state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fedsb.config import FedConfig
from fedsb.fed.checkpoint import flatten_optimizer_state, unflatten_optimizer_state

Tensors = dict[str, torch.Tensor]

#: fed.server_lr when it is null
DEFAULT_LR = {"avgm": 1.0, "adam": 1e-2, "yogi": 1e-2}


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al., NeurIPS 2018): Adam with the additive second-moment update
    v = v - (1 - b2) sign(v - g^2) g^2 (v starts at 0 and stays >= 0); bias correction as torch's Adam."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                g2 = g * g
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - b2))
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))
        return loss


class ServerOptimizer:
    """One torch optimizer over the global state's tensors (one fp32 Parameter each, on the CPU)."""

    def __init__(self, name: str, state: Mapping[str, torch.Tensor], *, lr: float, **options: Any) -> None:
        self.name = name
        self.names = list(state)
        self.params = {k: torch.nn.Parameter(v.detach().to(torch.float32).clone()) for k, v in state.items()}
        params = list(self.params.values())
        if name == "avgm":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=options["momentum"], foreach=False
            )
        elif name == "adam":
            betas = tuple(options["betas"])
            self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=options["eps"], foreach=False)
        elif name == "yogi":
            self.optimizer = Yogi(params, lr=lr, betas=tuple(options["betas"]), eps=options["eps"])
        else:
            raise ValueError(f"unknown server optimizer {name!r}")

    def step(self, current: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> Tensors:
        """The new global state: the optimizer's step from `current` along Delta = mean - current."""
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(current[k].to(torch.float32))
                p.grad = current[k].to(torch.float32) - mean[k].to(torch.float32)  # -Delta
        self.optimizer.step()
        out = {k: p.detach().clone() for k, p in self.params.items()}
        for p in self.params.values():
            p.grad = None
        return out

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """(the optimizer's tensors keyed `server_opt/<param>/<key>`, JSON metadata with their names)."""
        tensors, meta = flatten_optimizer_state("server_opt", self.optimizer.state_dict())
        return tensors, {"name": self.name, "tensors": self.names, **meta}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if meta.get("name") != self.name or meta.get("tensors") != self.names:
            raise ValueError(
                f"the checkpoint holds a {meta.get('name')} server optimizer over other tensors, "
                f"this run uses {self.name}"
            )
        self.optimizer.load_state_dict(unflatten_optimizer_state("server_opt", dict(tensors), dict(meta)))


def build_server_optimizer(fed: FedConfig, state: Mapping[str, torch.Tensor]) -> ServerOptimizer | None:
    """The run's server optimizer over `state` (None for fed.server_optimizer=avg: plain averaging)."""
    if fed.server_optimizer == "avg":
        return None
    lr = fed.server_lr if fed.server_lr is not None else DEFAULT_LR[fed.server_optimizer]
    return ServerOptimizer(
        fed.server_optimizer,
        state,
        lr=lr,
        momentum=fed.server_momentum,
        betas=fed.server_betas,
        eps=fed.server_eps,
    )
