"""The ingress's slot release against Serve's cancellation of a request's calls, made deterministic.

When a request to a replica is cancelled (its HTTP client went away), Serve cancels every call the request
made that is still waiting to be assigned to a downstream replica (`Replica._on_request_cancelled` walks
the request's `_requests_pending_assignment`). A release the request had started is such a call while the
limiter is busy: a stream's `finally` releases the slot, and Starlette then still awaits sending the last
body chunk, when a client that goes away cancels the request. Here the limiter's only slot is held on
purpose, so the release is certainly pending when its request is cancelled: the old fire-and-forget
`self.limiter.release.remote(...)` is then lost (the slot stays taken until its lease expires, 10 min);
`Ingress._release` (own task, empty context, so no parent request) survives.

A release started only after the cancellation (the `finally` of a cancelled request) is not at risk in
Ray 2.60: user code runs on its own event-loop thread, and `_on_request_cancelled` has already run on the
replica's main loop by the time that `finally` calls `.remote()`. That is why the disconnect tests over
HTTP in test_hardening.py pass on the old code too.
"""

import asyncio
import time

import pytest
from ray import serve

from cxrfm.serving.app import Ingress
from cxrfm.serving.deployments import TenantLimiter

APP = "cxrfm-release-check"


class _HeldLimiter(TenantLimiter.func_or_class):
    """The real limiter plus a call that keeps its only slot busy (`max_ongoing_requests=1`)."""

    async def hold(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Caller:
    """A replica that gives a slot back through the real Ingress._release and is still running when its
    caller goes away, as a stream is while its last chunk is sent."""

    _release = Ingress.func_or_class._release
    _release_now = Ingress.func_or_class._release_now

    def __init__(self, limiter):
        self.limiter, self._releases = limiter, set()

    async def release_then_wait(self, tenant: str, lease: str) -> None:
        self._release(tenant, lease)
        await asyncio.sleep(3600)  # cancelled here


@pytest.fixture(scope="module")
def handles(server):  # noqa: ARG001 - the package's Ray instance (started by `server`)
    limiter = serve.deployment(_HeldLimiter, name="HeldLimiter", max_ongoing_requests=1, max_queued_requests=-1,
                               ray_actor_options={"num_cpus": 0}).bind()
    caller = serve.deployment(_Caller, name="Caller", ray_actor_options={"num_cpus": 0}).bind(limiter)
    serve.run(caller, name=APP, route_prefix=None)
    try:
        yield serve.get_deployment_handle("Caller", APP), serve.get_deployment_handle("HeldLimiter", APP)
    finally:
        serve.delete(APP)


def _acquire(limiter, lease: str) -> bool:
    return limiter.acquire.remote("solo", 1000.0, 1000, 1, lease).result(timeout_s=60)["ok"]


def test_release_pending_assignment_survives_the_cancelled_request(handles):
    caller, limiter = handles
    assert _acquire(limiter, "first")  # the tenant's only slot
    assert not _acquire(limiter, "probe")  # taken
    hold = limiter.hold.remote(6)  # the limiter's only slot is busy: a release waits for assignment
    time.sleep(1)
    request = caller.release_then_wait.remote("solo", "first")
    time.sleep(2)  # the release is pending assignment, the request still runs
    request.cancel()  # the client went away: Serve cancels the request and its calls pending assignment
    with pytest.raises(Exception):
        request.result(timeout_s=30)
    hold.result(timeout_s=60)
    deadline = time.monotonic() + 20
    while not _acquire(limiter, f"after-{time.monotonic()}"):  # a granted probe holds the slot: ends the loop
        assert time.monotonic() < deadline, "the cancelled request's release was lost: the slot stays taken"
        time.sleep(0.5)
