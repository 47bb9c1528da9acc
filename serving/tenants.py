"""Tenants, API keys and per-tenant limits.

A tenant has allowed tasks, allowed models (ids in the application's model catalog), a default model,
a request-rate limit (token bucket), a concurrency limit and a maximum upload size. API keys look like
`cxrfm_<key id>_<secret>`: the key id finds the stored record, the secret is checked against a salted
scrypt hash. The plaintext key is printed once when it is made and never stored.

Two stores, chosen by file extension, same content:
- YAML (`.yaml`/`.yml`): easy to review, to template and to mount as a Kubernetes Secret.
- SQLite (`.db`/`.sqlite`/`.sqlite3`): keys can be added or revoked while the server runs.
The ingress re-reads either on change (YAML: file mtime; SQLite: every lookup), so a new or revoked
key takes effect without a redeploy (verified keys are cached for `cache_ttl_s`).

Manage with `cxrfm tenants add|key|revoke|list --store PATH` (or `python -m cxrfm.serving.tenants`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

TASKS = ("report", "vqa", "grounding", "generate")
KEY_PREFIX = "cxrfm"
# scrypt at 16 MiB / ~30 ms: slow enough that a leaked store does not give keys away cheaply, fast
# enough for a cold check; warm checks hit the in-process cache of verified keys.
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 2**20}


class TenantError(ValueError):
    """A tenant store or command is wrong; the message says what to do."""


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    tasks: list[str] = Field(default_factory=lambda: ["report", "vqa", "grounding"])
    models: list[str] = Field(default_factory=lambda: ["base"], min_length=1)
    default_model: str | None = None  # None: the first of `models`
    rate_per_s: float = Field(5.0, gt=0, description="sustained requests per second (token refill rate)")
    burst: int = Field(10, ge=1, description="requests allowed at once before the rate applies")
    max_concurrency: int = Field(4, ge=1, description="requests in flight at once")
    max_upload_bytes: int = Field(20 * 2**20, ge=1024, description="image bytes per request, decoded")
    enabled: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "Tenant":
        bad = set(self.tasks) - set(TASKS)
        if bad:
            raise ValueError(f"tenant {self.name}: unknown task(s) {sorted(bad)}; allowed {list(TASKS)}")
        if self.default_model is None:
            self.default_model = self.models[0]
        elif self.default_model not in self.models:
            raise ValueError(f"tenant {self.name}: default_model {self.default_model!r} is not in its models")
        return self


@dataclass
class KeyRecord:
    key_id: str
    tenant: str
    salt: str  # hex
    hash: str  # hex scrypt(secret, salt)
    revoked: bool = False


def hash_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def new_key() -> tuple[str, str, str, str]:
    """(plaintext key, key id, salt hex, hash hex)."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
    return f"{KEY_PREFIX}_{key_id}_{secret}", key_id, salt.hex(), hash_secret(secret, salt).hex()


def split_key(key: str) -> tuple[str, str] | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1], parts[2]


# ---- stores ---------------------------------------------------------------------------------------
class _YamlStore:
    def __init__(self, path: Path):
        self.path, self._mtime, self._data = path, None, {"tenants": {}, "keys": []}
        self._lock = threading.Lock()

    def _load(self) -> dict:
        with self._lock:
            if not self.path.is_file():
                raise TenantError(f"tenant store {self.path} not found; create it with "
                                  f"`cxrfm tenants add NAME --store {self.path}`")
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                data = yaml.safe_load(self.path.read_text()) or {}
                self._data = {"tenants": data.get("tenants") or {}, "keys": data.get("keys") or []}
                self._mtime = mtime
            return self._data

    def tenant(self, name: str) -> Tenant | None:
        raw = self._load()["tenants"].get(name)
        return Tenant(name=name, **raw) if raw is not None else None

    def key(self, key_id: str) -> KeyRecord | None:
        for k in self._load()["keys"]:
            if k["key_id"] == key_id:
                return KeyRecord(**k)
        return None

    def tenants(self) -> list[Tenant]:
        return [Tenant(name=n, **raw) for n, raw in self._load()["tenants"].items()]

    def keys(self) -> list[KeyRecord]:
        return [KeyRecord(**k) for k in self._load()["keys"]]

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        # Hashes only, but still nobody else's business: owner-only, replaced atomically.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# cxrfm tenants: API keys are stored as salted scrypt hashes only.\n")
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, self.path)

    def _current(self) -> dict:
        return self._load() if self.path.is_file() else {"tenants": {}, "keys": []}

    def put_tenant(self, tenant: Tenant) -> None:
        data = self._current()
        data["tenants"][tenant.name] = tenant.model_dump(exclude={"name"})
        self._write(data)

    def put_key(self, rec: KeyRecord) -> None:
        data = self._current()
        data["keys"] = [k for k in data["keys"] if k["key_id"] != rec.key_id] + [rec.__dict__]
        self._write(data)


class _SqliteStore:
    def __init__(self, path: Path):
        self.path = path

    def _db(self, create: bool = False) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise TenantError(f"tenant store {self.path} not found; create it with "
                              f"`cxrfm tenants add NAME --store {self.path}`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5)
        db.execute("CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, policy TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, salt TEXT NOT NULL,"
                   " hash TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL)")
        return db

    def tenant(self, name: str) -> Tenant | None:
        with self._db() as db:
            row = db.execute("SELECT policy FROM tenants WHERE name = ?", (name,)).fetchone()
        return Tenant(name=name, **json.loads(row[0])) if row else None

    def key(self, key_id: str) -> KeyRecord | None:
        with self._db() as db:
            row = db.execute("SELECT key_id, tenant, salt, hash, revoked FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return KeyRecord(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    def tenants(self) -> list[Tenant]:
        with self._db() as db:
            return [Tenant(name=n, **json.loads(p)) for n, p in db.execute("SELECT name, policy FROM tenants ORDER BY name")]

    def keys(self) -> list[KeyRecord]:
        with self._db() as db:
            rows = db.execute("SELECT key_id, tenant, salt, hash, revoked FROM keys ORDER BY created").fetchall()
        return [KeyRecord(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def put_tenant(self, tenant: Tenant) -> None:
        with self._db(create=True) as db:
            db.execute("INSERT OR REPLACE INTO tenants VALUES (?, ?)",
                       (tenant.name, tenant.model_dump_json(exclude={"name"})))
        os.chmod(self.path, 0o600)

    def put_key(self, rec: KeyRecord) -> None:
        with self._db(create=True) as db:
            db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                       (rec.key_id, rec.tenant, rec.salt, rec.hash, int(rec.revoked), time.time()))


def open_store(path: str | Path) -> _YamlStore | _SqliteStore:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return _YamlStore(path)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return _SqliteStore(path)
    raise TenantError(f"tenant store {path}: use a .yaml/.yml file or a .db/.sqlite SQLite file")


def add_tenant(store_path: str | Path, tenant: Tenant) -> str:
    """Create or update a tenant and issue a new key for it; returns the plaintext key (show it once)."""
    store = open_store(store_path)
    store.put_tenant(tenant)
    return issue_key(store_path, tenant.name)


def issue_key(store_path: str | Path, tenant_name: str) -> str:
    store = open_store(store_path)
    if store.tenant(tenant_name) is None:
        raise TenantError(f"no tenant {tenant_name!r} in {store_path}; add it first with `cxrfm tenants add`")
    key, key_id, salt, digest = new_key()
    store.put_key(KeyRecord(key_id, tenant_name, salt, digest))
    return key


def revoke_key(store_path: str | Path, key_id: str) -> None:
    store = open_store(store_path)
    rec = store.key(key_id)
    if rec is None:
        raise TenantError(f"no key {key_id!r} in {store_path} (key ids are listed by `cxrfm tenants list`)")
    rec.revoked = True
    store.put_key(rec)


# ---- authentication -------------------------------------------------------------------------------
class AuthThrottled(Exception):
    """Too many failed verifications for one key id: answered 429 before any scrypt work."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"too many failed API key checks for this key id; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class Authenticator:
    """API key -> Tenant, or None. Thread-safe; meant to be called off the event loop (scrypt).

    Cost bounds: an unknown key id costs a store lookup, never a hash. A known key id with a wrong secret
    costs one scrypt, but each key id has a failure bucket (`fail_burst` failures, refilled at
    `fail_rate_per_s`) checked BEFORE hashing: once empty, further unverified attempts on that key id are
    refused (AuthThrottled -> 429) without scrypt, so a wrong-secret flood cannot eat the CPU that other
    tenants' checks need. A verified key is cached (HMAC of the key -> tenant) for `cache_ttl_s`, so its
    owner is not throttled by someone guessing at its key id. Revocation and tenant policy are re-read
    from the store on every request: the cache only saves the scrypt, it never outlives a revocation.
    """

    def __init__(self, store_path: str | Path, cache_ttl_s: float = 30.0, cache_size: int = 4096,
                 fail_burst: int = 5, fail_rate_per_s: float = 0.2, clock=time.monotonic):
        self.store = open_store(store_path)
        self.ttl, self.size, self.clock = cache_ttl_s, cache_size, clock
        self.fail_burst, self.fail_rate = fail_burst, fail_rate_per_s
        # Cache key: HMAC of the presented key under a per-process secret, so the cache never holds keys.
        self._pepper = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[str | None, float]] = OrderedDict()
        self._failures: dict[str, tuple[float, float]] = {}  # key id -> (failure tokens left, last refill)
        self._verifying: dict[str, threading.Lock] = {}  # key id -> held while one of its keys is verified
        self._lock = threading.Lock()
        self.verifications = 0  # scrypt evaluations done (tests read it)

    def _cached(self, tag: bytes) -> tuple[bool, str | None]:
        with self._lock:
            hit = self._cache.get(tag)
            if hit and hit[1] > self.clock():
                return True, hit[0]
        return False, None

    def _remember(self, tag: bytes, tenant: str | None) -> None:
        with self._lock:
            self._cache[tag] = (tenant, self.clock() + self.ttl)
            self._cache.move_to_end(tag)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)

    def _failure_tokens(self, key_id: str, spend: bool) -> None:
        """Check (and with spend, take one from) the key id's failure bucket; raise AuthThrottled when it
        is empty. Only failures spend: a burst of its owner's requests on a cold cache drains nothing."""
        with self._lock:
            now = self.clock()
            tokens, stamp = self._failures.get(key_id, (float(self.fail_burst), now))
            tokens = min(float(self.fail_burst), tokens + (now - stamp) * self.fail_rate)
            self._failures[key_id] = (tokens - 1.0 if spend else tokens, now)
            if not spend and tokens < 1.0:
                raise AuthThrottled((1.0 - tokens) / self.fail_rate)
            if len(self._failures) > self.size:  # bounded: forget the oldest buckets
                self._failures.pop(next(iter(self._failures)))

    def _key_lock(self, key_id: str) -> threading.Lock:
        with self._lock:
            lock = self._verifying.setdefault(key_id, threading.Lock())
            if len(self._verifying) > self.size:
                self._verifying.pop(next(iter(self._verifying)))
            return lock

    def authenticate(self, key: str | None) -> Tenant | None:
        if not key or len(key) > 256:
            return None
        parts = split_key(key)
        if parts is None:
            return None
        rec = self.store.key(parts[0])  # every request: a revocation applies to the next one
        if rec is None or rec.revoked:
            return None  # unknown or revoked key ids cost no hash
        tag = hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()
        hit, name = self._cached(tag)
        if not hit:
            self._failure_tokens(rec.key_id, spend=False)  # raises AuthThrottled before any scrypt work
            # One verification per key id at a time: concurrent requests with the same key wait for the
            # first and then hit the cache; a flood gets one scrypt at a time until its bucket is empty.
            with self._key_lock(rec.key_id):
                hit, name = self._cached(tag)
                if not hit:
                    self._failure_tokens(rec.key_id, spend=False)
                    self.verifications += 1
                    digest = hash_secret(parts[1], bytes.fromhex(rec.salt))
                    name = rec.tenant if hmac.compare_digest(digest.hex(), rec.hash) else None
                    if name is None:
                        self._failure_tokens(rec.key_id, spend=True)
                    # Failures are cached too: retrying one wrong secret does not buy our CPU either.
                    self._remember(tag, name)
        tenant = self.store.tenant(name) if name else None  # policy re-read: edits apply at once
        return tenant if tenant is not None and tenant.enabled else None


# ---- limits ---------------------------------------------------------------------------------------
@dataclass
class Decision:
    ok: bool
    reason: str = ""  # "rate" | "concurrency"
    retry_after_s: float = 0.0
    lease: str = ""


class Limiter:
    """Token bucket per tenant (rate + burst) and a concurrency count held as expiring leases.

    The caller names the lease (a random id it made), so it can release a slot even when the answer to
    its acquire was lost (a cancelled request); a release that arrives before its acquire leaves a
    tombstone, and that acquire is then granted and freed at once. Leases also expire after `lease_ttl_s`,
    so a slot whose release was lost (a crashed ingress replica) comes back by itself."""

    def __init__(self, lease_ttl_s: float = 600.0, clock=time.monotonic):
        self.ttl, self.clock = lease_ttl_s, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill time)
        self.leases: dict[str, dict[str, float]] = {}  # tenant -> lease id -> expiry
        self.tombstones: dict[str, float] = {}  # lease id released before it was acquired -> expiry

    def acquire(self, tenant: str, rate: float, burst: int, max_concurrency: int, lease: str | None = None) -> Decision:
        now = self.clock()
        held = {k: t for k, t in self.leases.get(tenant, {}).items() if t > now}
        self.leases[tenant] = held
        if len(held) >= max_concurrency:
            # No token is spent: the client retries when a request of its own finishes.
            return Decision(False, "concurrency", 1.0)
        tokens, stamp = self.buckets.get(tenant, (float(burst), now))
        tokens = min(float(burst), tokens + (now - stamp) * rate)
        if tokens < 1.0:
            self.buckets[tenant] = (tokens, now)
            return Decision(False, "rate", (1.0 - tokens) / rate)
        self.buckets[tenant] = (tokens - 1.0, now)
        lease = lease or secrets.token_hex(8)
        if self.tombstones.pop(lease, None) is None:
            held[lease] = now + self.ttl
        return Decision(True, lease=lease)

    def release(self, tenant: str, lease: str) -> None:
        now = self.clock()
        if self.leases.get(tenant, {}).pop(lease, None) is None:
            self.tombstones = {k: t for k, t in self.tombstones.items() if t > now}
            self.tombstones[lease] = now + self.ttl

    def in_flight(self, tenant: str) -> int:
        now = self.clock()
        return sum(1 for t in self.leases.get(tenant, {}).values() if t > now)


# ---- command line ---------------------------------------------------------------------------------
def _tenant_from_args(args: argparse.Namespace) -> Tenant:
    return Tenant(name=args.name, tasks=args.tasks.split(","), models=args.models.split(","),
                  default_model=args.default_model, rate_per_s=args.rate, burst=args.burst,
                  max_concurrency=args.concurrency, max_upload_bytes=int(args.max_upload_mb * 2**20))


def _cmd(args: argparse.Namespace) -> int:
    try:
        if args.tenants_cmd == "add":
            key = add_tenant(args.store, _tenant_from_args(args))
        elif args.tenants_cmd == "key":
            key = issue_key(args.store, args.name)
        elif args.tenants_cmd == "revoke":
            revoke_key(args.store, args.key_id)
            print(f"revoked key {args.key_id}")
            return 0
        else:
            store = open_store(args.store)
            keys = store.keys()
            for t in store.tenants():
                ids = [k.key_id + (" (revoked)" if k.revoked else "") for k in keys if k.tenant == t.name]
                print(f"{t.name}: tasks={','.join(t.tasks)} models={','.join(t.models)} rate={t.rate_per_s}/s "
                      f"burst={t.burst} concurrency={t.max_concurrency} upload={t.max_upload_bytes}B keys={ids}")
            return 0
    except (TenantError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(key)
    print("this key is shown once and stored only as a salted hash; keep it now", file=sys.stderr)
    return 0


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tenants_cmd", required=True)
    add = sub.add_parser("add", help="create or update a tenant and print a new API key once")
    add.add_argument("name")
    add.add_argument("--tasks", default="report,vqa,grounding", help=f"comma list of {','.join(TASKS)}")
    add.add_argument("--models", default="base", help="model ids from the app's models catalog")
    add.add_argument("--default-model", default=None)
    add.add_argument("--rate", type=float, default=5.0, help="requests per second")
    add.add_argument("--burst", type=int, default=10)
    add.add_argument("--concurrency", type=int, default=4)
    add.add_argument("--max-upload-mb", type=float, default=20.0)
    key = sub.add_parser("key", help="issue another key for a tenant (print once)")
    key.add_argument("name")
    rev = sub.add_parser("revoke", help="revoke a key by its id (the part after cxrfm_)")
    rev.add_argument("key_id")
    sub.add_parser("list", help="tenants, limits and key ids (never keys)")
    for q in (add, key, rev, sub.choices["list"]):
        q.add_argument("--store", required=True, help="tenants .yaml or SQLite .db")
    p.set_defaults(func=_cmd)


def add_tenants_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tenants", help="serving tenants and API keys (stored as salted hashes)")
    _configure(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrfm.serving.tenants", description="serving tenants and API keys")
    _configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
