"""Mixed client ranks and the federated (private) init on MiniLM-L6 + SST-2, paired seeds.

    nice -n 15 .venv/bin/python benchmarks/bench_beyond.py --suite mixed      # {8,16,32} clients vs all 32 vs all 8
    nice -n 15 .venv/bin/python benchmarks/bench_beyond.py --suite init       # federated init vs server / pooled /
                                                                              # lora-xs / random (no DP)
    nice -n 15 .venv/bin/python benchmarks/bench_beyond.py --suite init-dp    # the same inits under one DP budget
    nice -n 15 .venv/bin/python benchmarks/bench_beyond.py --suite mixed --seeds 0 --variants 'fedsb:32' ...

The setting, the runner (`fedsb compare`'s `run_comparison`: identical partitions, data order and seeded
draws per seed; finished runs are reused) and the table are bench_wire.py's (its `SHARED`: Fed-SB r = 32
at lr 0.02, 1,000 SST-2 sentences IID over 5 clients, 3 rounds x 5 local steps x 8 sentences, 436 dev
sentences). Reported per variant: accuracy by seed, mean and std, the paired difference to the first
variant, bytes over the rounds (ledger) and the ratio first / variant. The one-time bytes (basis
broadcast, the federated init's exchanges) are in each run's results.json -> ledger.one_time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_wire  # noqa: E402  (the shared setting, runner and table)

#: init-dp: one record-level budget for init and training together (epsilon 8 over the whole run)
DP = "privacy.mode=sample/privacy.target_epsilon=8/privacy.accountant=rdp"
SUITES: dict[str, dict[str, Any]] = {
    "mixed": {
        "variants": [
            "fedsb:32",
            "fedsb:32/partition.client_ranks=[8,16,32,8,16]",
            "fedsb:8",
        ],
        "overrides": [],
    },
    "init": {
        "variants": [
            "fedsb:32",  # init.source=server: the server's proxy sample
            "fedsb:32/init.source=federated",
            "fedsb:32/init.source=federated/init.exchange=dense",
            "fedsb:32/init.source=pooled",
            "fedsb:32/init.method=lora-xs",
            "fedsb:32/init.method=random",
        ],
        "overrides": [],
    },
    "init-dp": {
        "variants": [
            f"fedsb:32/{DP}",
            f"fedsb:32/{DP}/init.source=federated",
            f"fedsb:32/{DP}/init.method=lora-xs",
            f"fedsb:32/{DP}/init.method=random",
        ],
        "overrides": [],
    },
}


def main() -> int:
    bench_wire.SUITES.update(SUITES)
    return bench_wire.main()


if __name__ == "__main__":
    raise SystemExit(main())
