"""Communication per round for Fed-SB and the baselines: the paper's "# Comm." and real bytes both ways.

Shapes only, never weights: a model is a shape-facts file shipped in ``fedsb/shapes/*.json`` (offline), or a
local directory / hub id whose ``config.json`` is read with ``transformers.AutoConfig`` (Llama-family and
BERT-family configs). A hub id listed as ``hf_id`` in a shipped file uses that file (offline).

Counts are **per client, per round** and summed over the adapted modules (m = out, n = in features, r capped
at min(m, n) per module; method.md 6.2):

============  ===========  ===========================================  =============================
method        upload       download (real)                              paper "# Comm." (one way)
============  ===========  ===========================================  =============================
fedit         r(m+n)       r(m+n)                                       r(m+n)
ffa           r·m          r·m                                          ½·r(m+n) (the tables' rule)
fedex         r(m+n)       (c+1)·r(m+n): means + c stacked factors      c·r(m+n)
flora         r(m+n)       c·r(m+n)                                     c·r(m+n)
fedsb         r²           r²                                           r²
ravan         h·r²         h·r²                                         h·r² (not in the paper)
fedsvd        r·m          r(m+n)                                       r(m+n) (not in the paper)
============  ===========  ===========================================  =============================

- A trained head (BERT's SNLI classifier, 768·3 + 3 = 2,307) is added **once to every message** in every
  method, as the paper does (FedEx/FLoRA: c·adapters + head once, i.e. 3541.25K for BERT at c = 3).
- Fed-SB also costs a one-time download of its frozen basis, r(m+n) per module, reported as ``basis``
  and never folded into the per-round figures (the tables leave it out); RAVAN's h heads of rank r cost
  h·r(m+n) once. FedSVD's A changes every round, so it travels with B in every download. FFA's frozen A comes from a shared
  seed and costs nothing. FedEx's download is the new means (mean B, mean A) plus the c clients' stacked
  factors of the residual every party folds into W0, from round 2 on (round 1: the means alone); a dense
  m·n residual would be cheaper per module once c + 1 > m·n / (r(m+n)) but is not what a run sends.
- Bytes = parameters × bytes per element of the wire dtype (float32 4, bfloat16/float16 2; int8 1 plus a
  4-byte scale per tensor, or per row with wire_scale=row, for fedsb, ravan, fedit and ffa only, the basis
  still float32); 1 MB = 10⁶ B. "per round" = c × (upload + download).
- A run's settings (`fedsb.comm.extras`, shared with `fedsb run --dry-run`; each tested equal to a real
  run's ledger): mixed ranks (client_ranks = partition.client_ranks: a client of rank r_i uploads
  sum min(r_i, r_m)² + the head, downloads the full R; the upload shown is the mean over the clients), int8
  scales of the tensors each formula sends (`MethodComm.sent`) and of the head, and the federated init's
  one-time fp32 exchanges (federated_init = init.exchange: dense m·n, sketch 2·m·k + k·n per module per init
  client, k = min(r + oversample, m, n)).

Rounding convention (the tables' last digits are inconsistent, method.md 6.3): we keep **exact integer
counts** and display them in the table's unit (M = 10⁶ for decoders, K = 10³ for encoders) **rounded half-up
to two decimals** -- one rule, no per-cell fudging. No single rounding rule reproduces every cell (e.g.
Mistral FedIT 83.886M is printed 83.88 but Llama Fed-SB 2.8224M is printed 2.83 and 7.840M 7.85), and the
c = 25 FedEx/FLoRA cells carry an unexplained ≈ +0.2M that we do not add. Against all 24 cells of the
paper's four tables:

======================  ===============  ==================  ==============  ================
cell                    exact            ours (displayed)    paper           exact vs paper
======================  ===============  ==================  ==============  ================
Llama FedEx/FLoRA c=5   243,138,560      243.14M             243.15M         -0.004 %
Llama Fed-SB r=120      2,822,400        2.82M               2.83M           -0.27 % (largest)
Llama Fed-SB r=200      7,840,000        7.84M               7.85M           -0.13 %
Mistral-7B FedIT r=32   83,886,080       83.89M              83.88M          +0.007 %
Mistral FedEx/FLoRA     2,097,152,000    2097.15M            2097.34M        -0.009 %
Mistral Fed-SB r=120    3,225,600        3.23M               3.22M           +0.17 %
Gemma-2 FedEx/FLoRA     2,700,902,400    2700.90M            2701.12M        -0.008 %
BERT FedEx/FLoRA c=3    3,541,251        3541.25K            3541.26K        -0.0003 %
BERT Fed-SB r=48        57,603           57.60K              57.59K          +0.02 %
======================  ===============  ==================  ==============  ================

The other 15 cells match to the printed digit. Largest deviation of the exact count: 0.27 % (Llama Fed-SB
r = 120); of the displayed figure: 0.35 % (2.82 vs 2.83). ``tests/comm/test_comm.py`` checks every cell at 0.5 %.

Layout: `shapes` (shape facts of a model), `formulas` (the counts above, one function per method),
`extras` (what a run's settings add), `table` (rows, rounding, the printed table); the command line is
`fedsb.cli`'s. The methods, their display names and formulas come from the method registry
(`fedsb.fed.registry`). This package does not import torch (``fedsb comm`` stays fast); transformers is
imported only to read a config that is not shipped.
"""

from fedsb.comm.formulas import MethodComm, Shape, fedex, fedit, fedsb, fedsvd, ffa, flora, ravan
from fedsb.comm.shapes import (
    BERT_FAMILY,
    BERT_TARGETS,
    LLAMA_FAMILY,
    LLAMA_TARGETS,
    ShapeFacts,
    facts_from_config,
    module_shapes,
    resolve_model,
    select_modules,
    shipped_models,
)
from fedsb.comm.table import (
    DTYPE_BYTES,
    METHOD_NAMES,
    METHODS,
    comm_table,
    describe,
    format_bytes,
    format_count,
    format_table,
    int8_scale_bytes,
)

__all__ = [
    "BERT_FAMILY",
    "BERT_TARGETS",
    "DTYPE_BYTES",
    "LLAMA_FAMILY",
    "LLAMA_TARGETS",
    "METHODS",
    "METHOD_NAMES",
    "MethodComm",
    "Shape",
    "ShapeFacts",
    "comm_table",
    "describe",
    "facts_from_config",
    "fedex",
    "fedit",
    "fedsb",
    "fedsvd",
    "ffa",
    "flora",
    "format_bytes",
    "format_count",
    "format_table",
    "int8_scale_bytes",
    "module_shapes",
    "ravan",
    "resolve_model",
    "select_modules",
    "shipped_models",
]
