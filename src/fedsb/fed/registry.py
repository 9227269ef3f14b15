"""Names of the federated methods, importable without torch (the config validates against them)."""

from __future__ import annotations

#: method name -> "module:Class" (loaded lazily by `fedsb.fed.methods.get_method_class`)
METHODS: dict[str, str] = {
    "fedsb": "fedsb.fed.fedsb:FedSB",
    "fedit": "fedsb.fed.fedit:FedIT",
    "ffa": "fedsb.fed.ffa:FFALoRA",
    "ravan": "fedsb.fed.ravan:Ravan",
    "fedsvd": "fedsb.fed.fedsvd:FedSVD",
    "fedex": "fedsb.fed.fedex:FedExLoRA",
    "flora": "fedsb.fed.flora:FLoRA",
    "full": "fedsb.fed.full:FullFineTune",
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

#: methods whose setup computes a frozen basis from the init.* settings -> the setting naming the basis init
#: (lora-sb, lora-xs or random); the other methods ignore init.*
BASIS_INIT: dict[str, str] = {"fedsb": "init.method", "ravan": "ravan.init"}

#: methods whose global state is the weighted mean of the clients' uploads and is what every download
#: carries: a server optimizer (fed.server_optimizer) steps that state along mean - state, and int8 wire
#: deltas (fed.wire_dtype=int8) are changes of it. FedEx and FLoRA fold, FedSVD re-factorizes.
MEAN_STATE_METHODS: tuple[str, ...] = ("fedsb", "ravan", "fedit", "ffa", "full")
