#!/usr/bin/env bash
# The GPU check: the tests marked `gpu` and the GPU benchmark, in one short run (<= 8 min on one H200).
#
# Made for the device tool's machine (torch, transformers, peft, accelerate, pytest there; no network):
# the packages it lacks travel as wheels in .whl/ (benchmarks/README.md, "GPU check", lists the exact
# `pip download` commands) and are installed here into /tmp/site. From the repository root:
#
#     bash benchmarks/gpu_check.sh            # device tool: carry [".whl"], results under $OUT
#
# Output: $OUT (or benchmarks/out/gpu) gets gpu_env.txt, gpu_tests.log, bench_gpu.log and bench_gpu.json.
# Exit status: the tests' (0 all passed or skipped), else the benchmark's.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export FEDSB_CACHE=/tmp/fedsb-cache HF_HOME=/tmp/hf-home TOKENIZERS_PARALLELISM=false

{
  nvidia-smi -L 2>&1 || true
  python3 - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "accelerate", "datasets", "flwr-datasets", "bitsandbytes", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF
} 2>&1 | tee "$OUT/gpu_env.txt"

echo "== tests marked gpu ($(($(date +%s) - start)) s)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs -s 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}

echo "== benchmark ($(($(date +%s) - start)) s)"
# GPU_BENCH_ARGS: e.g. "--shape tiny --device cpu" to smoke-test this script on a machine without a GPU
timeout 150 python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
bench=${PIPESTATUS[0]}

echo "== done in $(($(date +%s) - start)) s: tests exit $tests, benchmark exit $bench"
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
