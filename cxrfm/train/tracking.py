"""MLflow tracking: the driver owns the run; rank 0 logs metrics into it by run id."""

from __future__ import annotations

from pathlib import Path

from cxrfm.config import Config


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    db = Path(cfg.train.output_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow caps param values
    return out


class MetricLogger:
    """Logs a step's metrics to an existing MLflow run (used by rank 0 inside a Ray worker)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
