"""Shard directories on local disk or in object storage (s3://, gs://, az://, ... any fsspec URI).

Credentials and endpoints come from the standard environment of each client library, never from a job
spec: for S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile, or an instance role) and
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for an S3-compatible store such as MinIO. On a Ray cluster they must
be set on every node (a Kubernetes Secret in the pods' environment), because Ray Data reads the shards in
tasks on all nodes.

fsspec is the client here (s3fs for S3): it covers every store Ray Data can read and lets a shard be
opened, listed, hashed and uploaded the same way whatever the scheme. One exception: whole-object reads
from s3:// (every shard training reads) go through pyarrow's C++ S3 client, which a new process sets up in
~50 ms of CPU where s3fs/botocore takes ~430 ms; Ray Data runs its read tasks in short-lived worker
processes, so on a small machine that set-up was most of the CPU spent reading a shard.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

TOKENIZER_CACHE_ENV = "CXRFM_CACHE"  # where remote tokenizers are copied (default ~/.cache/cxrfm)


class StoreError(RuntimeError):
    """A store cannot be reached or read with the credentials at hand; one line that says what to set."""


def is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (Ray workers do not share the driver's cwd); a URI as it is."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def join(root: str | os.PathLike, *parts: str) -> str:
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def filesystem(path: str | os.PathLike):
    """(fsspec filesystem, path inside it) for a local path or a URI."""
    import fsspec.core

    return fsspec.core.url_to_fs(str(path))


def _explain(err: Exception, path: str) -> StoreError:
    first = (str(err).splitlines() or [type(err).__name__])[0][:300]
    scheme = str(path).split("://", 1)[0]
    hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3 for an S3-compatible store) "
            "in the environment" if scheme in ("s3", "s3a") else f"check the credentials of the {scheme}:// client")
    return StoreError(f"cannot access {path} ({type(err).__name__}: {first}); {hint}")


def check_access(root: str | os.PathLike) -> None:
    """Fail in one line, before any work, when the store refuses us (bad credentials, no such bucket).

    A directory that does not exist yet is fine (a build creates it); only the bucket must exist."""
    if not is_remote(root):
        return
    fs, inner = filesystem(root)
    bucket = inner.split("/", 1)[0]
    try:
        fs.invalidate_cache()
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StoreError(f"cannot access {root}: bucket {bucket!r} does not exist; create it first") from None
    except Exception as err:  # noqa: BLE001 - botocore / gcsfs / adlfs each raise their own kinds
        raise _explain(err, str(root)) from None


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def listing(root: str) -> set[str]:
    """Names of the files directly under `root` (one request per directory, not one per shard)."""
    fs, inner = filesystem(root)
    try:
        return {Path(p).name for p in fs.ls(inner, detail=False, refresh=True) if p}
    except FileNotFoundError:
        return set()
    except TypeError:  # filesystems without the refresh flag
        return {Path(p).name for p in fs.ls(inner, detail=False)}


_ARROW_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
              "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@functools.lru_cache(maxsize=16)
def _arrow_s3(bucket: str, env: tuple):
    """pyarrow's S3 filesystem for a bucket (region resolved once), per process and per credential set: the
    standard AWS_* variables (`env` only keys the cache; Arrow reads them itself)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(f"s3://{bucket}")[0]


def read_bytes(path: str) -> bytes:
    """A whole file. s3:// through pyarrow (see the module docstring), anything else through fsspec."""
    text = str(path)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        fs = _arrow_s3(bucket, tuple(os.environ.get(k) for k in _ARROW_ENV))
        with fs.open_input_stream(f"{bucket}/{key}") as f:  # one GET; FileNotFoundError when the key is gone
            return f.read()
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return f.read()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_dir(local: Path, uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local directory tree to `uri`; the files named in `last` go after everything else, so a
    reader that finds them (the manifest) finds every file they list."""
    fs, inner = filesystem(uri)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.name in last):
        rel = p.relative_to(local).as_posix()
        fs.put_file(str(p), f"{inner.rstrip('/')}/{rel}")


def read_dir(uri: str) -> dict[str, bytes]:
    """The files directly under a small directory (a tokenizer), name -> contents; local or remote."""
    if not is_remote(uri):
        return {p.name: p.read_bytes() for p in sorted(Path(uri).iterdir()) if p.is_file()}
    fs, inner = filesystem(uri)
    try:
        found = {Path(p).name: p for p in fs.ls(inner, detail=False, refresh=True)}
    except FileNotFoundError:
        found = {}
    except Exception as err:  # noqa: BLE001
        raise _explain(err, uri) from None
    if not found:
        raise FileNotFoundError(f"nothing at {uri}; build the shards there first: cxrfm data build --out {uri.rsplit('/', 1)[0]}")
    return {name: fs.cat_file(path) for name, path in sorted(found.items())}


def local_copy(files: dict[str, bytes], label: str = "files") -> Path:
    """`files` (name -> contents) as a local directory: $CXRFM_CACHE (default ~/.cache/cxrfm)/remote/LABEL/DIGEST,
    written once per machine (atomically: concurrent processes end with one whole copy) and reused while the
    contents stay the same. Ray Data tasks get a tokenizer this way, with no store access of their own."""
    digest = hashlib.sha256(b"".join(hashlib.sha256(k.encode() + b"\0" + v).digest()
                                     for k, v in sorted(files.items()))).hexdigest()[:16]
    base = Path(os.environ.get(TOKENIZER_CACHE_ENV) or Path.home() / ".cache" / "cxrfm") / "remote"
    target = base / label / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    try:
        os.replace(tmp, target)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_dir(uri: str) -> Path:
    """A local copy of a small remote directory (the tokenizer: transformers loads from local files), fetched
    again when any file changed (local_copy); a local path is returned as it is."""
    if not is_remote(uri):
        return Path(uri)
    return local_copy(read_dir(uri), label=hashlib.sha256(uri.encode()).hexdigest()[:16])
