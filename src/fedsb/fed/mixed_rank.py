"""Exact mixed ranks (`partition.client_ranks`, method.md 13.1): client i trains and sends only R[:r_i, :r_i].

B's columns and A's rows are ordered by singular value, so the leading r_i x r_i block of R couples the
top r_i directions of the shared basis. Client i starts from the global R^t, trains only that block (the
gradient outside it is masked and every other entry is held at R^t after each optimizer step, so weight
decay or DP-SGD noise cannot move it) and uploads the block alone. Its model is

    R_i = R^t + pad(dR_i),   dR_i = R_i[:r_i, :r_i] - R^t[:r_i, :r_i],   pad(.) = top-left corner, zeros elsewhere.

The server rebuilds R_i from the block and R^t (every other entry at the global value for that client) and
averages as for any client, so

    R^{t+1} = sum_i p_i R_i = R^t + sum_i p_i pad(dR_i)

is exactly the weighted mean of the client models, and s B R^{t+1} A = sum_i p_i (s B R_i A) by linearity
(the deltas are padded, never the R_i: zeros would overwrite global entries the client does not own). A
client uploads r_i^2 numbers per module (the ledger counts them) and downloads the full r x r R, which its
forward pass uses. A module whose rank was capped below r_i (adapter.rank_overflow=cap) is sent whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]

R_SUFFIX = ".lora_sb_R.weight"  # the trained r x r core of a LoRA-SB layer (`fedsb.fed.fedsb.FedSB`)


def client_id_ranks(client_ranks: Sequence[int], client_ids: Sequence[str]) -> dict[str, int]:
    """Client id -> r_i, in the partition's order (`partition.client_ranks[i]` is client i's rank)."""
    if len(client_ranks) != len(client_ids):
        from fedsb.errors import ConfigError

        raise ConfigError(
            field="partition.client_ranks",
            value=list(client_ranks),
            what=f"has {len(client_ranks)} entries, but the data has {len(client_ids)} clients",
            fix=f"give one rank per client ({len(client_ids)} entries)",
        )
    return {cid: int(r) for cid, r in zip(client_ids, client_ranks, strict=True)}


class ClientRanks:
    """Each client's rank r_i and the block arithmetic of the module docstring (CPU tensors)."""

    def __init__(self, ranks: Mapping[str, int]) -> None:
        self.ranks = dict(ranks)

    def block(self, client_id: str, name: str, shape: Sequence[int]) -> int | None:
        """The side of the block `client_id` sends of tensor `name` (None: the whole tensor)."""
        r = self.ranks.get(client_id)
        if r is None or not name.endswith(R_SUFFIX) or r >= shape[0]:
            return None
        return r

    def upload_spec(self, client_id: str, spec: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Name -> shape of what `client_id` sends: (r_i, r_i) for each R, the rest unchanged."""
        out = {}
        for name, shape in spec.items():
            k = self.block(client_id, name, shape)
            out[name] = tuple(shape) if k is None else (k, k)
        return out

    def crop(self, client_id: str, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """The client's upload: each R (r, r) cut to its leading block R[:r_i, :r_i] (r_i, r_i)."""
        out = {}
        for name, t in tensors.items():
            k = self.block(client_id, name, t.shape)
            out[name] = t if k is None else t[:k, :k].contiguous()
        return out

    def fill(
        self, client_id: str, tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
    ) -> Tensors:
        """The client's model from its upload: `reference` (the global R^t, (r, r)) with the leading
        r_i x r_i block replaced by the one it sent (= R^t + pad(dR_i))."""
        out = {}
        for name, t in tensors.items():
            ref = reference[name]
            if tuple(t.shape) == tuple(ref.shape):
                out[name] = t
                continue
            k = t.shape[0]
            full = ref.to(t.dtype).clone()  # (r, r)
            full[:k, :k] = t  # (r_i, r_i) block
            out[name] = full
        return out

    def train_block(self, client_id: str, params: Mapping[str, torch.nn.Parameter]) -> BlockTraining | None:
        """Hold every entry of each R outside `client_id`'s block at its current value while it trains."""
        masks = {}
        for name, p in params.items():
            k = self.block(client_id, name, p.shape)
            if k is not None:
                mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)  # (r, r)
                mask[:k, :k] = True
                masks[name] = mask
        return BlockTraining({n: params[n] for n in masks}, masks) if masks else None


class BlockTraining:
    """Masks the gradient of each R outside its block and restores those entries after every step."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
        self.params, self.masks = dict(params), dict(masks)
        self.frozen = {n: p.detach().clone() for n, p in self.params.items()}  # (r, r): R^t
        self.handles = [
            p.register_hook(lambda g, m=self.masks[n]: g * m.to(g.dtype)) for n, p in self.params.items()
        ]

    @torch.no_grad()
    def project(self) -> None:
        """Entries outside the block back to R^t (weight decay, momentum or DP noise may have moved them)."""
        for n, p in self.params.items():
            p.copy_(torch.where(self.masks[n], p, self.frozen[n]))

    def close(self) -> None:
        self.project()
        for h in self.handles:
            h.remove()


def client_ranks_of(client_ranks: Sequence[int] | None, client_ids: Sequence[str]) -> ClientRanks | None:
    """The run's `ClientRanks` from partition.client_ranks (None: every client at the full rank)."""
    return None if client_ranks is None else ClientRanks(client_id_ranks(client_ranks, client_ids))
