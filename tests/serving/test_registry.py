"""Model lifecycle through a real MLflow server (started here on loopback, SQLite backend, its own artifact
store): register exports, attach evaluation metrics, `cxrfm models list|promote|rollback`, and a serving
catalog entry `models:/NAME@champion` that follows promotions in running replicas."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import requests

from cxrfm.registry import attach_eval, register_export

from .conftest import free_port, image_bytes

MANIFEST = {"source": "synthetic", "splits": {"train": {"studies": 40, "tasks": {"report": 40, "vqa": 80}},
                                              "test": {"studies": 8, "tasks": {"report": 8}}}}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _log_export(url: str, export, tmp_path, name: str = "cxr") -> tuple[str, str]:
    """A training run as the trainer leaves it: the export logged as artifacts, then registered."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("cxrfm-registry-test") or client.get_experiment(
        client.create_experiment("cxrfm-registry-test"))
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(export), "export")
    client.set_terminated(run.info.run_id)
    version = register_export(url, run.info.run_id, name, {"model": {"attention": "sdpa"}}, [MANIFEST])
    return run.info.run_id, version


def test_register_attach_eval_promote_rollback(mlflow_server, tiny_exports, tmp_path, capsys):
    from mlflow import MlflowClient

    from cxrfm.cli import main

    run1, v1 = _log_export(mlflow_server, tiny_exports["base"], tmp_path, "lifecycle")
    _, v2 = _log_export(mlflow_server, tiny_exports["ft"], tmp_path, "lifecycle")
    assert (v1, v2) == ("1", "2")
    tags = MlflowClient(mlflow_server).get_model_version("lifecycle", v1).tags
    assert json.loads(tags["cxrfm.data"])["train"] == {"studies": 40, "tasks": {"report": 40, "vqa": 80}}
    assert "attention: sdpa" in tags["cxrfm.config"]

    # cxrfm eval writes its metrics next to the training run: every version of that run gets them
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_exports["base"], run_dir / "export")
    (run_dir / "run.json").write_text(json.dumps({"tracking_uri": mlflow_server, "mlflow_run_id": run1}))
    assert attach_eval(run_dir / "export", {"vqa/accuracy": 0.75, "report/bleu4": 0.1}, "test") == [("lifecycle", "1")]

    uri = ["--tracking-uri", mlflow_server]
    assert main(["models", "promote", "lifecycle", "1", *uri]) == 0
    assert main(["models", "promote", "lifecycle", "2", "--alias", "champion", *uri]) == 0
    assert "was 1" in capsys.readouterr().out
    assert main(["models", "list", "lifecycle", *uri]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "aliases=-" in listing[0] and "eval.test.vqa/accuracy=0.75" in listing[0]
    assert "aliases=champion" in listing[1]
    assert main(["models", "rollback", "lifecycle", *uri]) == 0
    assert MlflowClient(mlflow_server).get_model_version_by_alias("lifecycle", "champion").version == "1"
    assert main(["models", "rollback", "lifecycle", *uri]) == 2  # nothing before version 1
    assert "nothing to roll back" in capsys.readouterr().err
    assert main(["models", "promote", "lifecycle", "9", *uri]) == 2  # no such version


def test_serving_follows_the_alias_and_keeps_a_version_that_loads(mlflow_server, server, tiny_exports, tmp_path):
    from mlflow import MlflowClient
    from ray import serve

    from cxrfm.registry import promote
    from cxrfm.serving.app import build_app

    _, v1 = _log_export(mlflow_server, tiny_exports["base"], tmp_path)  # sdpa
    _, v2 = _log_export(mlflow_server, tiny_exports["ft"], tmp_path)  # eager: /v1/models tells them apart
    broken = tmp_path / "broken"
    shutil.copytree(tiny_exports["base"], broken)
    (broken / "config.json").write_text("{not json")
    _, v3 = _log_export(mlflow_server, broken, tmp_path)
    promote(mlflow_server, "cxr", v1)

    small = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}}
    args = {"tenants": str(server.store), "models": {"base": "models:/cxr@champion"}, "tasks": ["vqa"],
            "mlflow_tracking_uri": mlflow_server, "model_cache_dir": str(tmp_path / "cache"), "registry_poll_s": 1,
            "deployment_options": {"Ingress": small, "TextGenerator": small}}
    serve.run(build_app(args), name="cxrfm-registry", route_prefix="/reg")
    url, headers = server.url + "/reg", server.headers("acme")
    b64 = __import__("base64").b64encode(image_bytes()).decode()

    def served() -> tuple[str, str]:
        rt = requests.get(url + "/v1/models", headers=headers, timeout=30).json()["runtime"]
        base = next(r for r in rt if r["model"] == "base")
        return base["source_version"], base["attention"]

    def ask() -> int:
        body = {"images": {"frontal": b64}, "question": "effusion?", "max_new_tokens": 1}
        return requests.post(url + "/v1/vqa", json=body, headers=headers, timeout=60).status_code

    try:
        assert served() == (v1, "sdpa") and ask() == 200
        promote(mlflow_server, "cxr", v2)
        t0, deadline = time.monotonic(), time.monotonic() + 60
        while served() != (v2, "eager"):  # no redeploy: the running replica picks it up
            assert time.monotonic() < deadline, f"still serving {served()} 60 s after the promotion"
            time.sleep(0.5)
        print(f"promotion served after {time.monotonic() - t0:.1f} s (registry_poll_s=1)")
        assert ask() == 200
        promote(mlflow_server, "cxr", v3)  # does not load
        handle = serve.get_deployment_handle("TextGenerator", "cxrfm-registry")
        deadline = time.monotonic() + 60
        while "base" not in handle.stats.remote().result(timeout_s=30)["registry_errors"]:
            assert time.monotonic() < deadline, "the broken version was never tried"
            time.sleep(0.5)
        assert served() == (v2, "eager") and ask() == 200  # the previous version keeps serving
        assert MlflowClient(mlflow_server).get_model_version_by_alias("cxr", "champion").version == v3
    finally:
        serve.delete("cxrfm-registry")
