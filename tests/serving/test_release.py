"""The ingress's slot release against Serve's cancellation of child calls, made deterministic.

When a request to a replica is cancelled (its HTTP client went away), Serve cancels every call that request
made which is still waiting to be assigned to a downstream replica (`Replica._on_request_cancelled` ->
the parent's `_requests_pending_assignment`). A release started in the cancelled request's `finally` is
such a call. Over HTTP (test_hardening.py) that race is rarely lost: the router thread usually has not
registered the release yet when the cancellation runs, so those tests pass on the old fire-and-forget
release too. Here the release is held in assignment on purpose: the limiter deployment has ONE slot and
a call occupies it, so the release is certainly pending when its parent request is cancelled. The old
`self.limiter.release.remote(...)` is then lost (the slot stays taken until its lease expires); the
ingress's `_release` (own task, empty context) survives.
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
    """A replica that gives a slot back through the real Ingress._release, then waits until cancelled,
    as an ingress request does when its client disconnects."""

    _release = Ingress.func_or_class._release
    _release_now = Ingress.func_or_class._release_now

    def __init__(self, limiter):
        self.limiter, self._releases = limiter, set()

    async def release_then_wait(self, tenant: str, lease: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:  # the ingress releases in `finally` while the CancelledError goes up
            self._release(tenant, lease)
            # ...and goes on with its cleanup (the streaming path writes its log line after the release): the
            # thread lets go of the GIL and the router thread registers the release as pending assignment.
            time.sleep(0.2)


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
    request = caller.release_then_wait.remote("solo", "first")
    time.sleep(2)  # the caller is waiting
    hold = limiter.hold.remote(4)  # the limiter's only slot is busy: a release now waits for assignment
    time.sleep(1)
    request.cancel()  # the client went away: Serve cancels the request and its calls pending assignment
    with pytest.raises(Exception):
        request.result(timeout_s=30)
    hold.result(timeout_s=60)
    deadline = time.monotonic() + 20
    while not _acquire(limiter, f"after-{time.monotonic()}"):  # a granted probe holds the slot: ends the loop
        assert time.monotonic() < deadline, "the cancelled request's release was lost: the slot stays taken"
        time.sleep(0.5)
