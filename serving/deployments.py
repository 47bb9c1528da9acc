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
- schedules text generation with `user_config.scheduler`:
  - `continuous` (default): iteration-level batching (serving/continuous.py): one decode loop per loaded
    model; a request is prefilled and joins the running batch at the next token step, leaves the moment
    it ends (or its caller goes away); no batch window. At most `max_batch_size` sequences decode at once.
    Sequences per step are recorded in `stats()["step_sizes"]`.
  - `batch`: request-level `@serve.batch` (`max_batch_size`, `batch_wait_timeout_s`); a batch may hold
    requests for several models or token budgets, run as one `generate_batch` call per (model, budget)
    group, the sizes recorded in `stats()["batch_sizes"]`. Kept for comparison (`cxrfm bench serve`).
  All of it comes from the deployment's `user_config`, so `serve deploy` can change it live.
- answers with a dict: the result, or {"error": {status, code, message}}; bad input inside a batch fails
  that request only, and no exception from a request brings the replica down.
Report generation can also stream: `stream()` yields token deltas per step, from the same decode loop
(continuous) or a batched generator (batch).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import weakref
from collections import Counter, defaultdict, deque
from pathlib import Path

from ray import serve

from .catalog import LoadedModel, ModelCatalog
from .metrics import TaskMetrics
from .tenants import Limiter

# task -> the deployment that serves it: the text tasks share one deployment (one copy of the weights)
DEPLOYMENT_NAMES = {"report": "TextGenerator", "vqa": "TextGenerator", "grounding": "TextGenerator",
                    "generate": "ImageGenerator"}
MODEL_DEPLOYMENTS = ("TextGenerator", "ImageGenerator")
TEXT_FIELD = {"report": "indication", "vqa": "question", "grounding": "phrase", "generate": "prompt"}
logger = logging.getLogger("ray.serve")
DEFAULT_BATCH = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "scheduler": "continuous"}
SCHEDULERS = ("continuous", "batch")


def error(status: int, code: str, message: str) -> dict:
    return {"error": {"status": status, "code": code, "message": message}}


class _TaskBase:
    """Shared by the model deployments; `task_deployment` adds the multiplexed loader."""

    task = "text"  # the metrics label; each request names its own task (report, vqa, grounding)

    async def __init__(self, models: dict[str, str], default_model: str = "base", device: str = "auto",
                       mlflow_tracking_uri: str | None = None, model_cache_dir: str = "/tmp/cxrfm-model-cache",
                       preload: list[str] | None = None, batch: dict | None = None, dtype: str = "auto",
                       attention: str | None = None, registry_poll_s: float = 30.0):
        self.catalog = ModelCatalog(models, device, mlflow_tracking_uri, model_cache_dir, dtype, attention)
        self.registry_poll_s = registry_poll_s
        self.slots: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()  # the multiplexer's
        self.registry_errors: dict[str, str] = {}
        self.default_model = default_model
        self.runtimes: dict[str, dict] = {}  # model id -> what it runs on in this replica
        self.metrics = TaskMetrics(self.task)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self.step_sizes: deque[int] = deque(maxlen=10_000)  # continuous: sequences per decode step
        self.loads: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.reconfigure(batch or {})
        # Load the default model before the replica reports ready, so the first request is not a cold one.
        for model_id in preload if preload is not None else [default_model]:
            await self.get_model(model_id)
        if any(self.catalog.follows_alias(m) for m in models):
            self._follower = asyncio.get_running_loop().create_task(self._follow_aliases())

    async def _follow_aliases(self) -> None:
        """Every registry_poll_s: a loaded models:/NAME@ALIAS whose alias moved loads the new version and
        swaps it in; one that fails to load is logged and the previous version keeps serving."""
        while True:
            await asyncio.sleep(self.registry_poll_s)
            for model_id, slot in list(self.slots.items()):
                if not self.catalog.follows_alias(model_id):
                    continue
                version = slot.version
                try:
                    _, version = await asyncio.to_thread(self.catalog.registry_version, self.catalog.models[model_id])
                    if version == slot.version or version in slot.failed:
                        continue
                    predictor = await asyncio.to_thread(self.catalog.load, model_id, version)
                except Exception as e:  # noqa: BLE001 - registry down or a bad version: keep serving the old one
                    if version != slot.version:  # resolved, then failed to load
                        slot.failed.add(version)
                    self.registry_errors[model_id] = f"{type(e).__name__}: {e}"[:500]
                    logger.warning(f"model {model_id!r}: keeping version {slot.version}: {self.registry_errors[model_id]}")
                    continue
                slot.predictor, slot.version = predictor, version
                self.runtimes[model_id] = {**predictor.runtime.as_dict(), "source_version": version}
                self.loads[model_id] += 1
                self.metrics.model_loaded(model_id)
                self.registry_errors.pop(model_id, None)
                logger.info(f"model {model_id!r}: now serving version {version}")

    def reconfigure(self, user_config: dict) -> None:
        cfg = {**DEFAULT_BATCH, **(user_config or {})}
        unknown = set(cfg) - set(DEFAULT_BATCH)
        if unknown or cfg["scheduler"] not in SCHEDULERS:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)} or scheduler {cfg['scheduler']!r}; "
                             f"allowed keys {sorted(DEFAULT_BATCH)}, schedulers {list(SCHEDULERS)}")
        self.scheduler, self.max_batch_size = cfg["scheduler"], int(cfg["max_batch_size"])
        for handler in (self._run_batch, self._stream_batch):
            handler.set_max_batch_size(self.max_batch_size)
            handler.set_batch_wait_timeout_s(float(cfg["batch_wait_timeout_s"]))
        for loop in getattr(self, "_loops", {}).values():
            loop.max_batch_size = self.max_batch_size

    async def _load(self, model_id: str) -> LoadedModel:
        version = None
        if self.catalog.models.get(model_id, "").startswith("models:/"):
            _, version = await asyncio.to_thread(self.catalog.registry_version, self.catalog.models[model_id])
        predictor = await asyncio.to_thread(self.catalog.load, model_id, version)
        self.runtimes[model_id] = {**predictor.runtime.as_dict(), "source_version": version}
        self.loads[model_id] += 1
        self.metrics.model_loaded(model_id)
        slot = self.slots[model_id] = LoadedModel(predictor, version)
        return slot

    def stats(self) -> dict:
        """Batch sizes run and model loads on this replica (tests and the benchmark read them)."""
        return {"batch_sizes": list(self.batch_sizes), "step_sizes": list(self.step_sizes), "loads": dict(self.loads),
                "served": dict(self.served), "scheduler": self.scheduler, "registry_errors": dict(self.registry_errors)}

    def runtime(self) -> dict[str, dict]:
        """Per loaded model: device, dtype, attention backend (and why), fused kernels, in this replica."""
        return dict(self.runtimes)

    def reset_stats(self) -> None:
        self.batch_sizes.clear()
        self.step_sizes.clear()

    async def ready(self) -> bool:
        await self.get_model(self.default_model)
        return True

    # ---- one request -> one answer, batched ---------------------------------------------------------
    async def __call__(self, item: dict) -> dict:
        model_id = serve.get_multiplexed_model_id() or self.default_model
        if self.scheduler == "continuous" and self.task != "generate":
            return await self._continuous(model_id, item)
        return await self._run_batch(model_id, item)

    # ---- continuous batching: one decode loop per loaded model ------------------------------------------
    def _decode_loop(self, predictor):
        from .continuous import DecodeLoop

        self._loops = getattr(self, "_loops", {})
        # Keyed by the Predictor object: an evicted model's loop goes with it (its thread exits when idle).
        loop = self._loops.get(id(predictor))
        if loop is None or loop.p is not predictor:
            self._loops = {k: v for k, v in self._loops.items() if v.p is not predictor}
            loop = self._loops[id(predictor)] = DecodeLoop(predictor, self.max_batch_size, on_step=self._stepped)
        return loop

    def _stepped(self, size: int) -> None:  # called from the decode thread
        self.step_sizes.append(size)
        self.metrics.batch_ran(size)

    async def _continuous(self, model_id: str, item: dict, on_token=None) -> dict:
        predictor, err = await self._model_or_error(model_id)
        if err:
            return err
        try:
            answer = await self._decode_loop(predictor).generate(self._request(item), int(item.get("max_new_tokens", 64)),
                                                                 on_token)
        except ValueError as e:  # ImageError and prompt problems: the caller's input
            return error(400, "bad_input", str(e))
        except Exception as e:  # noqa: BLE001
            return error(500, "generation_failed", f"generation failed ({type(e).__name__})")
        self.served[model_id] += 1
        return self._format(answer, model_id, item.get("task", "report"))

    async def _stream_continuous(self, model_id: str, item: dict):
        predictor, err = await self._model_or_error(model_id)
        if err:
            yield err
            return
        tokens: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._continuous(model_id, item, tokens.put_nowait))
        task.add_done_callback(lambda _: tokens.put_nowait(None))  # after every token: same loop, FIFO
        rows, sent = [], ""
        try:
            while (tok := await tokens.get()) is not None:
                rows.append(tok)
                text = predictor.tokenizer.decode(rows, skip_special_tokens=False).lstrip()
                if not text.endswith("\ufffd"):  # hold back a split multi-byte character
                    yield {"token": text[len(sent):]}
                    sent = text
            result = task.result()
            yield result if "error" in result else {"done": True, "model": model_id, "text": result.get("text", ""),
                                                    "tokens": result["tokens"]}
        finally:
            task.cancel()  # the caller went away: the sequence leaves the batch at the next step

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
            return (await self.get_model(model_id)).predictor, None
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
        if self.scheduler == "continuous":
            async for event in self._stream_continuous(model_id, item):
                yield event
            return
        async for event in self._stream_batch(model_id, item):
            if event is not None:
                yield event

    @serve.batch(max_batch_size=DEFAULT_BATCH["max_batch_size"], batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"])
    async def _stream_batch(self, model_ids: list[str], items: list[dict]):
        """Yields one list per step, one slot per caller: an event dict, None (nothing new) or
        StopIteration (that caller's stream is over)."""
        # Imported here: the ingress imports this module too and needs no transformers.
        from cxrfm.model.generate import GenerationOptions
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
                    # greedy, one push(token ids of every row) per decoding step
                    predictor.generate_batch(requests, GenerationOptions(max_new_tokens=max(budgets)), on_step=push)
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
        logging_config={"enable_access_log": False},  # the ingress logs every request once, with its id and tenant
    )


# Two calls per API request (acquire, release): no Serve access-log line for them (the ingress logs the
# request once) and async methods, which run on the replica's event loop instead of a worker thread each.
@serve.deployment(name="TenantLimiter", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class TenantLimiter:
    """Rate and concurrency limits for all ingress replicas together. Keep it at one replica: the
    buckets live here, and a second replica would double every tenant's allowance."""

    def __init__(self, lease_ttl_s: float = 600.0):
        self.limiter = Limiter(lease_ttl_s)

    async def acquire(self, tenant: str, rate: float, burst: int, max_concurrency: int, lease: str | None = None) -> dict:
        d = self.limiter.acquire(tenant, rate, burst, max_concurrency, lease)
        return {"ok": d.ok, "reason": d.reason, "retry_after_s": d.retry_after_s, "lease": d.lease}

    async def release(self, tenant: str, lease: str) -> None:
        self.limiter.release(tenant, lease)
