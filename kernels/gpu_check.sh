#!/usr/bin/env bash
# One GPU check of cxrfm.kernels, sized for a short lease (about 3-5 minutes on an H100/H200):
#   1. versions (torch, triton, transformers, flash-attn / xformers if present)
#   2. kernel + dispatch tests on the GPU (real shapes, bf16), one config per kernel (CXRFM_AUTOTUNE=0)
#   3. fused-CE memory bench (8k tokens x 4096 hidden x 128k vocab)
#   4. attention bench sweep (autotuned), printed row by row
# Results go to $OUT (or /tmp/gpu_check). Installs nothing from the network.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__, torch.cuda.get_device_name())' 2>&1 | tee "$OUT/versions.txt"
python3 -m pip list 2>/dev/null | grep -i -E '^(flash|xformers)' | tee -a "$OUT/versions.txt"

# cxrfm.kernels is the folder kernels/ (pyproject package-dir). On this throwaway copy of the tree a symlink
# gives the same import path without installing anything.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c 'import cxrfm.kernels' 2>/dev/null; then
  ln -sfn ../kernels cxrfm/kernels
fi
python3 -c 'import cxrfm.kernels, cxrfm.attention; print("cxrfm.kernels from", cxrfm.kernels.__file__)' || exit 1

echo "== tests (GPU) =="
CXRFM_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider -n 8 -o addopts="" \
  tests/kernels tests/test_attention.py -rs 2>&1 | tee "$OUT/tests.txt" | tail -25

echo "== loss memory bench =="
timeout 40 python3 -m cxrfm.bench.loss 2>&1 | tee "$OUT/loss_bench.txt"

echo "== attention bench =="
# the autotuner's choices go to the full log; the table alone to the screen
TRITON_PRINT_AUTOTUNING=1 timeout "${BENCH_TIMEOUT:-150}" python3 -m cxrfm.bench.attention --warmup-ms 10 --rep-ms 40 \
  ${BENCH_ARGS:-} >"$OUT/attention_bench_full.txt" 2>&1
grep -v -E "^(Triton autotuning|Autotuning kernel|with key|finished after|best config)" "$OUT/attention_bench_full.txt" \
  | tee "$OUT/attention_bench.txt"
