"""One real Serve application on loopback for the serving tests that need a server.

Package-scoped: Ray, Serve and the task replicas start once (about a minute on 2 busy cores) for every
module in tests/serving that asks for `server`, and stop before other test packages run, so nothing
here is left for them. Ray is a private local instance (`address="local"`), never a running cluster.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from cxrfm.serving.tenants import Tenant, add_tenant

APP = "cxrfm-test"
# The diffusion decoder's entry point arrives separately; deploy the generate task only once it exists.
try:
    from cxrfm.model.generate import Predictor

    HAS_GENERATE = hasattr(Predictor, "generate_image")
except ImportError:  # pragma: no cover
    HAS_GENERATE = False

TENANTS = [
    # acme: everything, three models of its own catalog (LRU tests), small uploads (413 tests)
    Tenant(name="acme", tasks=["report", "vqa", "grounding", "generate"], models=["base", "acme-ft", "acme-v2"],
           rate_per_s=200, burst=200, max_concurrency=16, max_upload_bytes=256 * 1024),
    Tenant(name="beta", tasks=["report", "vqa"], models=["base", "beta-ft"], default_model="beta-ft",
           rate_per_s=200, burst=200, max_concurrency=8),
    Tenant(name="slow", tasks=["report"], models=["base"], rate_per_s=0.5, burst=2),
    Tenant(name="solo", tasks=["report"], models=["base"], rate_per_s=200, burst=200, max_concurrency=1),
    Tenant(name="fuzz", tasks=["report", "vqa", "grounding", "generate"], models=["base"], rate_per_s=1000,
           burst=1000, max_concurrency=64),
]


# ---- sample files ---------------------------------------------------------------------------------
def image_bytes(fmt: str = "PNG", size: int = 96, seed: int = 0, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size), dtype=np.uint8)
    if mode == "I;16":
        arr = arr.astype(np.uint16) * 16  # 12-bit values in a 16-bit PNG
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def dicom_bytes(arr: np.ndarray, photometric: str = "MONOCHROME2", center: float | None = None,
                width: float | None = None, pixels: bool = True) -> bytes:
    """A DX image written by pydicom itself: 12 bits stored in 16, optional stored window."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, (ds.Rows, ds.Columns) = "DX", arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if pixels:
        ds.PixelData = arr.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ramp(size: int = 64) -> np.ndarray:
    """Columns rising from 0 to 4095 (12 bits)."""
    return np.tile(np.linspace(0, 4095, size), (size, 1)).astype(np.uint16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    store: Path
    metrics_port: int
    revoked_key: str
    session_dir: str
    extra: dict = field(default_factory=dict)

    def headers(self, tenant: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def post(self, path: str, tenant: str | None = None, headers: dict | None = None, **kw) -> requests.Response:
        h = {**(self.headers(tenant) if tenant else {}), **(headers or {})}
        return requests.post(self.url + path, headers=h, timeout=120, **kw)

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, APP)

    def stats(self, deployment: str) -> dict:
        return self.handle(deployment).stats.remote().result(timeout_s=60)


@pytest.fixture(scope="package")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    from cxrfm.serving.cli import build_untrained_export

    root = tmp_path_factory.mktemp("exports")
    base = build_untrained_export(root / "base")
    ft = root / "ft"
    shutil.copytree(base, ft)  # a tenant's "fine-tuned" checkpoint: same shapes, its own catalog entry
    # ...trained with another attention backend: replicas must run what each export's config names
    meta = json.loads((ft / "config.json").read_text())
    meta["config"]["model"]["attention"] = "eager"
    (ft / "config.json").write_text(json.dumps(meta))
    return {"base": base, "ft": ft}


def _ray_init(metrics_port: int):
    """-> a function that undoes the loopback setting (other test packages start their own clusters)."""
    import ray

    # On an overloaded machine the raylet can give up waiting for its Python agents to write their ports
    # (RayConfig agent_register_timeout_ms); allow them longer, and retry the whole start once or twice.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    from cxrfm.serving.cli import bind_ray_to_loopback
    from cxrfm.serving.proxy import CALLBACK, ENV

    os.environ[ENV] = CALLBACK  # the proxy replaces client request ids that could forge log lines
    restore = bind_ray_to_loopback()  # as `cxrfm serve` does for its private instance
    attempts = 3
    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
                     log_to_driver=False)
            return restore
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                restore()
                raise
            time.sleep(5)


@pytest.fixture(scope="package")
def server(tiny_exports, tmp_path_factory):
    import ray
    from ray import serve

    from cxrfm.serving.app import build_app
    from cxrfm.serving.tenants import issue_key, revoke_key, split_key

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process; the serving tests need their own local instance")
    store = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    keys = {t.name: add_tenant(store, t) for t in TENANTS}
    revoked = issue_key(store, "acme")
    revoke_key(store, split_key(revoked)[0])

    port, metrics_port = free_port(), free_port()
    saved_address = os.environ.get("RAY_ADDRESS")
    restore_ray_ip = _ray_init(metrics_port)
    small = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.2}}
    tasks = ["report", "vqa", "grounding"] + (["generate"] if HAS_GENERATE else [])
    options = {name: dict(small) for name in ["Ingress", "TextGenerator", "ImageGenerator"]}
    # report, vqa and grounding share TextGenerator (one copy of the weights). A long enough batch window that
    # concurrent test requests reliably share a batch; it sheds load past 8 running + 2 waiting (503 at once).
    options["TextGenerator"].update(max_ongoing_requests=8, max_queued_requests=2,
                                    user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.3})
    if not HAS_GENERATE:
        options.pop("ImageGenerator")
    args = {
        "tenants": str(store),
        "models": {"base": str(tiny_exports["base"]), "acme-ft": str(tiny_exports["ft"]),
                   "acme-v2": str(tiny_exports["ft"]), "beta-ft": str(tiny_exports["ft"])},
        "tasks": tasks, "max_models_per_replica": 2, "max_image_pixels": 4_000_000, "max_generate_steps": 4,
        "auth_cache_ttl_s": 2,
        "deployment_options": options,
    }
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while requests.get(url + "/readyz", timeout=30).status_code != 200:
            assert time.time() < deadline, "the application did not become ready"
            time.sleep(1)
        session = ray._private.worker._global_node.get_session_dir_path()
        yield Server(url, keys, store, metrics_port, revoked, session)
    finally:
        serve.shutdown()
        ray.shutdown()
        restore_ray_ip()
        # ray.init exports the address of the instance it started; later tests must not join it.
        if saved_address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved_address


def jpeg_dicom_bytes(jpeg_side: int, rows: int, cols: int) -> bytes:
    """A baseline-JPEG DICOM whose header claims rows x cols while the embedded JPEG is jpeg_side square
    (uniform grey: a few kB whatever its size, like a real decompression bomb)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    buf = io.BytesIO()
    Image.new("L", (jpeg_side, jpeg_side), 128).save(buf, format="JPEG")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
