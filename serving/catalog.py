"""The model catalog of a serving application: model id -> where its export comes from, and loading it.

Sources: an export directory (a glob picks the newest match, e.g. `runs/tiny/*/export`), or an MLflow URI
(`models:/name/version`, `models:/name/latest`, `models:/name@alias`, `runs:/id/path`) downloaded once per
version into `cache_dir`. A `models:/name@alias` entry follows its alias: the replicas re-resolve it every
`registry_poll_s` (serving/deployments.py) and load a newly promoted version in place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


class ModelCatalog:
    """Model id -> loaded Predictor. Sources: an export directory (a glob picks the newest match, e.g.
    `runs/tiny/*/export`), or an MLflow URI (`models:/name/version`, `models:/name@alias`, `runs:/id/path`)
    downloaded once into `cache_dir`."""

    def __init__(self, models: dict[str, str], device: str = "auto", tracking_uri: str | None = None,
                 cache_dir: str = "/tmp/cxrfm-model-cache", dtype: str = "auto", attention: str | None = None):
        self.models, self.device, self.tracking_uri, self.cache_dir = dict(models), device, tracking_uri, Path(cache_dir)
        self.dtype, self.attention = dtype, attention

    def follows_alias(self, model_id: str) -> bool:
        """models:/NAME@ALIAS entries: the version behind the alias can change while replicas run."""
        return self.models.get(model_id, "").startswith("models:/") and "@" in self.models[model_id]

    def resolve(self, model_id: str, version: str | None = None) -> Path:
        """The export directory of a catalog entry; for a registry entry, of `version` (default: the one
        its URI names now), downloaded once per version."""
        if model_id not in self.models:
            raise KeyError(f"model {model_id!r} is not in this application's catalog")
        source = self.models[model_id]
        if source.startswith(("models:/", "runs:/")):
            import mlflow.artifacts

            if source.startswith("models:/"):
                name, version = self.registry_version(source) if version is None else (self._name(source), version)
                key = f"models:/{name}/{version}"
            else:
                key = source
            dest = self.cache_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
            if not (dest / "config.json").is_file():
                uri = self._download_uri(name, version) if source.startswith("models:/") else source
                # Download beside the cache entry, then rename: a half-downloaded export is never used,
                # and replicas on one node that race for the same model end with one complete copy.
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".download-"))
                try:
                    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging),
                                                                tracking_uri=self.tracking_uri)
                    try:
                        os.replace(local, dest)
                    except OSError:
                        if not (dest / "config.json").is_file():
                            raise
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            return dest
        if any(c in source for c in "*?["):
            root = Path(source).anchor or "."
            # A link's own mtime: symlinked exports would otherwise all share their target's.
            matches = sorted(Path(root).glob(str(Path(source).relative_to(root))), key=lambda p: p.lstat().st_mtime)
            if not matches:
                raise FileNotFoundError(f"model {model_id!r}: nothing matches {source}; train one with `cxrfm train`")
            return matches[-1]
        return Path(source)

    def _client(self):
        # A client bound to our store: MLflow's own models:/ download reads only the process-wide registry
        # URI. tracking_uri None: MLFLOW_TRACKING_URI from the environment.
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)

    @staticmethod
    def _name(uri: str) -> str:
        return uri[len("models:/"):].partition("/")[0].split("@", 1)[0]

    def registry_version(self, uri: str) -> tuple[str, str]:
        """models:/name/version, models:/name/latest or models:/name@alias -> (name, version) now."""
        client = self._client()
        name, _, ref = uri[len("models:/"):].partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if ref in ("", "latest"):
            version = max((v.version for v in client.search_model_versions(f"name='{name}'")), key=int, default=None)
            if version is None:
                raise FileNotFoundError(f"{uri}: the registered model {name!r} has no versions")
            return name, str(version)
        return name, ref

    def _download_uri(self, name: str, version: str) -> str:
        return self._client().get_model_version_download_uri(name, version)

    def load(self, model_id: str, version: str | None = None):
        from cxrfm.model.generate import Predictor  # transformers: only in the processes that load models

        # Decided here, in the replica: device, dtype, attention; refuses weights that cannot fit.
        return Predictor(self.resolve(model_id, version), device=self.device, dtype=self.dtype,
                         attention=self.attention, check_memory=True)


class LoadedModel:
    """What the multiplexer caches for a model id: the Predictor serving it now and, for a registry
    alias, its version. A promotion swaps `predictor` in place; requests already running keep theirs."""

    def __init__(self, predictor, version: str | None):
        self.predictor, self.version = predictor, version
        self.failed: set[str] = set()  # versions that did not load: not retried until the alias moves on
