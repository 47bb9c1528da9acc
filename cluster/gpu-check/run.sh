#!/usr/bin/env bash
# The GPU path on one GPU host with no package index, sized for two calls of under 10 minutes each:
#   cluster/gpu-check/run.sh train   the real `cxrfm train` (Ray Data -> Ray Train -> DeepSpeed, bf16, MLflow) on
#                                    the ~1B model of jobs/gpu-1b.yaml: ZeRO-2 and ZeRO-3 x (sdpa, triton,
#                                    triton + fused RMSNorm/cross-entropy), then the table of report.py
#   cluster/gpu-check/run.sh bench   `cxrfm bench train` (plain PyTorch loop, same model and FLOP count),
#                                    then serving on the GPU: `cxrfm bench serve` on the trained export
# Wheels the host lacks (Ray, DeepSpeed, pydantic, diffusers, webdataset, MLflow): build them elsewhere with
#   python cluster/gpu-check/wheels.py --host-packages host.txt --out .whl
# and bring .whl/ along; they are installed into /tmp/site. Logs and tables go to $OUT (default /tmp/cxrfm-gpu).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/cxrfm-gpu}
PHASE=${1:-train}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# cxrfm.kernels and cxrfm.serving are the folders kernels/ and serving/ (pyproject package-dir); on an
# uninstalled tree, links give the same import paths.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e cxrfm/kernels ] || ln -sfn ../kernels cxrfm/kernels
[ -e cxrfm/serving ] || ln -sfn ../serving cxrfm/serving
python3 -c 'import torch, triton, transformers, ray, deepspeed; print(torch.cuda.get_device_name(), "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)' \
  2>&1 | tee "$OUT/versions.txt" | tail -1
CX="python3 -m cxrfm.cli"
RUNS=runs/gpu-1b
# A file store: MLflow's SQLite store needs SQLAlchemy, which the wheel set leaves out.
TRACK="tracking.mlflow_uri=file://$PWD/$RUNS/mlruns"

if [ "$PHASE" = train ]; then
  for stage in 2 3; do
    for variant in sdpa triton triton-fused; do
      att=${variant%-fused}
      fused=false; [ "$variant" = triton-fused ] && fused=true
      name=zero$stage-$variant
      echo "== cxrfm train: ZeRO-$stage, $variant =="
      timeout "${RUN_TIMEOUT:-120}" $CX train jobs/gpu-1b.yaml --no-progress --set "$TRACK" \
        --set deepspeed.stage=$stage --set model.attention=$att --set model.fused_rmsnorm=$fused \
        --set model.fused_cross_entropy=$fused --set tracking.run_name=$name >"$OUT/train-$name.log" 2>&1
      echo "exit $?"; grep -E "^(rank|tokens/s|loss )" "$OUT/train-$name.log" | head -4
      rm -rf "$RUNS/ray/$name" "$RUNS/$name/export"  # checkpoints and exports: 20 GB a run, not needed here
    done
  done
  python3 cluster/gpu-check/report.py "$RUNS" | tee "$OUT/train-table.txt"
elif [ "$PHASE" = bench ]; then
  echo "== cxrfm bench train (plain loop, same model) =="
  timeout 200 $CX bench train --preset gpu-1b --batch 8 --set data.max_seq_len=1024 --backends sdpa,triton \
    2>&1 | tee "$OUT/bench-train.txt" | tail -8
  echo "== cxrfm bench serve (GPU replica) =="
  timeout 300 $CX bench serve --device cuda --replica-gpus 1 --replica-cpus 2 --levels 1,8,16 --requests 32 \
    --max-new-tokens 32 --autoscale-max 0 2>&1 | tee "$OUT/bench-serve.txt" | tail -12
else
  echo "usage: $0 train|bench"; exit 2
fi
