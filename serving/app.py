"""The cxrfm Serve application: a FastAPI ingress (auth, tenants, limits, input checks) in front of one
deployment per task. `build_app(args)` is the import path a Serve config names
(`import_path: cxrfm.serving.app:build_app`), so `serve run`, `serve deploy` and a KubeRay RayService
all start the same thing from the same YAML (see serving/tiny.yaml for every argument).

A request goes: API key -> tenant (401) -> task deployed (501) and allowed (403) -> tenant limiter: rate
and concurrency (429 + Retry-After) -> body size (413) -> parse JSON or multipart (400/415) -> model
allowed for this tenant (403) -> decode images (400/413/415) -> the task deployment, routed to a replica
that holds the model (503 when its queue is full, 504 past the request timeout).
"""

# No `from __future__ import annotations` here: Serve rebuilds the route signatures of the ingress class
# and FastAPI then cannot resolve string annotations (`request: Request` turns into a query parameter).

import asyncio
import contextvars
import json
import math
import re
import secrets
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import api_models as m
from .deployments import DEFAULT_BATCH, DEPLOYMENT_NAMES, TEXT_FIELD, TenantLimiter, task_deployment
from .inputs import ROLES, InputError, decode_base64, decode_study
from .metrics import IngressMetrics, log_request
from .tenants import Authenticator, AuthThrottled, TenantError

# cxrfm_rejections_total{reason}: a small fixed set, from the error code first, else the status.
CODE_REASONS = {"forbidden_task": "forbidden_task", "model_not_allowed": "forbidden_model", "concurrency": "concurrency",
                "rate": "rate", "model_unavailable": "unavailable", "task_not_deployed": "not_deployed",
                "auth_throttled": "auth_throttled"}
REASONS = {499: "client_closed", 401: "auth", 413: "too_large", 415: "unsupported_type", 503: "overloaded", 504: "timeout"}


class AppArgs(BaseModel):
    """`args:` of the application in a Serve config file."""

    model_config = ConfigDict(extra="forbid")
    tenants: str = Field(description="tenant store: .yaml or SQLite .db (cxrfm tenants add ...)")
    models: dict[str, str] = Field(default_factory=dict,
                                   description="model id -> export dir (globs allowed) or models:/name/version")
    model_dir: str | None = Field(None, description="shorthand for models: {<default_model>: model_dir}")
    default_model: str = "base"
    tasks: list[str] = Field(default_factory=lambda: ["report", "vqa", "grounding", "generate"])
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where replicas run the model: auto (the GPU Ray gave the replica, else cpu), cpu, "
                                    "cuda (model deployments then ask Ray for one GPU unless the config sets num_gpus)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto: bf16 on a GPU, fp32 on cpu")
    attention: Literal["auto", "triton", "flash_attn", "xformers", "sdpa", "eager"] | None = Field(
        None, description="attention backend; null: each export's own model.attention where it can run")
    mlflow_tracking_uri: str | None = None
    registry_poll_s: float = Field(30.0, gt=0, description="how often replicas re-resolve models:/NAME@ALIAS entries; a "
                                   "promotion is served within this plus the new version's load time")
    model_cache_dir: str = "/tmp/cxrfm-model-cache"
    max_models_per_replica: int = Field(3, ge=1)
    preload: list[str] | None = Field(None, description="models each task replica loads at start (default: default_model)")
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_generate_steps: int = Field(200, ge=1, description="diffusion steps a /v1/generate request may ask for")
    request_timeout_s: float = Field(120.0, gt=0)
    auth_cache_ttl_s: float = Field(30.0, ge=0, description="how long a verified key skips scrypt; revocation "
                                    "and policy edits still apply to the next request (the store is re-read)")
    auth_fail_burst: int = Field(5, ge=1, description="wrong-secret checks per key id before 429 (no scrypt)")
    auth_fail_rate_per_s: float = Field(0.2, gt=0, description="refill of that per-key-id failure bucket")
    batch: dict = Field(default_factory=lambda: dict(DEFAULT_BATCH), description="initial user_config of task deployments")
    # For programmatic use (tests, cxrfm bench serve). A config file's `deployments:` section overrides these.
    deployment_options: dict[str, dict] = Field(default_factory=dict)

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        bad = set(tasks) - set(DEPLOYMENT_NAMES)
        if bad:
            raise ValueError(f"unknown task(s) {sorted(bad)}; allowed {list(DEPLOYMENT_NAMES)}")
        return tasks

    def catalog(self) -> dict[str, str]:
        models = dict(self.models)
        if self.model_dir:
            models.setdefault(self.default_model, self.model_dir)
        if self.default_model not in models:
            raise ValueError(f"default_model {self.default_model!r} is not in models {sorted(models)}; "
                             "set models or model_dir")
        return models


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after

    def response(self, request_id: str) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="cxrfm"'
        body = {"error": {"code": self.code, "message": self.message, "field": self.field}, "request_id": request_id}
        return JSONResponse(body, status_code=self.status, headers=headers)


def request_id_of(request: Request) -> str:
    # Serve's proxy puts an x-request-id on every request (the client's own, or a new one) and echoes it.
    rid = request.headers.get("x-request-id", "")
    return rid if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid) else "invalid-request-id"


async def read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "body_too_large", f"request body is {declared} bytes; this tenant's limit is {cap} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked uploads carry no length: count while reading
        size += len(chunk)
        if size > cap:
            raise ApiError(413, "body_too_large", f"request body is over this tenant's limit of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    # Field paths and messages only: pydantic's `input` would echo (possibly huge, private) payloads.
    parts, first = [], None
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        first = first or loc or None
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts), first


async def parse_request(task: str, request: Request, body: bytes) -> tuple[BaseModel, dict[str, bytes]]:
    """-> (validated request model, {role: image bytes})."""
    model_cls = m.REQUESTS[task]
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: dict[str, bytes] = {}
    if ctype == "application/json":
        try:
            data = json.loads(body)
        except RecursionError:
            raise ApiError(400, "bad_json", "the JSON body is nested too deeply; requests are flat objects") from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
    elif ctype == "multipart/form-data":
        data, raw = await _parse_form(task, request, body)
    else:
        raise ApiError(415, "unsupported_content_type", f"content type {ctype or '(none)'!r} is not accepted; "
                       "send application/json (images as base64) or multipart/form-data (images as files)")
    try:
        req = model_cls.model_validate(data)
    except RecursionError:  # nested deeper than pydantic walks, inside a field that does not allow it
        raise ApiError(400, "invalid_request", "the request is nested too deeply") from None
    except ValidationError as e:
        message, field = _validation_message(e)
        raise ApiError(400, "invalid_request", message, field) from None
    images = getattr(req, "images", None)
    for role in ROLES if images is not None else ():
        value = getattr(images, role)
        if value is not None:
            raw[role] = decode_base64(value, f"images.{role}")
    return req, raw


async def _parse_form(task: str, request: Request, body: bytes) -> tuple[dict, dict[str, bytes]]:
    """-> (form fields, {role: file bytes}); the files never pass through the validated fields."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive=replay).form(max_files=len(ROLES), max_fields=16)
    except Exception:  # noqa: BLE001 - starlette raises several types for malformed multipart
        raise ApiError(400, "bad_multipart", "the multipart body is malformed") from None
    data, files = {}, {}
    for key, value in form.multi_items():
        if key in data or key in files:
            raise ApiError(400, "invalid_request", f"field {key!r} is given twice", key)
        if task != "generate" and key in ROLES:
            # A part without a filename arrives as text; its bytes still go through the image checks.
            files[key] = await value.read() if hasattr(value, "read") else value.encode("utf-8", "surrogateescape")
        elif hasattr(value, "read"):
            raise ApiError(400, "invalid_request", f"file field {key!r} is not accepted; image fields are {list(ROLES)}",
                           key)
        else:
            data[key] = value
    await form.close()
    if task != "generate":
        data["images"] = {}
    return data, files


class ApiContext:
    """What is known about one request so far; finished once, for the metrics and the log line."""

    def __init__(self, request: Request, task: str, metrics: IngressMetrics):
        self.request_id, self.task, self.metrics = request_id_of(request), task, metrics
        self.start, self.tenant, self.model = time.perf_counter(), "-", None
        self.upload = self.images = self.tokens = None

    def finish(self, status: int, code: str | None = None, stream: bool = False) -> None:
        latency = time.perf_counter() - self.start
        self.metrics.finished(self.tenant, self.task, self.model or "-", status, latency)
        if status >= 400:
            reason = CODE_REASONS.get(code or "") or REASONS.get(status) or ("bad_input" if status < 500 else "internal")
            self.metrics.rejected(self.tenant, self.task, reason)
        log_request(request_id=self.request_id, tenant=self.tenant, task=self.task, model=self.model, status=status,
                    code=code, latency_ms=round(latency * 1000, 1), images=self.images, upload_bytes=self.upload,
                    tokens=self.tokens, stream=stream or None)


api = FastAPI(title="cxrfm serving API", version="1.0.0", description=m.API_DESCRIPTION,
              openapi_tags=[{"name": "tasks", "description": "model tasks (API key required)"},
                            {"name": "operations", "description": "health and readiness (no key)"}])
api.openapi = m.openapi_builder(api)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown routes and methods answer in the same error shape as everything else.
    return ApiError(exc.status_code, "http_error", str(exc.detail)).response(request_id_of(request))


@serve.deployment(name="Ingress", max_ongoing_requests=200, max_queued_requests=400, ray_actor_options={"num_cpus": 0.5},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64})
@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict, tasks: dict, limiter):
        self.args = AppArgs.model_validate(args)
        self.catalog = set(self.args.catalog())
        self.auth = Authenticator(self.args.tenants, self.args.auth_cache_ttl_s, fail_burst=self.args.auth_fail_burst,
                                  fail_rate_per_s=self.args.auth_fail_rate_per_s)
        self.tasks, self.limiter = tasks, limiter
        self._releases: set[asyncio.Task] = set()
        self.metrics = IngressMetrics()

    # ---- operations -------------------------------------------------------------------------------
    @api.get("/healthz", tags=["operations"], response_model=m.Health, summary="liveness: the ingress answers")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz", tags=["operations"], response_model=m.Health, responses=m.errors(503),
             summary="readiness: tenant store readable and every task deployment has its default model loaded")
    async def readyz(self, request: Request):
        try:
            await asyncio.to_thread(self.auth.store.tenants)
            handles = {DEPLOYMENT_NAMES[t]: h for t, h in self.tasks.items()}  # text tasks share one deployment
            await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in handles.values())), timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            err = ApiError(503, "not_ready", f"not ready: {type(e).__name__}", retry_after=5)
            return err.response(request_id_of(request))
        return {"status": "ready", "tasks": sorted(self.tasks)}

    # ---- API ----------------------------------------------------------------------------------------
    @api.get("/v1/models", tags=["tasks"], response_model=m.ModelsResponse, responses=m.errors(401),
             summary="the models and tasks this API key may use")
    async def models(self, request: Request):
        ctx = ApiContext(request, "models", self.metrics)
        try:
            tenant = await self._authenticate(request)
        except ApiError as e:
            ctx.finish(e.status, e.code)
            return e.response(ctx.request_id)
        ctx.tenant = tenant.name
        mine = [x for x in tenant.models if x in self.catalog]
        tasks = [t for t in tenant.tasks if t in self.tasks]
        ctx.finish(200)
        return {"models": mine, "default_model": tenant.default_model, "tasks": tasks,
                "runtime": await self._runtimes(mine, tasks)}

    async def _runtimes(self, models: list[str], tasks: list[str]) -> list[dict]:
        """What one replica of each deployment runs the caller's loaded models on (device, dtype, attention)."""
        out = []
        for name in dict.fromkeys(DEPLOYMENT_NAMES[t] for t in tasks):
            handle = self.tasks[next(t for t in tasks if DEPLOYMENT_NAMES[t] == name)]
            try:
                loaded = await asyncio.wait_for(handle.runtime.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the list of models must not fail because a replica is busy
                continue
            out += [{"deployment": name, "model": k, **v} for k, v in sorted(loaded.items()) if k in models]
        return out

    @api.post("/v1/report", tags=["tasks"], openapi_extra=m.body("report"), response_model=m.ReportResponse,
              responses=m.errors(400, 401, 403, 413, 415, 429, 501, 503, 504, stream=True),
              summary="findings and impression for a study (frontal, lateral, prior); can stream tokens (SSE)")
    async def report(self, request: Request):
        return await self._serve(request, "report")

    @api.post("/v1/vqa", tags=["tasks"], openapi_extra=m.body("vqa"), response_model=m.VQAResponse,
              responses=m.errors(400, 401, 403, 413, 415, 429, 501, 503, 504), summary="answer a question about a study")
    async def vqa(self, request: Request):
        return await self._serve(request, "vqa")

    @api.post("/v1/grounding", tags=["tasks"], openapi_extra=m.body("grounding"), response_model=m.GroundingResponse,
              responses=m.errors(400, 401, 403, 413, 415, 429, 501, 503, 504),
              summary="locate a finding: boxes in the pixel coordinates of the frontal (else lateral) image")
    async def grounding(self, request: Request):
        return await self._serve(request, "grounding")

    @api.post("/v1/generate", tags=["tasks"], openapi_extra=m.body("generate"), response_model=m.GenerateResponse,
              responses=m.errors(400, 401, 403, 413, 415, 429, 501, 503, 504),
              summary="generate a chest X-ray image from report text (text-to-image diffusion)")
    async def generate(self, request: Request):
        return await self._serve(request, "generate")

    # ---- the request path ------------------------------------------------------------------------
    async def _authenticate(self, request: Request):
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key")
        if not key:
            raise ApiError(401, "missing_api_key", "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        try:
            tenant = await asyncio.to_thread(self.auth.authenticate, key)
        except AuthThrottled as e:
            raise ApiError(429, "auth_throttled", f"{e}; check the API key", retry_after=e.retry_after_s) from None
        except TenantError as e:
            raise ApiError(503, "tenant_store_unavailable", str(e), retry_after=5) from None
        if tenant is None:
            raise ApiError(401, "invalid_api_key", "the API key is not valid (unknown, revoked or its tenant disabled)")
        return tenant

    async def _acquire(self, tenant) -> str:
        # The lease id is ours: if this request is cancelled (client gone) while the limiter answers, the
        # slot it may have granted is still released by id (the limiter tombstones an early release).
        lease = secrets.token_hex(8)
        try:
            d = await self.limiter.acquire.remote(tenant.name, tenant.rate_per_s, tenant.burst, tenant.max_concurrency,
                                                  lease)
        except asyncio.CancelledError:
            self._release(tenant.name, lease)
            raise
        except Exception as e:  # noqa: BLE001 - without the limiter, limits cannot be kept: refuse
            self._release(tenant.name, lease)
            raise ApiError(503, "limiter_unavailable", f"rate limiter unavailable ({type(e).__name__})",
                           retry_after=1) from None
        if not d["ok"]:
            what = (f"{tenant.max_concurrency} requests in flight is this tenant's limit" if d["reason"] == "concurrency"
                    else f"over this tenant's rate of {tenant.rate_per_s}/s (burst {tenant.burst})")
            raise ApiError(429, d["reason"], f"too many requests: {what}", retry_after=d["retry_after_s"])
        return d["lease"]

    def _release(self, tenant: str, lease: str) -> None:
        """Give a concurrency slot back, also when the request that held it is being cancelled.

        Serve cancels every call a request made when the request itself is cancelled (the client went
        away), and a release started from it would go with it. So the release runs as its own task in an
        empty context (no parent request), is kept referenced until done, and retries a failed call;
        leases still expire on their own should all of that fail."""
        task = asyncio.get_running_loop().create_task(self._release_now(tenant, lease), context=contextvars.Context())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_now(self, tenant: str, lease: str) -> None:
        for attempt in range(5):
            try:
                await self.limiter.release.remote(tenant, lease)
                return
            except Exception:  # noqa: BLE001 - the limiter restarting: try again shortly
                await asyncio.sleep(0.2 * 2**attempt)

    def _choose_model(self, tenant, requested: str | None) -> str:
        model_id = requested or tenant.default_model
        # One answer for "someone else's model" and "no such model": nothing about other tenants leaks.
        if model_id not in tenant.models or model_id not in self.catalog:
            raise ApiError(403, "model_not_allowed", f"model {model_id!r} is not available to this API key "
                           "(GET /v1/models lists yours)", "model")
        return model_id

    async def _serve(self, request: Request, task: str):
        ctx, lease, tenant = ApiContext(request, task, self.metrics), None, None
        try:
            tenant = await self._authenticate(request)
            ctx.tenant = tenant.name
            if task not in self.tasks:
                raise ApiError(501, "task_not_deployed", f"this server does not run the {task} task")
            if task not in tenant.tasks:
                raise ApiError(403, "forbidden_task", f"this API key may not use the {task} task")
            lease = await self._acquire(tenant)
            body = await read_body(request, int(tenant.max_upload_bytes * 4 / 3) + 65536)  # base64 + fields
            ctx.upload = len(body)
            req, raw = await parse_request(task, request, body)
            ctx.model = self._choose_model(tenant, req.model)
            item = {"task": task, "text": getattr(req, TEXT_FIELD[task]),
                    "max_new_tokens": getattr(req, "max_new_tokens", None)}
            if task == "generate":
                if req.steps > self.args.max_generate_steps:  # the cost of a sample grows with its steps
                    raise ApiError(400, "invalid_request", f"steps: at most {self.args.max_generate_steps} on this server",
                                   "steps")
                item.update(seed=req.seed, steps=req.steps, guidance_scale=req.guidance_scale)
            else:
                # Decoding is CPU work; a thread keeps the ingress answering others meanwhile.
                item["images"] = await asyncio.to_thread(decode_study, raw, tenant.max_upload_bytes,
                                                         self.args.max_image_pixels)
                ctx.images = ",".join(f"{r}:{a.shape[1]}x{a.shape[0]}" for r, a in item["images"].items())
            handle = self.tasks[task].options(multiplexed_model_id=ctx.model)
            if getattr(req, "stream", False):
                response = await self._stream(handle, item, ctx, tenant.name, lease)
                lease = None  # the stream releases it when it ends
                return response
            result = await self._call(handle.remote(item))
            ctx.tokens = result.get("tokens")
            ctx.finish(200)
            return JSONResponse({**result, "request_id": ctx.request_id})
        except InputError as e:
            err = ApiError(e.status, e.code, e.message, e.field)
        except ApiError as e:
            err = e
        except asyncio.CancelledError:  # the client went away: the slot is released below all the same
            ctx.finish(499, "client_closed")
            raise
        except Exception as e:  # noqa: BLE001 - the ingress answers, whatever happened behind it
            err = ApiError(500, "internal_error", f"internal error ({type(e).__name__}); quote the request id")
        finally:
            if lease:
                self._release(tenant.name, lease)
        ctx.finish(err.status, err.code)
        return err.response(ctx.request_id)

    async def _call(self, response) -> dict:
        try:
            result = await asyncio.wait_for(response, timeout=self.args.request_timeout_s)
        except BackPressureError:
            raise ApiError(503, "overloaded", "the model deployment is at capacity; retry shortly", retry_after=1) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "timeout", f"no answer within {self.args.request_timeout_s} s") from None
        if "error" in result:
            e = result["error"]
            raise ApiError(e["status"], e["code"], e["message"], retry_after=1 if e["status"] == 503 else None)
        return result

    async def _stream(self, handle, item: dict, ctx: ApiContext, tenant: str, lease: str) -> StreamingResponse:
        gen = handle.options(stream=True).stream.remote(item)
        # The first event decides the HTTP status: overload and bad input still get a real 503/400
        # (on an exception here the caller still holds and releases the lease).
        first = await self._call(gen.__anext__())

        async def events():
            status, code, event = 200, None, first
            try:
                while True:
                    if "error" in event:
                        status, code = event["error"]["status"], event["error"]["code"]
                        yield f"event: error\ndata: {json.dumps({**event['error'], 'request_id': ctx.request_id})}\n\n"
                        return
                    if event.get("done"):
                        ctx.tokens = event["tokens"]
                        yield f"event: done\ndata: {json.dumps({**event, 'request_id': ctx.request_id})}\n\n"
                        return
                    yield f"data: {json.dumps(event)}\n\n"
                    event = await gen.__anext__()
            except StopAsyncIteration:
                return
            except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream: stop generating
                status, code = 499, "client_closed"
                gen.cancel()
                raise
            finally:
                self._release(tenant, lease)
                ctx.finish(status, code, stream=True)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(args: dict):
    """Serve application builder: `import_path: cxrfm.serving.app:build_app` with `args:` as AppArgs."""
    a = AppArgs.model_validate(args)
    catalog = a.catalog()
    common = {"models": catalog, "default_model": a.default_model, "device": a.device, "dtype": a.dtype,
              "attention": a.attention, "mlflow_tracking_uri": a.mlflow_tracking_uri,
              "model_cache_dir": a.model_cache_dir, "preload": a.preload, "batch": a.batch,
              "registry_poll_s": a.registry_poll_s}
    unknown = set(a.deployment_options) - {"Ingress", "TenantLimiter", *(DEPLOYMENT_NAMES[t] for t in a.tasks)}
    if unknown:
        raise ValueError(f"deployment_options for unknown deployments {sorted(unknown)}")
    tasks, bound = {}, {}
    for task in a.tasks:
        name = DEPLOYMENT_NAMES[task]
        if name not in bound:  # report, vqa and grounding: one deployment, one copy of the weights per replica
            dep = task_deployment(task, a.max_models_per_replica, gpu=a.device.startswith("cuda"))
            opts = a.deployment_options.get(name, {})
            bound[name] = (dep.options(**opts) if opts else dep).bind(**common)
        tasks[task] = bound[name]
    limiter = TenantLimiter.options(**a.deployment_options.get("TenantLimiter", {})).bind()
    return Ingress.options(**a.deployment_options.get("Ingress", {})).bind(a.model_dump(), tasks, limiter)
