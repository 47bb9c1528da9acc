"""Request and response schemas of the REST API, and the OpenAPI document built from them.

Each task endpoint takes the same fields as JSON (images as base64 strings) or as multipart/form-data
(images as file parts). The ingress reads the body itself (to cap its size before parsing), so the
request bodies are declared here for OpenAPI by hand: both content types, every field described.
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import models_json_schema

API_DESCRIPTION = """Multitask chest X-ray model behind per-tenant API keys.

Authenticate with `Authorization: Bearer <key>` (or `X-API-Key: <key>`). Images: PNG, JPEG or DICOM
(the stored window is applied; MONOCHROME1 is inverted). Every error is JSON:
`{"error": {"code", "message", "field"}, "request_id"}`; the `X-Request-ID` response header echoes the
request's own (or a new) id. 429 and 503 carry `Retry-After` (seconds)."""

IMAGE_DOC = {
    "frontal": "frontal (PA/AP) view",
    "lateral": "lateral view",
    "prior": "frontal view of the prior study, for comparison",
}
MODEL_DOC = "model id from this API key's allowed models (GET /v1/models); default: the tenant's default model"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudyImages(_Strict):
    """Base64 of a PNG, JPEG or DICOM file per view (data: URLs accepted). A frontal or a lateral view
    is required."""

    frontal: str | None = Field(None, description=IMAGE_DOC["frontal"] + ", base64")
    lateral: str | None = Field(None, description=IMAGE_DOC["lateral"] + ", base64")
    prior: str | None = Field(None, description=IMAGE_DOC["prior"] + ", base64")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


class ReportRequest(_Strict):
    images: StudyImages
    indication: str = Field("", max_length=2000, description="clinical indication (may be empty)")
    model: str | None = Field(None, max_length=128, description=MODEL_DOC)
    max_new_tokens: int = Field(128, ge=1, le=512, description="upper bound on generated tokens")
    stream: bool = Field(False, description="true: answer as server-sent events, one `data:` per token "
                                            "delta, then `event: done` with the full text")


class VQARequest(_Strict):
    images: StudyImages
    question: str = Field(min_length=1, max_length=1000, description="question about the study")
    model: str | None = Field(None, max_length=128, description=MODEL_DOC)
    max_new_tokens: int = Field(32, ge=1, le=256, description="upper bound on generated tokens")

    @field_validator("question")
    @classmethod
    def check_question(cls, value: str) -> str:
        return _not_blank(value)


class GroundingRequest(_Strict):
    images: StudyImages
    phrase: str = Field(min_length=1, max_length=500, description="finding to locate, e.g. 'left pleural effusion'")
    model: str | None = Field(None, max_length=128, description=MODEL_DOC)
    max_new_tokens: int = Field(64, ge=1, le=256, description="upper bound on generated tokens")

    @field_validator("phrase")
    @classmethod
    def check_phrase(cls, value: str) -> str:
        return _not_blank(value)


class GenerateRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=2000, description="report text describing the image to generate")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="sampling seed; default: random (returned)")
    steps: int = Field(50, ge=1, le=200, description="diffusion sampling steps")
    guidance_scale: float = Field(4.0, ge=0.0, le=30.0, description="classifier-free guidance scale")
    model: str | None = Field(None, max_length=128, description=MODEL_DOC)

    @field_validator("prompt")
    @classmethod
    def check_prompt(cls, value: str) -> str:
        return _not_blank(value)


REQUESTS = {"report": ReportRequest, "vqa": VQARequest, "grounding": GroundingRequest, "generate": GenerateRequest}


def _form_schema(task: str) -> dict:
    """The multipart variant: the JSON fields as form fields, images as binary file parts."""
    schema = REQUESTS[task].model_json_schema()
    props = {k: v for k, v in schema["properties"].items() if k != "images"}
    if task != "generate":
        props.update({role: {"type": "string", "format": "binary", "description": doc + ": a PNG, JPEG or DICOM file"}
                      for role, doc in IMAGE_DOC.items()})
    return {"type": "object", "properties": props, "required": [r for r in schema.get("required", []) if r != "images"],
            "additionalProperties": False}


def body(task: str) -> dict:
    name = REQUESTS[task].__name__
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
        "multipart/form-data": {"schema": _form_schema(task)},
    }}}


class Box(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


class ReportResponse(BaseModel):
    request_id: str
    model: str = Field(description="model that answered")
    text: str = Field(description="findings and impression")
    tokens: int = Field(description="generated tokens")


class VQAResponse(BaseModel):
    request_id: str
    model: str
    answer: str
    tokens: int


class GroundingResponse(BaseModel):
    request_id: str
    model: str
    text: str = Field(description="raw answer with location tokens")
    boxes: list[Box] = Field(description="boxes in pixels of the frontal (else lateral) image as sent")
    problems: list[str] = Field(description="malformed location tokens, reported rather than guessed")
    tokens: int


class GenerateResponse(BaseModel):
    request_id: str
    model: str
    seed: int
    width: int
    height: int
    image_png_base64: str = Field(description="the generated image, PNG, base64")


class ModelRuntime(BaseModel):
    deployment: str = Field(description="TextGenerator (report, vqa, grounding) or ImageGenerator (generate)")
    model: str
    device: str = Field(description="where the replica that answered runs it, e.g. cuda:0 or cpu")
    dtype: str
    attention: str = Field(description="the attention backend it runs: triton, flash_attn, xformers, sdpa or eager")
    attn_implementation: str = Field(description="the name transformers runs it under, e.g. cxrfm_triton")
    attention_reason: str
    fused_rmsnorm: bool
    fused_cross_entropy: bool
    source_version: str | None = Field(None, description="registry version being served (models:/ catalog entries)")


class ModelsResponse(BaseModel):
    models: list[str]
    default_model: str
    tasks: list[str]
    runtime: list[ModelRuntime] = Field(default_factory=list,
                                        description="per deployment and loaded model of yours: what one replica runs it on")


class Health(BaseModel):
    status: str
    tasks: list[str] | None = None


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_api_key, corrupt_image, rate")
    message: str = Field(description="what was wrong and what to do")
    field: str | None = Field(None, description="the request field at fault, if one is")


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str


ERROR_DOC = {400: "bad input: not an image, truncated file, DICOM without pixel data, wrong or missing fields",
             401: "no API key, or not a valid one", 403: "task or model not allowed for this API key",
             413: "body, images or pixel count over the limit", 415: "content type or image format not supported",
             429: "tenant rate or concurrency limit reached; see Retry-After",
             501: "task not deployed on this server", 503: "at capacity or not ready; see Retry-After",
             504: "no answer within the request timeout"}


def errors(*statuses: int, stream: bool = False) -> dict:
    out = {s: {"model": ErrorResponse, "description": ERROR_DOC[s]} for s in statuses}
    if stream:
        out[200] = {"content": {"text/event-stream": {"schema": {"type": "string"}, "description":
                    "with stream=true: `data: {\"token\": ...}` events, then `event: done` (or `event: error`)"}}}
    return out


def openapi_builder(app):
    """FastAPI's schema plus the request-body models and the two API-key schemes."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             tags=app.openapi_tags)
        _, defs = models_json_schema([(cls, "validation") for cls in REQUESTS.values()],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs.get("$defs", {}))
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                         "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, ops in schema["paths"].items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}, {"apiKey": []}]
        app.openapi_schema = schema
        return schema

    return openapi
