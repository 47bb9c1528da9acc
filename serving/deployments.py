"""Model deployments and the tenant limiter.

`TextGenerator` serves the three text tasks (report, vqa, grounding) from ONE copy of the weights per
replica (a request carries its task); `ImageGenerator` serves text-to-CXR (the diffusion decoder). Each
replica loads its models through `cxrfm.model.load_export` in its own process: device ("auto": the GPU
Ray gave it, else CPU), dtype (bf16 on a GPU), attention backend (the export's model.attention where it can
run, or `attention` from the app args) are decided there and reported (`runtime()`, `/v1/models`). Before
loading, a replica checks that the weights fit the memory it was given and refuses in one line otherwise.
A deployment gets a GPU only by asking Ray for it: `ray_actor_options.num_gpus` (fractional allowed) in the
serve config; with app arg `device: cuda` that defaults to 1.

Each model deployment:
- loads models with `@serve.multiplexed` (LRU, at most `max_models_per_replica` per replica), keyed by
  the model id the ingress puts on the request (`handle.options(multiplexed_model_id=...)`); the id is a
  key of the application's model catalog, whose values are export directories or MLflow registry URIs.
  Request data never names a path: a replica only loads what the catalog lists.
- batches with `@serve.batch`; `max_batch_size` / `batch_wait_timeout_s` come from the deployment's
  `user_config` (so `serve deploy` can change them live). One batch may hold requests for several models
  or token budgets; they run as one `generate_batch` call per (model, budget) group, and those are the
  sizes recorded in `stats()["batch_sizes"]`.
- answers with a dict: the result, or {"error": {status, code, message}}; bad input inside a batch fails
  that request only, and no exception from a request brings the replica down.
Report generation can also stream: `stream()` is a batched generator yielding token deltas per step.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

from ray import serve

from .metrics import TaskMetrics
from .tenants import Limiter

# task -> the deployment that serves it: the text tasks share one deployment (one copy of the weights)
DEPLOYMENT_NAMES = {"report": "TextGenerator", "vqa": "TextGenerator", "grounding": "TextGenerator",
                    "generate": "ImageGenerator"}
MODEL_DEPLOYMENTS = ("TextGenerator", "ImageGenerator")
TEXT_FIELD = {"report": "indication", "vqa": "question", "grounding": "phrase", "generate": "prompt"}
DEFAULT_BATCH = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}


def error(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


class ModelCatalog:
    """Model id -> loaded Predictor. Sources: an export directory (a glob picks the newest match, e.g.
    `runs/tiny/*/export`), or an MLflow URI (`models:/name/version`, `models:/name@alias`, `runs:/id/path`)
    downloaded once into `cache_dir`."""

    def __init__(self, models: dict[str, str], device: str = "auto", tracking_uri: str | None = None,
                 cache_dir: str = "/tmp/cxrfm-model-cache", dtype: str = "auto", attention: str | None = None):
        self.models, self.device, self.tracking_uri, self.cache_dir = dict(models), device, tracking_uri, Path(cache_dir)
        self.dtype, self.attention = dtype, attention

    def resolve(self, model_id: str) -> Path:
        if model_id not in self.models:
            raise KeyError(f"model {model_id!r} is not in this application's catalog")
        source = self.models[model_id]
        if source.startswith(("models:/", "runs:/")):
            import mlflow.artifacts

            dest = self.cache_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", source)
            if not (dest / "config.json").is_file():
                uri = self._registry_source(source) if source.startswith("models:/") else source
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

    def _registry_source(self, uri: str) -> str:
        """models:/name/version, models:/name/latest or models:/name@alias -> the version's artifact URI.
        Resolved with a client bound to our store: MLflow's own models:/ download reads only the
        process-wide registry URI. tracking_uri None: MLFLOW_TRACKING_URI from the environment."""
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        name, _, ref = uri[len("models:/"):].partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        elif ref in ("", "latest"):
            version = max((v.version for v in client.search_model_versions(f"name='{name}'")), key=int, default=None)
            if version is None:
                raise FileNotFoundError(f"{uri}: the registered model {name!r} has no versions")
        else:
            version = ref
        return client.get_model_version_download_uri(name, version)

    def load(self, model_id: str):
        from cxrfm.model.generate import Predictor

        # Decided here, in the replica: device, dtype, attention; refuses weights that cannot fit.
        return Predictor(self.resolve(model_id), device=self.device, dtype=self.dtype, attention=self.attention,
                         check_memory=True)


class _StepStreamer:
    """transformers streamer: one `push(list of token ids)` per decoding step. The first `put` is the
    (empty, 2-D) prompt and is skipped; the end is signalled by the caller (also after a failure)."""

    def __init__(self, push):
        self.push = push

    def put(self, value) -> None:
        if value.dim() == 1:
            self.push(value.tolist())

    def end(self) -> None:
        pass


def stream_generate(predictor, requests: list[dict], max_new_tokens: int, push) -> None:
    """`Predictor.generate_batch` (greedy) with a per-step token callback. It builds the same left-padded
    prompt through the Predictor's own `_prompt` and `model.embed`; kept beside it here because
    `generate_batch` takes no streamer."""
    import numpy as np
    import torch
    from transformers.generation.streamers import BaseStreamer

    from cxrfm.text.tokenizer import EOS, PAD

    class Streamer(_StepStreamer, BaseStreamer):
        pass

    prompts = [predictor._prompt(r["task"], r["images"], r.get("text", "")) for r in requests]
    width, pad = max(len(p[0]) for p in prompts), predictor.vocab[PAD]
    dev = predictor.device
    ids = torch.tensor([[pad] * (width - len(p[0])) + p[0] for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p[0])) + [1] * len(p[0]) for p in prompts], device=dev)
    images = torch.as_tensor(np.stack([p[1] for p in prompts]), device=dev)
    present = torch.as_tensor(np.stack([p[2] for p in prompts]), device=dev)
    with torch.no_grad():
        embeds = predictor.model.embed(ids, images, present)
        predictor.model.language.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=predictor.vocab[EOS], pad_token_id=pad, use_cache=True, streamer=Streamer(push))


class _TaskBase:
    """Shared by the model deployments; `task_deployment` adds the multiplexed loader."""

    task = "text"  # the metrics label; each request names its own task (report, vqa, grounding)

    async def __init__(self, models: dict[str, str], default_model: str = "base", device: str = "auto",
                       mlflow_tracking_uri: str | None = None, model_cache_dir: str = "/tmp/cxrfm-model-cache",
                       preload: list[str] | None = None, batch: dict | None = None, dtype: str = "auto",
                       attention: str | None = None):
        self.catalog = ModelCatalog(models, device, mlflow_tracking_uri, model_cache_dir, dtype, attention)
        self.default_model = default_model
        self.runtimes: dict[str, dict] = {}  # model id -> what it runs on in this replica
        self.metrics = TaskMetrics(self.task)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self.loads: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.reconfigure(batch or {})
        # Load the default model before the replica reports ready, so the first request is not a cold one.
        for model_id in preload if preload is not None else [default_model]:
            await self.get_model(model_id)

    def reconfigure(self, user_config: dict) -> None:
        cfg = {**DEFAULT_BATCH, **(user_config or {})}
        for handler in (self._run_batch, self._stream_batch):
            handler.set_max_batch_size(int(cfg["max_batch_size"]))
            handler.set_batch_wait_timeout_s(float(cfg["batch_wait_timeout_s"]))

    async def _load(self, model_id: str):
        predictor = await asyncio.to_thread(self.catalog.load, model_id)
        self.runtimes[model_id] = predictor.runtime.as_dict()
        self.loads[model_id] += 1
        self.metrics.model_loaded(model_id)
        return predictor

    def stats(self) -> dict:
        """Batch sizes run and model loads on this replica (tests and the benchmark read them)."""
        return {"batch_sizes": list(self.batch_sizes), "loads": dict(self.loads), "served": dict(self.served)}

    def runtime(self) -> dict[str, dict]:
        """Per loaded model: device, dtype, attention backend (and why), fused kernels, in this replica."""
        return dict(self.runtimes)

    def reset_stats(self) -> None:
        self.batch_sizes.clear()

    async def ready(self) -> bool:
        await self.get_model(self.default_model)
        return True

    # ---- one request -> one answer, batched ---------------------------------------------------------
    async def __call__(self, item: dict) -> dict:
        model_id = serve.get_multiplexed_model_id() or self.default_model
        return await self._run_batch(model_id, item)

    def _request(self, item: dict) -> dict:
        from cxrfm.data.samples import report_prompt

        text, task = item.get("text", ""), item.get("task", "report")
        if task == "report":
            text = report_prompt(text, "prior" in item["images"])
        return {"task": task, "images": item["images"], "text": text}

    def _format(self, answer, model_id: str, task: str) -> dict:
        out = {"model": model_id, "tokens": answer.tokens}
        if task == "vqa":
            return {**out, "answer": answer.text}
        if task == "grounding":
            boxes = [dict(zip(("x1", "y1", "x2", "y2"), map(float, b))) for b in answer.boxes]
            return {**out, "text": answer.text, "boxes": boxes, "problems": list(answer.problems)}
        return {**out, "text": answer.text}

    async def _model_or_error(self, model_id: str):
        try:
            return await self.get_model(model_id), None
        except Exception as e:  # noqa: BLE001 - a missing export or registry must not crash the replica
            return None, error(503, "model_unavailable", f"model {model_id!r} cannot be loaded: {type(e).__name__}: {e}")

    async def _generate(self, predictor, requests: list[dict], max_new_tokens: int) -> list:
        from cxrfm.model.generate import GenerationOptions

        opts = GenerationOptions(max_new_tokens=max_new_tokens)
        try:
            return await asyncio.to_thread(predictor.generate_batch, requests, opts)
        except Exception:  # noqa: BLE001 - find the request at fault instead of failing all of them
            if len(requests) == 1:
                raise
            out = []
            for r in requests:
                try:
                    out.extend(await asyncio.to_thread(predictor.generate_batch, [r], opts))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    @serve.batch(max_batch_size=DEFAULT_BATCH["max_batch_size"], batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"])
    async def _run_batch(self, model_ids: list[str], items: list[dict]) -> list[dict]:
        results: list[dict | None] = [None] * len(items)
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, (model_id, item) in enumerate(zip(model_ids, items)):
            groups[(model_id, int(item.get("max_new_tokens", 64)))].append(i)
        for (model_id, budget), idx in groups.items():
            predictor, err = await self._model_or_error(model_id)
            if err:
                for i in idx:
                    results[i] = err
                continue
            self.batch_sizes.append(len(idx))
            self.metrics.batch_ran(len(idx))
            try:
                answers = await self._generate(predictor, [self._request(items[i]) for i in idx], budget)
            except Exception as e:  # noqa: BLE001
                answers = [e] * len(idx)
            for i, answer in zip(idx, answers):
                if isinstance(answer, ValueError):  # ImageError and prompt problems: the caller's input
                    results[i] = error(400, "bad_input", str(answer))
                elif isinstance(answer, Exception):
                    results[i] = error(500, "generation_failed", f"generation failed ({type(answer).__name__})")
                else:
                    results[i] = self._format(answer, model_id, items[i].get("task", "report"))
            self.served[model_id] += len(idx)
        return results

    # ---- streaming: token deltas per step, batched ------------------------------------------------
    async def stream(self, item: dict):
        model_id = serve.get_multiplexed_model_id() or self.default_model
        async for event in self._stream_batch(model_id, item):
            if event is not None:
                yield event

    @serve.batch(max_batch_size=DEFAULT_BATCH["max_batch_size"], batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"])
    async def _stream_batch(self, model_ids: list[str], items: list[dict]):
        """Yields one list per step, one slot per caller: an event dict, None (nothing new) or
        StopIteration (that caller's stream is over)."""
        from cxrfm.text.tokenizer import EOS

        n, finished = len(items), set()

        def frame(events: dict[int, object]) -> list:
            return [StopIteration if i in finished else events.get(i) for i in range(n)]

        groups: dict[str, list[int]] = defaultdict(list)
        for i, model_id in enumerate(model_ids):
            groups[model_id].append(i)
        for model_id, idx in groups.items():
            predictor, err = await self._model_or_error(model_id)
            if err:
                yield frame({i: err for i in idx})
                finished.update(idx)
                continue
            self.batch_sizes.append(len(idx))
            self.metrics.batch_ran(len(idx))
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            push = lambda x: loop.call_soon_threadsafe(queue.put_nowait, x)  # noqa: E731 - called from the thread
            budgets = [int(items[i].get("max_new_tokens", 64)) for i in idx]
            requests = [self._request(items[i]) for i in idx]

            def run() -> None:
                try:
                    stream_generate(predictor, requests, max(budgets), push)
                finally:
                    push(None)  # always wake the consumer, also when generation raised

            worker = asyncio.ensure_future(asyncio.to_thread(run))
            rows, sent, eos = [[] for _ in idx], [""] * len(idx), predictor.vocab[EOS]

            def done(j: int) -> dict:
                text = predictor.tokenizer.decode(rows[j], skip_special_tokens=False).strip()
                return {"done": True, "model": model_id, "text": text, "tokens": len(rows[j])}

            while (step := await queue.get()) is not None:
                events = {}
                for j, tok in enumerate(step):
                    i = idx[j]
                    if i in finished:
                        continue
                    if tok == eos or len(rows[j]) >= budgets[j]:
                        events[i] = done(j)
                        continue
                    rows[j].append(tok)
                    text = predictor.tokenizer.decode(rows[j], skip_special_tokens=False).lstrip()
                    if not text.endswith("\ufffd"):  # hold back a split multi-byte character
                        events[i], sent[j] = {"token": text[len(sent[j]):]}, text
                yield frame(events)
                finished.update(i for i, e in events.items() if "done" in e)
            try:
                await worker
                tail = {i: done(j) for j, i in enumerate(idx) if i not in finished}
            except Exception as e:  # noqa: BLE001
                bad = error(400, "bad_input", str(e)) if isinstance(e, ValueError) else \
                    error(500, "generation_failed", f"generation failed ({type(e).__name__})")
                tail = {i: bad for i in idx if i not in finished}
            if tail:
                yield frame(tail)
                finished.update(tail)
            self.served[model_id] += len(idx)


class _ImageGeneratorBase(_TaskBase):
    """Text -> CXR image through `Predictor.generate_image(text, seed, steps, guidance)`. That call
    samples one image at a time, so a batch here runs its requests one after another; batching still
    bounds how many wait and keeps the replica's queue shared with the other tasks' design."""

    task = "generate"

    def _request(self, item: dict) -> dict:
        return item

    async def _run_one(self, predictor, item: dict, model_id: str) -> dict:
        from PIL import Image

        if not hasattr(predictor, "generate_image") or getattr(predictor.model, "diffusion", None) is None:
            return error(501, "not_implemented", f"model {model_id!r} has no diffusion decoder; it cannot generate images")
        seed = item.get("seed")
        seed = int(seed) if seed is not None else int(time.time_ns() % 2**31)
        try:
            image = await asyncio.to_thread(predictor.generate_image, item["text"], seed, item["steps"],
                                            item["guidance_scale"])
        except ValueError as e:
            return error(400, "bad_input", str(e))
        except Exception as e:  # noqa: BLE001
            return error(500, "generation_failed", f"image generation failed ({type(e).__name__})")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return {"model": model_id, "seed": seed, "width": int(image.shape[1]), "height": int(image.shape[0]),
                "image_png_base64": base64.b64encode(buf.getvalue()).decode()}

    @serve.batch(max_batch_size=DEFAULT_BATCH["max_batch_size"], batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"])
    async def _run_batch(self, model_ids: list[str], items: list[dict]) -> list[dict]:
        results = []
        self.batch_sizes.append(len(items))
        self.metrics.batch_ran(len(items))
        for model_id, item in zip(model_ids, items):
            predictor, err = await self._model_or_error(model_id)
            results.append(err or await self._run_one(predictor, item, model_id))
            self.served[model_id] += 1
        return results


def task_deployment(task: str, max_models_per_replica: int = 3, gpu: bool = False):
    """The Serve deployment that serves `task` (TextGenerator for report/vqa/grounding, ImageGenerator for
    generate). Built per application because `@serve.multiplexed` takes its LRU size at decoration time and
    the size is application config. gpu: ask Ray for one GPU per replica (a serve config's
    ray_actor_options replaces it, e.g. num_gpus: 0.5)."""
    base = _ImageGeneratorBase if task == "generate" else _TaskBase

    class TaskDeployment(base):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, model_id: str):
            return await self._load(model_id)

    name = DEPLOYMENT_NAMES[task]
    TaskDeployment.task = base.task
    TaskDeployment.__name__ = TaskDeployment.__qualname__ = name
    # Defaults for a real node; serve config files override any of them per deployment.
    return serve.deployment(
        TaskDeployment, name=name, max_ongoing_requests=16, max_queued_requests=64, graceful_shutdown_timeout_s=30,
        autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4,
                            "upscale_delay_s": 10, "downscale_delay_s": 120},
        ray_actor_options={"num_cpus": 1, **({"num_gpus": 1} if gpu else {})}, user_config=dict(DEFAULT_BATCH),
    )


@serve.deployment(name="TenantLimiter", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class TenantLimiter:
    """Rate and concurrency limits for all ingress replicas together. Keep it at one replica: the
    buckets live here, and a second replica would double every tenant's allowance."""

    def __init__(self, lease_ttl_s: float = 600.0):
        self.limiter = Limiter(lease_ttl_s)

    def acquire(self, tenant: str, rate: float, burst: int, max_concurrency: int, lease: str | None = None) -> dict:
        d = self.limiter.acquire(tenant, rate, burst, max_concurrency, lease)
        return {"ok": d.ok, "reason": d.reason, "retry_after_s": d.retry_after_s, "lease": d.lease}

    def release(self, tenant: str, lease: str) -> None:
        self.limiter.release(tenant, lease)
