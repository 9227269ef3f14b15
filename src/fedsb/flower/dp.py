"""Record-level DP-SGD over Flower: the server's ledger is each client's accountant; the client checks it.

A ClientApp process lives for one message and a SuperNode may restart, so neither holds the account that
matters. The server's `PrivacyLedger` does (planned from what the run fixes: sigma, q_i = b / N_i from the
declared size, delta_i, the planned steps; checkpointed with the run). Each train message carries the
client's account as the server holds it before the round (`account_message`), and the server charges the
round's steps (`steps_for(N_i)`, every step one release, empty Poisson draws included) as soon as the
message is sent: a client that trains but whose reply is lost has spent them all the same.

The client trains only under an account that is its own plan (`client_account`): the same q, delta,
accountant and planned steps as its own copy of the config gives, a noise multiplier that is the
configured one or spends at most the target epsilon over the planned steps, and enough budget left for
this round. Its node also counts the steps it took (`fedsb.flower.node_state`); if that count is ahead of
the server's (the server lost steps: e.g. a ledger restored from an older checkpoint while the node ran),
the client refuses instead of training on a reset account.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedsb.config import RunConfig
from fedsb.errors import FedsbError
from fedsb.privacy.accounting import PrivacyAccount, epsilon_of
from fedsb.train.local import steps_for

#: the key of the ConfigRecord entry holding the account (JSON of `PrivacyAccount.to_dict`)
ACCOUNT_KEY = "account"
#: slack on the recomputed planned epsilon (the solver stops below the target; this only absorbs rounding)
EPSILON_SLACK = 1e-6


def account_message(account: PrivacyAccount) -> dict[str, str]:
    """What a train message carries about the client's account (the server's copy, before the round)."""
    return {ACCOUNT_KEY: json.dumps(account.to_dict(with_epsilon=False))}


def round_steps(cfg: RunConfig, num_examples: int) -> int:
    """DP-SGD steps (= releases) of one client's round: `steps_for(N_i)`, as the plan counts them."""
    return steps_for(num_examples, cfg.train)


def _refuse(client_id: str, what: str, fix: str, value: Any = None) -> FedsbError:
    return FedsbError(field=f"privacy account of {client_id}", value=value, what=what, fix=fix)


def client_account(
    cfg: RunConfig,
    client_id: str,
    num_examples: int,
    sent: Mapping[str, Any] | None,
    *,
    node_steps: int = 0,
) -> PrivacyAccount:
    """The account to train this round under: the server's `sent` copy, checked against the client's own
    plan and budget (raises `FedsbError` with the reason: the ClientApp then refuses the round)."""
    if not sent or ACCOUNT_KEY not in sent:
        raise _refuse(
            client_id,
            "is missing from the train message (privacy.mode=sample: the server's ledger sends it each round)",
            "use the same fedsb version on the server and on every client",
        )
    account = PrivacyAccount.from_dict(json.loads(str(sent[ACCOUNT_KEY])))
    _check_plan(cfg, client_id, num_examples, account)
    this_round = round_steps(cfg, num_examples)
    trained = account.steps - init_releases(cfg, client_id, account)
    if node_steps > account.steps:  # the node counts the account's steps after training (init included)
        raise _refuse(
            client_id,
            f"holds {account.steps} DP-SGD steps on the server, but this node took {node_steps}: the server's "
            "ledger lost steps this client spent, and training on it would understate epsilon",
            "continue the run from the server state that counted every step, or start a new run",
            value=account.steps,
        )
    if trained + this_round > account.planned_steps:
        raise _refuse(
            client_id,
            f"has {account.planned_steps - trained} of its {account.planned_steps} planned steps left, "
            f"this round takes {this_round}: training would spend more than the planned epsilon",
            "plan more rounds (fed.rounds) before the run starts, or stop here",
            value=account.steps,
        )
    return account


def init_releases(cfg: RunConfig, client_id: str, account: PrivacyAccount) -> int:
    """The federated init's releases at the head of the account's history (init.source=federated: 1 dense,
    2 sketch, at sigma init.noise_multiplier and rate 1; `fedsb.privacy.init_charge`), else 0. An account
    of a federated-init run that does not start with them is refused: it would understate epsilon."""
    if cfg.init.source != "federated":
        return 0
    from fedsb.init.federated import releases_per_client

    want = (float(cfg.init.noise_multiplier), 1.0, releases_per_client(cfg.init.exchange))
    head = tuple(account.history[0]) if account.history else None
    if head != want:
        raise _refuse(
            client_id,
            f"starts with {head}, not the federated init's releases {want} (init.source=federated)",
            "run the server and every client with the same config",
            value=head,
        )
    return want[2]


def _check_plan(cfg: RunConfig, client_id: str, num_examples: int, account: PrivacyAccount) -> None:
    """The sent account is the one this client's own copy of the plan gives (else raise)."""
    from fedsb.privacy.ledger import resolve_delta

    p = cfg.privacy
    expected = {
        "unit": client_id,
        "sample_rate": min(1.0, cfg.train.batch_size / num_examples),
        "delta": resolve_delta(p, num_examples, of=f"client {client_id} holds {num_examples} examples"),
        "accountant": p.accountant,
        "planned_steps": cfg.fed.rounds * round_steps(cfg, num_examples),
    }
    for name, want in expected.items():
        got = getattr(account, name)
        if got != want and not (isinstance(want, float) and abs(float(got) - want) <= 1e-12 * max(1.0, want)):
            raise _refuse(
                client_id,
                f"has {name}={got!r}, this client's plan gives {want!r}",
                "run the server and every client with the same config",
                value=got,
            )
    sigma = account.noise_multiplier
    if p.noise_multiplier is not None:
        if abs(sigma - p.noise_multiplier) > 1e-12:
            raise _refuse(
                client_id,
                f"has noise multiplier {sigma}, the config sets privacy.noise_multiplier={p.noise_multiplier}",
                "run the server and every client with the same config",
                value=sigma,
            )
        return
    planned = epsilon_of([(sigma, account.sample_rate, account.planned_steps)], account.delta, p.accountant)
    if p.target_epsilon is not None and planned > p.target_epsilon + EPSILON_SLACK:
        raise _refuse(
            client_id,
            f"has noise multiplier {sigma:.6g}, which spends epsilon {planned:.6g} over the planned "
            f"{account.planned_steps} steps, above privacy.target_epsilon={p.target_epsilon}",
            "run the server and every client with the same config",
            value=sigma,
        )
