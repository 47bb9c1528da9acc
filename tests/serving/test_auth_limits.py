"""Authentication cost bounds and lease bookkeeping, without a server (the server tests are in
test_hardening.py)."""

import pytest

from cxrfm.serving.tenants import AuthThrottled, Authenticator, Limiter, Tenant, add_tenant, issue_key, revoke_key, split_key


def test_wrong_secret_flood_is_throttled_before_scrypt(tmp_path):
    store = tmp_path / "t.yaml"
    key = add_tenant(store, Tenant(name="acme"))
    other = add_tenant(store, Tenant(name="beta"))
    now = [0.0]
    auth = Authenticator(store, cache_ttl_s=30, fail_burst=3, fail_rate_per_s=0.5, clock=lambda: now[0])
    assert auth.authenticate(key).name == "acme"
    key_id = split_key(key)[0]
    wrong = [f"cxrfm_{key_id}_guess{i}" for i in range(10)]
    assert [auth.authenticate(w) for w in wrong[:3]] == [None] * 3
    assert auth.verifications == 4  # the good key once, three wrong secrets
    for w in wrong[3:]:
        with pytest.raises(AuthThrottled) as e:
            auth.authenticate(w)
        assert e.value.retry_after_s == pytest.approx(2.0)
    assert auth.verifications == 4  # no scrypt for the throttled ones
    assert auth.authenticate(key).name == "acme"  # the owner's verified key is cached: not throttled
    assert auth.authenticate(other).name == "beta"  # another key id has its own bucket
    assert auth.authenticate("cxrfm_000000000000_x") is None and auth.verifications == 5  # unknown: no hash
    now[0] += 2.0  # one failure token back
    assert auth.authenticate(wrong[3]) is None and auth.verifications == 6


def test_revocation_applies_to_the_next_request_despite_the_cache(tmp_path):
    store = tmp_path / "t.db"
    add_tenant(store, Tenant(name="acme"))
    key = issue_key(store, "acme")
    auth = Authenticator(store, cache_ttl_s=3600)
    assert auth.authenticate(key).name == "acme"
    revoke_key(store, split_key(key)[0])
    assert auth.authenticate(key) is None


def test_release_before_acquire_and_by_caller_chosen_lease():
    lim = Limiter()
    lim.release("t", "lost-answer")  # the request was cancelled before its acquire was processed
    d = lim.acquire("t", 100, 100, max_concurrency=1, lease="lost-answer")
    assert d.ok and lim.in_flight("t") == 0  # granted and freed at once: no slot leaks
    d = lim.acquire("t", 100, 100, max_concurrency=1, lease="mine")
    assert d.ok and d.lease == "mine" and not lim.acquire("t", 100, 100, 1).ok
    lim.release("t", "mine")
    assert lim.acquire("t", 100, 100, 1).ok


def test_a_burst_of_the_owners_requests_on_a_cold_cache_is_not_throttled(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = tmp_path / "t.yaml"
    key = add_tenant(store, Tenant(name="acme"))
    auth = Authenticator(store, cache_ttl_s=30, fail_burst=2)
    with ThreadPoolExecutor(16) as pool:
        tenants = list(pool.map(lambda _: auth.authenticate(key), range(16)))
    assert [t.name for t in tenants] == ["acme"] * 16
    assert auth.verifications == 1  # the others waited for the first check and used its result
