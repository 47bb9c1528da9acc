"""The Serve config file, `cxrfm serve` / `cxrfm tenants` wiring, and MLflow registry models, without a server."""

import argparse
import os
import time
from pathlib import Path

import pytest
import yaml

from cxrfm.config import ConfigError
from cxrfm.serving.app import AppArgs, Ingress, build_app
from cxrfm.serving.cli import add_parser as add_serve_parser
from cxrfm.serving.cli import check_config, resolve_config
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


def _model_deployments(app) -> dict:
    """task -> the bound model deployment behind the Ingress of a built application."""
    return {task: bound._bound_deployment for task, bound in app._bound_deployment.init_args[1].items()}


def test_text_tasks_share_one_deployment_and_device_cuda_asks_ray_for_gpus():
    deps = _model_deployments(build_app({"tenants": "t.yaml", "model_dir": "/m", "device": "cuda"}))
    assert {t: d.name for t, d in deps.items()} == {"report": "TextGenerator", "vqa": "TextGenerator",
                                                    "grounding": "TextGenerator", "generate": "ImageGenerator"}
    assert deps["report"] is deps["vqa"] is deps["grounding"]  # one copy of the weights per replica
    for dep in deps.values():
        assert dep.ray_actor_options["num_gpus"] == 1 and dep.init_kwargs["device"] == "cuda"
    # a serve config's options (here fractional GPUs) replace the default
    shared = build_app({"tenants": "t.yaml", "model_dir": "/m", "device": "cuda", "dtype": "bfloat16",
                        "deployment_options": {"TextGenerator": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}}}})
    text = _model_deployments(shared)["report"]
    assert text.ray_actor_options["num_gpus"] == 0.5 and text.init_kwargs["dtype"] == "bfloat16"
    for device in ("auto", "cpu"):  # no GPU asked for: replicas decide with what they were given
        for dep in _model_deployments(build_app({"tenants": "t.yaml", "model_dir": "/m", "device": device})).values():
            assert "num_gpus" not in dep.ray_actor_options


def test_a_cuda_serve_config_whose_deployments_ask_for_no_gpu_is_refused():
    config = yaml.safe_load(TINY.read_text())
    (app,) = config["applications"]
    app["args"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="TextGenerator.*num_gpus"):
        check_config(config)
    for dep in app["deployments"]:
        if dep["name"] in ("TextGenerator", "ImageGenerator"):
            dep["ray_actor_options"]["num_gpus"] = 0.5
    check_config(config)
    app["args"]["device"] = "gpu"
    with pytest.raises(ConfigError, match="device"):
        check_config(config)
