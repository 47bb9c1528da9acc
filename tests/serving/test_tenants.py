"""Tenant stores, API keys (salted hashes only) and the limiter, without a server."""

import pytest

from cxrfm.serving.tenants import (
    Authenticator, Limiter, Tenant, TenantError, add_tenant, issue_key, main, open_store, revoke_key, split_key,
)


@pytest.fixture(params=["yaml", "db"])
def store(request, tmp_path):
    return tmp_path / f"tenants.{request.param}"


def test_keys_are_stored_only_as_salted_hashes(store):
    k1 = add_tenant(store, Tenant(name="acme"))
    k2 = issue_key(store, "acme")
    raw = store.read_bytes()
    for key in (k1, k2):
        assert key.encode() not in raw and split_key(key)[1].encode() not in raw
    recs = open_store(store).keys()
    assert len(recs) == 2 and recs[0].salt != recs[1].salt and recs[0].hash != recs[1].hash
    assert store.stat().st_mode & 0o077 == 0  # owner-only file


def test_authenticate_good_bad_revoked_and_policy_edits(store):
    key = add_tenant(store, Tenant(name="acme", models=["base", "acme-ft"]))
    auth = Authenticator(store, cache_ttl_s=0)
    assert auth.authenticate(key).models == ["base", "acme-ft"]
    assert auth.authenticate(key[:-2] + "xx") is None  # right key id, wrong secret
    assert auth.authenticate("cxrfm_000000000000_nope") is None  # unknown key id
    assert auth.authenticate("Bearer whatever") is None and auth.authenticate("") is None
    open_store(store).put_tenant(Tenant(name="acme", models=["base"], rate_per_s=1))
    assert auth.authenticate(key).models == ["base"]  # policy edits apply without a restart
    open_store(store).put_tenant(Tenant(name="acme", enabled=False))
    assert auth.authenticate(key) is None
    open_store(store).put_tenant(Tenant(name="acme"))
    revoke_key(store, split_key(key)[0])
    assert auth.authenticate(key) is None


def test_store_errors_say_what_to_do(tmp_path):
    with pytest.raises(TenantError, match="cxrfm tenants add"):
        open_store(tmp_path / "missing.yaml").tenant("x")
    with pytest.raises(TenantError, match=".yaml"):
        open_store(tmp_path / "tenants.json")
    add_tenant(tmp_path / "t.db", Tenant(name="a"))
    with pytest.raises(TenantError, match="add it first"):
        issue_key(tmp_path / "t.db", "nobody")
    with pytest.raises(ValueError, match="default_model"):
        Tenant(name="a", models=["base"], default_model="other")
    with pytest.raises(ValueError, match="unknown task"):
        Tenant(name="a", tasks=["report", "segment"])


def test_token_bucket_rate_and_recovery():
    now = [0.0]
    lim = Limiter(clock=lambda: now[0])
    grants = [lim.acquire("t", rate=2.0, burst=3, max_concurrency=100) for _ in range(4)]
    assert [g.ok for g in grants] == [True, True, True, False]
    assert grants[3].reason == "rate" and grants[3].retry_after_s == pytest.approx(0.5)
    now[0] += 0.5  # one token back
    assert lim.acquire("t", 2.0, 3, 100).ok and not lim.acquire("t", 2.0, 3, 100).ok
    assert lim.acquire("other", 2.0, 3, 100).ok  # buckets are per tenant
    now[0] += 60  # a long idle refills the bucket to the burst, never beyond it
    assert [lim.acquire("t", 2.0, 3, 100).ok for _ in range(4)] == [True, True, True, False]


def test_concurrency_leases_release_and_expire():
    now = [0.0]
    lim = Limiter(lease_ttl_s=60, clock=lambda: now[0])
    a = lim.acquire("t", 100, 100, max_concurrency=2)
    b = lim.acquire("t", 100, 100, max_concurrency=2)
    c = lim.acquire("t", 100, 100, max_concurrency=2)
    assert a.ok and b.ok and not c.ok and c.reason == "concurrency" and c.retry_after_s >= 1
    lim.release("t", a.lease)
    assert lim.acquire("t", 100, 100, 2).ok
    now[0] += 61  # leases whose release was lost come back by themselves
    assert lim.acquire("t", 100, 100, 2).ok and lim.acquire("t", 100, 100, 2).ok


def test_cli_prints_the_key_once_and_lists_no_keys(tmp_path, capsys):
    store = tmp_path / "t.db"
    assert main(["add", "acme", "--store", str(store), "--models", "base,acme-ft", "--rate", "2"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert split_key(key) and "shown once" in out.err
    assert Authenticator(store).authenticate(key).rate_per_s == 2
    assert main(["list", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert split_key(key)[0] in listing and split_key(key)[1] not in listing
    assert main(["revoke", split_key(key)[0], "--store", str(store)]) == 0
    assert main(["key", "nobody", "--store", str(store)]) == 2
