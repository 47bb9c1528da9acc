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


STEP_METRIC = "samples_per_s"  # logged at every log step whatever the tasks: marks the steps already in the run


class MetricLogger:
    """Logs a step's metrics to an existing MLflow run (used by rank 0 inside a Ray worker).

    After a restart from a checkpoint (a lost node or worker, a killed driver) the steps between that
    checkpoint and the failure are trained again. Those already in the run are not logged a second time,
    so each step appears once and the history has no gap; the run keeps the values of their first pass."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.logged_through = max((m.step for m in self.client.get_metric_history(run_id, STEP_METRIC)), default=-1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
