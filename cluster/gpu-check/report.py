"""Table of `cxrfm train` runs from their MLflow records: what each rank ran, speed, memory, losses.

    python cluster/gpu-check/report.py runs/gpu-1b

One row per run under the output directory (each `<run>/run.json` names its MLflow run): ZeRO stage and
attention backend as the ranks reported them (params rank<N>/*), fused kernels, tokens/s, TFLOP/s per
device and MFU (the FLOP count of `cxrfm bench train`), peak GPU memory, and the loss at the first and last
logged step (same seed and data: the backends' first losses should agree).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(output_dir: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    out = []
    for state_file in sorted(output_dir.glob("*/run.json")):
        state = json.loads(state_file.read_text())
        client = MlflowClient(tracking_uri=state["tracking_uri"])
        run = client.get_run(state["mlflow_run_id"])
        params = run.data.params

        def history(key: str) -> list[float]:
            return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

        def steady(key: str) -> float:  # the first window holds compilation and warm-up
            h = history(key)
            h = h[1:] or h
            return sum(h) / len(h) if h else float("nan")

        loss = history("loss")
        out.append({
            "run": state["run_name"], "zero": params.get("rank0/zero_stage", "?"),
            "attention": params.get("rank0/attention", "?"),
            "fused": params.get("rank0/fused_cross_entropy", "?") + "/" + params.get("rank0/fused_rmsnorm", "?"),
            "tokens_s": steady("tokens_per_s"), "tflops": steady("tflops_per_device"), "mfu": steady("mfu"),
            "peak_gib": max(history("peak_memory_gib") or [float("nan")]),
            "loss_first": loss[0] if loss else float("nan"), "loss_last": loss[-1] if loss else float("nan"),
        })
    return out


def main(argv: list[str]) -> int:
    table = rows(Path(argv[0] if argv else "runs/gpu-1b"))
    print(f"{'run':<22} {'ZeRO':>4} {'attention':<9} {'fused CE/RMS':<12} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>8} {'loss first':>10} {'loss last':>9}")
    for r in table:
        print(f"{r['run']:<22} {r['zero']:>4} {r['attention']:<9} {r['fused']:<12} {r['tokens_s']:9.0f} "
              f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {r['peak_gib']:8.1f} {r['loss_first']:10.4f} {r['loss_last']:9.4f}")
    return 0 if table else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
