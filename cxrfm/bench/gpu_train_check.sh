#!/usr/bin/env bash
# Device check for `cxrfm bench train` on a GPU host without installing the package:
# cxrfm.kernels is the folder kernels/ (pyproject package-dir), so a symlink stands in for the install.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_train_check}; mkdir -p "$OUT"
[ -e cxrfm/kernels ] || ln -sfn ../kernels cxrfm/kernels
python3 -c 'import torch, transformers, pydantic, yaml; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())' | tee "$OUT/versions.txt"
timeout "${BENCH_TIMEOUT:-200}" python3 -m cxrfm.bench.train --steps 5 --warmup 2 --backends sdpa,triton ${BENCH_ARGS:-} 2>&1 \
  | grep -v -i warn | tee "$OUT/train_bench.txt"
