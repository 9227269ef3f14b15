"""Privacy mechanisms as objects: each privacy mode is one class that supplies everything it changes in a run.

A mechanism answers, for the one round loop and the one training loop:

* **settings**: which `privacy.*` settings it reads (`reads`; the others are errors) and which other
  settings it overrides (`overrides`: warnings), and what it refuses in a config (`check`);
* **loss form**: whether training needs a mean of per-example losses (`per_example_loss`);
* **client step**: what wraps the client's optimizer in `train_local` (`client_step`: DP-SGD, or None);
* **aggregator**: what replaces the method's mean at the server (`aggregator`: DP-FedAvg, or None);
* **accounting**: its privacy accounts, planned for the whole training (`plan_accounts`), and its delta
  population (`delta_population`);
* **release**: what the server may write about a client (`release`) and the results' statement of what
  was released under which guarantee (`released`); the manifest's mode-specific fields (`summary_fields`).

`MECHANISMS` registers one instance per `privacy.mode`; `mechanism_named(mode)` looks one up. This module
imports nothing that imports `fedsb.config` (the config validates through it); the heavy parts (Opacus,
torch) load inside the methods that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fedsb.errors import ConfigError
from fedsb.fed import registry
from fedsb.privacy.release import KEPT_ON_CLIENTS, NOT_WRITTEN, ReleaseRules, holds_against

if TYPE_CHECKING:
    from fedsb.privacy.accounting import PrivacyAccount
    from fedsb.privacy.dpsgd import DPSGD

RunConfig = Any  # a fedsb.config.RunConfig (not imported: fedsb.config imports this module)
PrivacyConfig = Any  # a fedsb.config.PrivacyConfig
PrivacyLedger = Any  # a fedsb.privacy.ledger.PrivacyLedger (which imports the config)

#: the privacy settings every DP mechanism reads (`privacy.mode` itself is the switch)
DP_SETTINGS = (
    "privacy.target_epsilon",
    "privacy.noise_multiplier",
    "privacy.delta",
    "privacy.allow_large_delta",
    "privacy.reproducible_noise",
    "privacy.accountant",
)


@dataclass(frozen=True)
class Override:
    """Settings a mechanism makes ineffective (a warning when they are set), unless `applies(cfg)` is False."""

    keys: tuple[str, ...]
    because: str
    fix: str
    applies: Callable[[RunConfig], bool] = lambda cfg: True


class PrivacyMechanism:
    """No privacy (the base class is the `none` mode): every hook leaves the run as it is."""

    name: ClassVar[str] = "none"
    #: what `privacy.mode`'s help says about it ("" for none)
    summary: ClassVar[str] = ""
    #: how the config audit's fix names it ("DP-SGD in each client")
    short: ClassVar[str] = ""
    #: how the run's log line names it ("record-level DP-SGD in each client")
    description: ClassVar[str] = "no privacy"
    #: what one account protects ("one training example")
    unit: ClassVar[str] = ""
    #: how the final table qualifies the run's epsilon ("max over clients")
    epsilon_scope: ClassVar[str] = ""
    private: ClassVar[bool] = False
    per_example_loss: ClassVar[bool] = False
    #: every client holds its own account, planned from its size N_i (the plan must read the data)
    accounts_per_client: ClassVar[bool] = False
    #: the privacy.* settings it reads
    reads: ClassVar[tuple[str, ...]] = ()
    #: the settings it makes ineffective
    overrides: ClassVar[tuple[Override, ...]] = ()
    #: how it clips (the config audit's reason when another mechanism's settings are set)
    clipping: ClassVar[str] = ""
    #: what its own settings configure ("per-example DP-SGD")
    configures: ClassVar[str] = ""
    #: the client metrics its accounting covers (None: every metric, no DP)
    accounted_metrics: ClassVar[tuple[str, ...] | None] = None

    # ---- settings ---------------------------------------------------------------------------------------
    def check_settings(self, p: PrivacyConfig) -> None:
        """Refuse inconsistent `privacy.*` values (called by `PrivacyConfig`)."""

    def check(self, cfg: RunConfig) -> None:
        """Refuse a run this mechanism cannot honour (called by `RunConfig`), naming field, value and fix."""

    # ---- accounting -------------------------------------------------------------------------------------
    def plan_accounts(
        self, cfg: RunConfig, client_sizes: Mapping[str, int], steps_per_round: Mapping[str, int]
    ) -> dict[str, PrivacyAccount]:
        """Its accounts (unit -> account), each sigma given or solved for the whole planned training."""
        return {}

    delta_population: ClassVar[str] = ""  # what N is in delta's default rule

    # ---- the client step and the aggregator ---------------------------------------------------------------
    def client_step(self, ledger: PrivacyLedger, client_id: str) -> DPSGD | None:
        """What wraps this client's optimizer in the training loop (None: the plain step)."""
        return None

    def aggregator(self, ledger: PrivacyLedger) -> Callable[[Mapping[str, Any], int], Any] | None:
        """(global state, round) -> the round's aggregator, replacing the method's own (None: keep it)."""
        return None

    # ---- what may be released -------------------------------------------------------------------------------
    @property
    def release(self) -> ReleaseRules:
        return ReleaseRules(self.accounted_metrics)

    def released(self, reproducible_noise: bool) -> dict[str, Any] | None:
        """results.json's account of what the run released, to whom, under which guarantee."""
        return None

    def summary_fields(self, ledger: PrivacyLedger) -> dict[str, Any]:
        """The mechanism's own fields of the privacy summary (manifest, results)."""
        return {
            "max_grad_norm": None,
            "head_clip_share": None,
            "clip_update": None,
            "poisson_sampling": None,
            "caveat": None,
        }


class DifferentialPrivacy(PrivacyMechanism):
    """What every DP mechanism shares: a noise multiplier given or solved from a target epsilon."""

    private = True
    reads = DP_SETTINGS

    def check_settings(self, p: PrivacyConfig) -> None:
        if (p.target_epsilon is None) == (p.noise_multiplier is None):
            raise ConfigError(
                field="privacy.target_epsilon",
                value=p.target_epsilon,
                what=f"with privacy.noise_multiplier={p.noise_multiplier} is ambiguous or missing",
                fix="set exactly one of privacy.target_epsilon and privacy.noise_multiplier",
            )

    #: results.json's statement (`released`): the guarantee, what each client sends, what is published
    guarantee: ClassVar[str] = ""
    sent: ClassVar[tuple[str, ...]] = ()
    published: ClassVar[str] = ""

    def released(self, reproducible_noise: bool) -> dict[str, Any]:
        from fedsb.privacy.noise import noise_statement

        return {
            "guarantee": self.guarantee,
            "from_each_client": list(self.sent),
            "kept_on_clients": KEPT_ON_CLIENTS,
            "not_written": NOT_WRITTEN,
            "published": self.published,
            "noise": noise_statement(reproducible_noise),
            "holds_against": holds_against(reproducible_noise),
        }

    def _account(
        self, cfg: RunConfig, unit: str, *, n: int, of: str, rate: float, steps: int
    ) -> PrivacyAccount:
        from fedsb.privacy.accounting import plan_account
        from fedsb.privacy.delta import resolve_delta

        p = cfg.privacy
        return plan_account(
            unit=unit,
            target_epsilon=p.target_epsilon,
            noise_multiplier=p.noise_multiplier,
            delta=resolve_delta(p, n, of=of),
            sample_rate=rate,
            planned_steps=steps,
            accountant=p.accountant,
        )


class RecordLevel(DifferentialPrivacy):
    """Record-level DP-SGD inside each client (Opacus): Poisson batches, per-example clipping at
    privacy.max_grad_norm in fp32, Gaussian noise; one account per client, q_i = b / N_i, sigma_i solved so
    that all planned steps (rounds x local steps) spend at most the target epsilon.

    privacy.head_clip_share = f splits the clipping budget C between the head and the adapter (C sqrt(f)
    and C sqrt(1 - f) per example, `fedsb.privacy.dpsgd.GroupClippedDPOptimizer`): the sensitivity stays
    C, so the noise and the accounts are the flat clip's. It has no state (a setting of the saved config),
    and the Flower node reads it from the run's config as the simulator does."""

    name = "sample"
    summary = "record-level DP-SGD inside each client, Opacus"
    short = "DP-SGD in each client"
    description = "record-level DP-SGD in each client"
    unit = "one training example"
    epsilon_scope = "max over clients"
    per_example_loss = True
    accounts_per_client = True
    reads = (*DP_SETTINGS, "privacy.max_grad_norm", "privacy.poisson", "privacy.head_clip_share")
    overrides = (
        Override(
            ("train.max_grad_norm",),
            "with privacy.mode=sample, per-example clipping at privacy.max_grad_norm replaces it",
            "set privacy.max_grad_norm, or remove train.max_grad_norm",
        ),
    )
    clipping = "privacy.mode=sample clips each example's gradient at privacy.max_grad_norm"
    configures = "per-example DP-SGD"
    accounted_metrics = ("epsilon", "noise_multiplier", "dp_steps")
    delta_population = "N_i = the client's examples"
    guarantee = (
        "record-level (epsilon, delta)-DP for each client's training examples, composed over all of its "
        "DP-SGD steps; the run's epsilon is the maximum over clients (disjoint data)"
    )
    sent = (
        "its trained tensors after DP-SGD (per-example clipping at privacy.max_grad_norm in fp32, Gaussian noise)",
        "its declared example count: the planned size N_i (public: the plan's q_i = b/N_i)",
        "its accountant's state (epsilon, noise multiplier, DP steps): functions of the public plan",
    )
    published = (
        "the global state after every round and the final model (post-processing of the privatized updates), "
        "the per-round epsilons"
    )

    def check(self, cfg: RunConfig) -> None:
        if cfg.privacy.head_clip_share is not None and cfg.adapter.extra_trainable == []:
            raise ConfigError(
                field="privacy.head_clip_share",
                value=cfg.privacy.head_clip_share,
                what="splits the clipping budget between the head and the adapter, but "
                "adapter.extra_trainable=[] trains no head",
                fix="set privacy.head_clip_share=null, or train the head (adapter.extra_trainable=auto)",
            )
        if cfg.train.grad_accum != 1:
            raise ConfigError(
                field="train.grad_accum",
                value=cfg.train.grad_accum,
                what="is not supported with privacy.mode=sample (a Poisson batch is one DP-SGD step)",
                fix="use train.grad_accum=1 and set the expected batch with train.batch_size",
            )
        if cfg.train.gradient_checkpointing:
            raise ConfigError(
                field="train.gradient_checkpointing",
                value=True,
                what="is not supported with privacy.mode=sample: the recomputed forward breaks Opacus' "
                "per-example gradient hooks (its optimizer then finds no per-sample gradients)",
                fix="set train.gradient_checkpointing=false (or lower train.batch_size) for DP-SGD",
            )
        why = registry.card(cfg.fed.method).sample_dp_refusal
        if why is not None:
            able = registry.names_where(lambda c: c.sample_dp_refusal is None)
            raise ConfigError(
                field="fed.method",
                value=cfg.fed.method,
                what=f"is not supported with privacy.mode=sample ({why})",
                fix=f"use an adapter method ({', '.join(able)})",
            )

    def plan_accounts(
        self, cfg: RunConfig, client_sizes: Mapping[str, int], steps_per_round: Mapping[str, int]
    ) -> dict[str, PrivacyAccount]:
        return {
            cid: self._account(
                cfg,
                cid,
                n=n,
                of=f"client {cid} holds {n} examples",
                rate=min(1.0, cfg.train.batch_size / n),
                steps=cfg.fed.rounds * steps_per_round[cid],
            )
            for cid, n in client_sizes.items()
        }

    def client_step(self, ledger: PrivacyLedger, client_id: str) -> DPSGD:
        from fedsb.privacy.dpsgd import DPSGD

        return DPSGD(
            ledger.accounts[client_id],
            max_grad_norm=ledger.max_grad_norm,
            num_examples=ledger.client_sizes[client_id],
            poisson=ledger.poisson,
            reproducible_noise=ledger.reproducible_noise,
            head_clip_share=ledger.head_clip_share,
        )

    def summary_fields(self, ledger: PrivacyLedger) -> dict[str, Any]:
        return {
            "max_grad_norm": ledger.max_grad_norm,
            "head_clip_share": ledger.head_clip_share,
            "clip_update": None,
            "poisson_sampling": ledger.poisson,
            "caveat": None
            if ledger.poisson
            else "privacy.poisson=false: shuffled batches are accounted as if Poisson-sampled, so the "
            "stated epsilon is not a proven bound",
        }


class ClientLevel(DifferentialPrivacy):
    """Client-level DP-FedAvg at a trusted server: each client's whole update clipped to
    privacy.clip_update, Gaussian noise on their sum, uniform weights, a fixed denominator; one account,
    q = 1 (no amplification claimed), one release per round."""

    name = "client"
    summary = "DP-FedAvg: per-client update clipping and Gaussian noise at the server"
    short = "DP-FedAvg at the server"
    description = "client-level DP-FedAvg"
    unit = "one client's whole data"
    epsilon_scope = "client-level"
    reads = (*DP_SETTINGS, "privacy.clip_update")
    overrides = (
        Override(
            ("fed.weighting",),
            "privacy.mode=client (DP-FedAvg) always averages with uniform weights",
            "remove fed.weighting, or use privacy.mode=sample",
            applies=lambda cfg: cfg.fed.weighting != "uniform",
        ),
    )
    clipping = "privacy.mode=client clips each client's whole update at privacy.clip_update"
    configures = "client-level DP-FedAvg"
    accounted_metrics = ()
    delta_population = "N = the number of clients"
    guarantee = (
        "client-level (epsilon, delta)-DP (one client's whole data) for everything the server publishes; the "
        "server is trusted with the unnoised updates it clips and noises"
    )
    sent = (
        "its trained tensors, unnoised, to the trusted server, which clips each update to privacy.clip_update "
        "and adds Gaussian noise to their sum (uniform weights)",
        "its declared example count (public: the planned partition), not used for weighting",
    )
    published = "the noisy global state after every round and the final model, the per-round epsilons"
    SERVER_UNIT: ClassVar[str] = "server"

    def check(self, cfg: RunConfig) -> None:
        if not registry.card(cfg.fed.method).mean_aggregate:
            means = registry.names_where(lambda c: c.mean_aggregate)
            raise ConfigError(
                field="privacy.mode",
                value=self.name,
                what=f"does not apply to fed.method={cfg.fed.method}: its aggregate is not a mean of the sent tensors",
                fix=f"use privacy.mode=sample, or fed.method {', '.join(means[:-1])} or {means[-1]}",
            )
        if cfg.train.keep_optimizer_state:
            raise ConfigError(
                field="train.keep_optimizer_state",
                value=True,
                what="is not supported with privacy.mode=client: each client's optimizer state is an unnoised "
                "function of its gradients, and the run's checkpoints would hold it",
                fix="set train.keep_optimizer_state=false, or use privacy.mode=sample (its optimizer state "
                "is post-processing of the noised gradients)",
            )

    def plan_accounts(
        self, cfg: RunConfig, client_sizes: Mapping[str, int], steps_per_round: Mapping[str, int]
    ) -> dict[str, PrivacyAccount]:
        n = len(client_sizes)
        account = self._account(cfg, self.SERVER_UNIT, n=n, of=f"{n} clients", rate=1.0, steps=cfg.fed.rounds)
        return {self.SERVER_UNIT: account}

    def aggregator(self, ledger: PrivacyLedger) -> Callable[[Mapping[str, Any], int], Any]:
        from fedsb.privacy.client_level import ClippedNoisyMean
        from fedsb.privacy.noise import noise_source

        def make(reference: Mapping[str, Any], round: int) -> ClippedNoisyMean:
            account = ledger.accounts[self.SERVER_UNIT]  # looked up per round: a resume replaces the accounts
            return ClippedNoisyMean(
                reference,
                clip=ledger.clip_update,
                noise_multiplier=account.noise_multiplier,
                denominator=ledger.clients_per_round,
                noise=noise_source(
                    reproducible=ledger.reproducible_noise,
                    seed=ledger.seed,
                    purpose=["client-dp-noise", round],
                ),
                on_release=account.step,
            )

        return make

    def summary_fields(self, ledger: PrivacyLedger) -> dict[str, Any]:
        return {
            "max_grad_norm": None,
            "head_clip_share": None,
            "clip_update": ledger.clip_update,
            "poisson_sampling": None,
            "caveat": None,
        }


#: privacy.mode -> its mechanism
MECHANISMS: dict[str, PrivacyMechanism] = {
    m.name: m for m in (PrivacyMechanism(), RecordLevel(), ClientLevel())
}


def mechanism_named(mode: str) -> PrivacyMechanism:
    """The mechanism of `privacy.mode=mode` (a ConfigError naming the modes for an unknown one)."""
    try:
        return MECHANISMS[mode]
    except (KeyError, TypeError):
        raise ConfigError(
            field="privacy.mode", value=mode, fix=f"use one of: {', '.join(MECHANISMS)}"
        ) from None


def own_settings(mechanism: PrivacyMechanism) -> tuple[str, ...]:
    """The privacy settings only `mechanism` reads (an error under any other DP mechanism)."""
    others = {k for m in MECHANISMS.values() if m is not mechanism for k in m.reads}
    return tuple(k for k in mechanism.reads if k not in others)


def mode_help() -> str:
    """privacy.mode's help text: every registered mode with its summary."""
    return "; ".join(f"{m.name} ({m.summary})" if m.summary else m.name for m in MECHANISMS.values())
