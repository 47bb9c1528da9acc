"""The Serve config file, `cxrfm serve` / `cxrfm tenants` wiring, and MLflow registry models, without a server."""

import argparse
import os
import time
from pathlib import Path

import pytest
import yaml

from cxrfm.config import ConfigError
from cxrfm.serving.app import AppArgs, Ingress, build_app
from cxrfm.serving.cli import add_serve_parser, check_config, resolve_config
from cxrfm.serving.deployments import DEPLOYMENT_NAMES, ModelCatalog, TenantLimiter, task_deployment
from cxrfm.serving.tenants import Tenant, add_tenant

TINY = Path(__file__).resolve().parents[2] / "serving" / "tiny.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrfm")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_tiny_yaml_is_a_serve_config_whose_deployments_exist():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(TINY.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    args = AppArgs.model_validate(app["args"])
    built = {"Ingress", "TenantLimiter", *(DEPLOYMENT_NAMES[t] for t in args.tasks)}
    assert {d["name"] for d in app["deployments"]} == built
    assert Ingress.name == "Ingress" and TenantLimiter.name == "TenantLimiter"
    assert all(task_deployment(t).name == DEPLOYMENT_NAMES[t] for t in args.tasks)
    assert config["http_options"]["host"] == "127.0.0.1"
    for dep in app["deployments"]:  # every task deployment batches, autoscales and sheds load
        if dep["name"] in DEPLOYMENT_NAMES.values():
            assert {"user_config", "autoscaling_config", "max_ongoing_requests", "max_queued_requests"} <= set(dep)


def test_build_app_rejects_bad_args():
    with pytest.raises(ValueError, match="unknown task"):
        build_app({"tenants": "t.yaml", "model_dir": "/m", "tasks": ["report", "segment"]})
    with pytest.raises(ValueError, match="default_model"):
        build_app({"tenants": "t.yaml", "models": {"other": "/m"}})
    with pytest.raises(ValueError, match="unknown deployments"):
        build_app({"tenants": "t.yaml", "model_dir": "/m", "deployment_options": {"Nope": {}}})


def test_resolve_config_pins_paths_and_names_what_is_missing(tmp_path, tiny_exports):
    config = yaml.safe_load(TINY.read_text())
    with pytest.raises(ConfigError, match="cxrfm train"):
        resolve_config(config, tmp_path)  # no runs/tiny/*/export under tmp_path
    old, new = tmp_path / "runs/tiny/a/export", tmp_path / "runs/tiny/b/export"
    for d in (old, new):
        d.parent.mkdir(parents=True)
        d.symlink_to(tiny_exports["base"], target_is_directory=True)
    os.utime(new, (time.time() + 10, time.time() + 10), follow_symlinks=False)
    with pytest.raises(ConfigError, match="cxrfm tenants add"):
        resolve_config(config, tmp_path)
    add_tenant(tmp_path / "runs/serve/tenants.yaml", Tenant(name="demo"))
    out = resolve_config(config, tmp_path, models=[f"acme-ft={tiny_exports['ft']}"], port=9999)
    args = out["applications"][0]["args"]
    assert args["models"] == {"base": str(new), "acme-ft": str(tiny_exports["ft"])}  # newest export, pinned
    assert args["tenants"] == str(tmp_path / "runs/serve/tenants.yaml") and out["http_options"]["port"] == 9999
    check_config(out)
    with pytest.raises(ConfigError, match="ID=PATH"):
        resolve_config(config, tmp_path, models=["just-a-path"])


def test_serve_command_prints_the_resolved_config(tmp_path, tiny_exports, capsys, monkeypatch):
    store = tmp_path / "t.db"
    add_tenant(store, Tenant(name="demo"))
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["serve", str(TINY), "--tenants", str(store), "--model", f"base={tiny_exports['base']}",
                                 "--print-config"])
    assert args.func(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["applications"][0]["args"]["models"]["base"] == str(tiny_exports["base"])
    args = _parser().parse_args(["tenants", "add", "acme", "--store", str(store)])
    assert args.func(args) == 0 and capsys.readouterr().out.startswith("cxrfm_")


def test_models_from_an_mlflow_registry(tmp_path, tiny_exports):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    # A client bound to a private store: no process-wide tracking URI is changed for other tests.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(tiny_exports["base"]), artifact_path="export")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("cxr-tiny")
    client.create_model_version("cxr-tiny", f"{run.info.artifact_uri}/export", run_id=run.info.run_id)
    catalog = ModelCatalog({"tenant-ft": "models:/cxr-tiny/1"}, tracking_uri=uri, cache_dir=str(tmp_path / "cache"))
    predictor = catalog.load("tenant-ft")
    assert predictor.image_size == 64 and (tmp_path / "cache").is_dir()
    assert catalog.resolve("tenant-ft") == catalog.resolve("tenant-ft")  # downloaded once, then cached
    with pytest.raises(KeyError, match="catalog"):
        catalog.resolve("../../etc")  # request data never names a path
