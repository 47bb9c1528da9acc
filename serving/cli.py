"""`cxrfm serve CONFIG`: run the serving application locally with `serve run` on the same YAML that
`serve deploy` and the Helm chart's RayService take; `cxrfm tenants ...`: manage tenants and API keys.

`add_parser` registers both `serve` and `tenants` (cxrfm/cli.py lists this module among its groups).

Before handing the file to `serve run`, relative paths in our application's args are made absolute
(Ray workers run in another working directory), a model glob is pinned to its newest match (so every
replica serves the same export), and missing pieces fail here with the command that makes them.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import signal
import tempfile
from pathlib import Path

import yaml

from cxrfm.config import ConfigError, load_config

from .proxy import CALLBACK, ENV
from .tenants import add_tenants_parser

IMPORT_PATH = "cxrfm.serving.app:build_app"
DEMO_EXPORT = "runs/serve-demo/export"
# Ray's single-machine mode (its default on macOS and Windows): the node's IP is 127.0.0.1, so the GCS, the
# raylet, the agents and the Prometheus metrics endpoint (which lists tenant names) listen on loopback only.
# On Linux Ray otherwise takes the host's routable IP and serves metrics on every interface without auth.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def bind_ray_to_loopback():
    """For a private Ray instance that this process is about to start (`ray.init(address="local")`):
    every port it opens listens on 127.0.0.1. Child processes inherit the setting through the environment.
    Returns a function that restores the previous setting (for a process that goes on to other clusters)."""
    import sys

    saved_env = os.environ.get(RAY_LOOPBACK_ENV)
    os.environ[RAY_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    saved_flag = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None:  # Ray already imported: it read the variable at import
        constants.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        if saved_env is None:
            os.environ.pop(RAY_LOOPBACK_ENV, None)
        else:
            os.environ[RAY_LOOPBACK_ENV] = saved_env
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = saved_flag

    return restore


def build_untrained_export(out: str | Path, overrides: list[str] | None = None) -> Path:
    """An untrained tiny export (tokenizer + weights + config) for smoke runs and tests: the serving
    path is exercised end to end; the answers are noise."""
    import torch

    # Here, not at the top: they load transformers, which `cxrfm --help` and `cxrfm serve` do not need.
    from cxrfm.model.build import build_model
    from cxrfm.text.tokenizer import train_tokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    sentences = ["the lungs are clear", "no pleural effusion or pneumothorax", "heart size is normal",
                 "small left pleural effusion", "right lower lobe opacity", "is there cardiomegaly", "yes", "no",
                 "findings: mild cardiomegaly. impression: no acute process", "indication: cough and fever"] * 20
    tok = train_tokenizer(sentences, vocab_size=300)
    cfg = load_config(None, overrides or [])
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), device="cpu")  # written to disk, loaded wherever it is served
    model.save_pretrained(out, full_config=cfg, tokenizer=tok)
    return out


def _is_uri(source: str) -> bool:
    return "://" in source or source.startswith(("models:/", "runs:/"))


def _local(source: str, base: Path) -> str:
    return source if _is_uri(source) or os.path.isabs(source) else str((base / source).resolve())


def resolve_config(config: dict, base: Path, models: list[str] = (), tenants: str | None = None,
                   host: str | None = None, port: int | None = None, demo_model: bool = False) -> dict:
    """The config with our app's paths made absolute and checked, and command-line overrides applied."""
    config = copy.deepcopy(config)
    ours = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if not ours:
        raise ConfigError(f"no application with import_path {IMPORT_PATH} in the config")
    http = config.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    for app in ours:
        args = app.setdefault("args", {})
        catalog = dict(args.get("models") or {})
        default = args.get("default_model", "base")
        model_dir = args.pop("model_dir", None)
        if model_dir:
            catalog.setdefault(default, model_dir)
        for item in models:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"--model {item!r}: expected ID=PATH (or ID=models:/name/version)")
            catalog[key] = value
        if demo_model:
            catalog[default] = str(build_untrained_export(base / DEMO_EXPORT))
        for key, source in catalog.items():
            source = _local(source, base)
            if not _is_uri(source):
                if any(c in source for c in "*?["):
                    matches = sorted(glob.glob(source), key=lambda p: os.lstat(p).st_mtime)  # the link's own time
                    if not matches:
                        raise ConfigError(f"model {key!r}: nothing matches {source}; train one with `cxrfm train`, "
                                          f"pass --model {key}=PATH, or try --demo-model (untrained)")
                    source = matches[-1]
                if not (Path(source) / "config.json").is_file():
                    raise ConfigError(f"model {key!r}: {source} is not a cxrfm export (no config.json)")
            catalog[key] = source
        args["models"] = catalog
        store = _local(tenants or args.get("tenants", "runs/serve/tenants.yaml"), base)
        if not Path(store).is_file():
            raise ConfigError(f"tenant store {store} does not exist; create a tenant and key with "
                              f"`cxrfm tenants add NAME --store {store}`")
        args["tenants"] = store
        if "model_cache_dir" in args:
            args["model_cache_dir"] = _local(args["model_cache_dir"], base)
    return config


def check_config(config: dict) -> None:
    """Serve's own schema check plus our args, before anything starts."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from .app import AppArgs  # Ray Serve and the model: loaded only when a config is checked

    try:
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            if app.get("import_path") == IMPORT_PATH:
                args = AppArgs.model_validate(app.get("args", {}))
                args.catalog()
                _check_gpus(app, args)
    except (ValidationError, ValueError) as e:
        raise ConfigError(f"invalid serve config: {e}") from None


def _check_gpus(app: dict, args) -> None:
    """device: cuda needs every model deployment to ask Ray for a GPU. A config's ray_actor_options replace
    the default (num_gpus: 1) as a whole, so one without num_gpus would start replicas that see no GPU."""
    from .deployments import DEPLOYMENT_NAMES  # Ray Serve (see check_config)

    if not args.device.startswith("cuda"):
        return
    served = {DEPLOYMENT_NAMES[t] for t in args.tasks}
    for dep in app.get("deployments") or []:
        opts = dep.get("ray_actor_options")
        if dep.get("name") in served and opts is not None and not opts.get("num_gpus"):
            raise ValueError(f"application {app.get('name')!r}: device is {args.device!r} but deployment "
                             f"{dep['name']!r} sets ray_actor_options without num_gpus, so its replicas get no GPU; "
                             "add num_gpus (e.g. 1, or 0.5 to share a GPU) or use device: auto")


def cmd_serve(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"serve config {path} not found (the example is serving/tiny.yaml)")
    config = resolve_config(yaml.safe_load(path.read_text()) or {}, Path.cwd(), args.model, args.tenants,
                            args.host, args.port, args.demo_model)
    check_config(config)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.print_config:
        print(text)
        return 0
    http = config.get("http_options", {})
    print(f"serving on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}  (OpenAPI at /docs)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="cxrfm-serve-", delete=False) as f:
        f.write(text)
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import cli as serve_cli

    try:
        # "local" starts a private Ray instance; without it Ray would attach to whatever cluster RAY_ADDRESS
        # or /tmp/ray/ray_current_cluster names. Ray starts here, not inside `serve run`, so that SIGTERM
        # (kill, docker stop, systemd) can be turned into the Ctrl-C that `serve run` answers by shutting
        # Serve down: Ray's own SIGTERM handler would abort the process instead.
        os.environ.setdefault(ENV, CALLBACK)  # Ray nodes started here inherit it: request ids are sanitised
        if args.address == "local":  # a private instance: nothing of it listens beyond this machine
            bind_ray_to_loopback()
        ray.init(address=args.address, namespace=SERVE_NAMESPACE)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        return serve_cli.main(["run", f.name], standalone_mode=False) or 0
    finally:
        os.unlink(f.name)


def _stop_on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one shutdown; a second SIGTERM must not cut it short
    raise KeyboardInterrupt


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the Ray Serve application locally (serve run on a Serve config YAML)")
    p.add_argument("config", help="Serve config YAML, e.g. serving/tiny.yaml (the file serve deploy takes)")
    p.add_argument("--model", action="append", default=[], metavar="ID=PATH",
                   help="add or replace a model catalog entry: export dir or models:/name/version (repeatable)")
    p.add_argument("--tenants", help="tenant store (.yaml or .db) instead of the config's")
    p.add_argument("--host", help="HTTP host (the config's http_options.host otherwise)")
    p.add_argument("--port", type=int, help="HTTP port")
    p.add_argument("--demo-model", action="store_true",
                   help=f"serve an untrained tiny model (built once in {DEMO_EXPORT}) as the default model")
    p.add_argument("--address", default="local",
                   help="Ray cluster: 'local' (default) starts a private one on this machine; 'auto' or HOST:PORT joins one")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_serve)
    add_tenants_parser(subparsers)
    return p
