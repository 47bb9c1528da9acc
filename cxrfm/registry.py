"""Model lifecycle through the MLflow model registry.

- Training with `tracking.register_as: NAME` registers its export (the run's `export` artifacts) as a new
  version of NAME, tagged with the run's config and a summary of the data manifest(s) it trained on.
- `cxrfm eval EXPORT` attaches its metrics to every version registered from that export's run
  (version tags `eval.<split>.<metric>`).
- `cxrfm models list [NAME] | promote NAME VERSION [--alias champion] | rollback NAME [--alias champion]`
  wrap the registry: promote moves an alias (and remembers where it pointed), rollback moves it back.
- Serving: a catalog entry `models:/NAME@champion` follows the alias; running replicas check it every
  `registry_poll_s` and load a newly promoted version in place (serving/deployments.py).

The tracking URI is the one the run used (`tracking.mlflow_uri`, else MLFLOW_TRACKING_URI): with an
`mlflow server`, the registry and artifacts are the server's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HISTORY_TAG = "cxrfm.alias_history.{alias}"  # registered-model tag: versions the alias pointed to, oldest first
MAX_TAG = 5000  # MLflow's limit on a tag value


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return MlflowClient(uri, registry_uri=uri)


def manifest_summary(manifests: list[dict]) -> dict:
    """Studies and task counts per split over every source the run mixed, and the sources' names."""
    out: dict = {"sources": sorted({str(m.get("source", "?")) for m in manifests})}
    for split in ("train", "val", "test"):
        infos = [m["splits"][split] for m in manifests if split in m.get("splits", {})]
        if infos:
            tasks: dict[str, int] = {}
            for info in infos:
                for task, n in info.get("tasks", {}).items():
                    tasks[task] = tasks.get(task, 0) + n
            out[split] = {"studies": sum(i.get("studies", 0) for i in infos), "tasks": tasks}
    return out


def register_export(tracking_uri: str, run_id: str, name: str, config: dict, manifests: list[dict],
                    artifact_path: str = "export") -> str:
    """Register the run's logged export as a new version of `name`; returns the version number."""
    import yaml

    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="cxrfm multitask chest X-ray model exports")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    text = yaml.safe_dump(config, sort_keys=False)
    tags = {"cxrfm.data": json.dumps(manifest_summary(manifests))[:MAX_TAG],
            "cxrfm.config": text if len(text) <= MAX_TAG else text[:MAX_TAG - 60] + "\n# ... (full file: run artifact config.yaml)"}
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                          description=f"export of run {run_id}")
    return str(version.version)


def attach_eval(export_dir: str | Path, metrics: dict[str, float], split: str) -> list[tuple[str, str]]:
    """Tag every registered version of the export's training run with the evaluation metrics; returns the
    (name, version) pairs tagged (none if the run registered nothing or has no run.json)."""
    state_file = Path(export_dir).resolve().parent / "run.json"
    if not state_file.is_file():
        return []
    state = json.loads(state_file.read_text())
    client = _client(state["tracking_uri"])
    tagged = []
    for v in client.search_model_versions(f"run_id='{state['mlflow_run_id']}'"):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                client.set_model_version_tag(v.name, v.version, f"eval.{split}.{key}", str(value))
        tagged.append((v.name, str(v.version)))
    return tagged


def _history(client, name: str, alias: str) -> list[str]:
    tag = client.get_registered_model(name).tags.get(HISTORY_TAG.format(alias=alias), "")
    return [v for v in tag.split(",") if v]


def promote(tracking_uri: str | None, name: str, version: str, alias: str = "champion") -> str | None:
    """Point `alias` at `version`; returns the version it pointed to before (None if unset)."""
    client = _client(tracking_uri)
    client.get_model_version(name, version)  # fails clearly for a version that does not exist
    try:
        before = str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - the alias is not set yet
        before = None
    history = _history(client, name, alias)
    if before and (not history or history[-1] != before):
        history.append(before)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), ",".join((history + [str(version)])[-50:]))
    return before


def rollback(tracking_uri: str | None, name: str, alias: str = "champion") -> str:
    """Move `alias` back to the version it pointed to before the last promote; returns that version."""
    client = _client(tracking_uri)
    history = _history(client, name, alias)
    if len(history) < 2:
        raise ValueError(f"{name}@{alias}: nothing to roll back to (promotions recorded: {history or 'none'})")
    history.pop()
    client.set_registered_model_alias(name, alias, history[-1])
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), ",".join(history))
    return history[-1]


def list_models(tracking_uri: str | None, name: str | None = None) -> list[dict]:
    client = _client(tracking_uri)
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for n in names:
        aliases = client.get_registered_model(n).aliases  # {alias: version}
        for v in sorted(client.search_model_versions(f"name='{n}'"), key=lambda v: int(v.version)):
            metrics = {k: v.tags[k] for k in sorted(v.tags) if k.startswith("eval.")}
            rows.append({"name": n, "version": str(v.version), "run_id": v.run_id, "status": v.status,
                         "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
                         "eval": metrics})
    return rows


# ---- command line ---------------------------------------------------------------------------------
def _cmd(args: argparse.Namespace) -> int:
    try:
        if args.models_cmd == "list":
            rows = list_models(args.tracking_uri, args.name)
            for r in rows:
                evals = " ".join(f"{k}={v}" for k, v in r["eval"].items())
                print(f"{r['name']} v{r['version']}  aliases={','.join(r['aliases']) or '-'}  run={r['run_id']}  "
                      f"{r['status']}  {evals}".rstrip())
            if not rows:
                print("no registered models (train with tracking.register_as: NAME)")
        elif args.models_cmd == "promote":
            before = promote(args.tracking_uri, args.name, args.version, args.alias)
            print(f"{args.name}@{args.alias} -> version {args.version} (was {before or 'unset'})")
        else:
            version = rollback(args.tracking_uri, args.name, args.alias)
            print(f"{args.name}@{args.alias} -> version {version} (rolled back)")
    except Exception as e:  # noqa: BLE001 - registry errors (unknown model/version, unreachable server)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="registered model versions in MLflow: list, promote, roll back")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    ls = sub.add_parser("list", help="versions with their aliases and evaluation metrics")
    ls.add_argument("name", nargs="?")
    pr = sub.add_parser("promote", help="point an alias (default champion) at a version")
    pr.add_argument("name")
    pr.add_argument("version")
    rb = sub.add_parser("rollback", help="move an alias back to the version it pointed to before")
    rb.add_argument("name")
    for q in (pr, rb):
        q.add_argument("--alias", default="champion")
    for q in (ls, pr, rb):
        q.add_argument("--tracking-uri", default=None, help="MLflow server or store (default: MLFLOW_TRACKING_URI)")
    p.set_defaults(func=_cmd)
    return p
