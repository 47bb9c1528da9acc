"""Continuous batching without Ray: greedy answers equal single-request `Predictor.generate_batch`, however
requests overlap; late arrivals join a running batch; a cancelled request leaves it."""

import asyncio
import time

import numpy as np
import pytest

from cxrfm.model.generate import GenerationOptions
from cxrfm.serving.continuous import DecodeLoop


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from cxrfm.model.generate import Predictor
    from cxrfm.serving.cli import build_untrained_export

    return Predictor(build_untrained_export(tmp_path_factory.mktemp("cb") / "export"), device="cpu")


def _requests() -> list[tuple[dict, int]]:
    rng = np.random.default_rng(3)
    img = lambda: rng.integers(0, 255, (80, 80), dtype=np.uint8)  # noqa: E731
    return [({"task": "report", "images": {"frontal": img()}, "text": "indication: cough"}, 12),
            ({"task": "vqa", "images": {"frontal": img(), "lateral": img()}, "text": "is there an effusion"}, 5),
            ({"task": "grounding", "images": {"lateral": img()}, "text": "left pleural effusion"}, 9),
            ({"task": "report", "images": {"frontal": img(), "prior": img()}, "text": "findings:"}, 16),
            ({"task": "vqa", "images": {"frontal": img()}, "text": "heart size"}, 1)]


def test_greedy_answers_equal_single_request_generation_however_requests_overlap(predictor):
    cases = _requests()
    expected = [predictor.generate_batch([r], GenerationOptions(max_new_tokens=n))[0] for r, n in cases]
    loop = DecodeLoop(predictor, max_batch_size=3)  # fewer slots than requests: some wait, then join

    async def run():
        tasks = []
        for i, (r, n) in enumerate(cases):
            tasks.append(asyncio.create_task(loop.generate(r, n)))
            await asyncio.sleep(0.05 * (i % 2))  # some arrive together, some while others decode
        return await asyncio.gather(*tasks)

    answers = asyncio.run(run())
    for got, want in zip(answers, expected):
        assert (got.text, got.tokens, got.boxes, got.problems) == (want.text, want.tokens, want.boxes, want.problems)
    assert max(loop.step_sizes) > 1  # decoding really was batched


def test_streamed_tokens_and_cancellation(predictor):
    (r, _), loop = _requests()[0], DecodeLoop(predictor)
    streamed = []

    async def run():
        answer = await loop.generate(r, 8, on_token=streamed.append)
        decoding = asyncio.Event()
        slow = asyncio.create_task(loop.generate(r, 400, on_token=lambda _: decoding.set()))
        await asyncio.wait_for(decoding.wait(), timeout=120)  # cancel it mid-decode, not before it started
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        deadline = time.monotonic() + 60
        while loop.running:  # the cancelled sequence leaves at the next step
            assert time.monotonic() < deadline, "the cancelled sequence was still decoding after 60 s"
            await asyncio.sleep(0.05)
        return answer

    answer = asyncio.run(run())
    assert len(streamed) == answer.tokens and predictor.tokenizer.decode(streamed).strip() == answer.text
    assert not loop.running


def test_bad_input_fails_only_its_request(predictor):
    loop = DecodeLoop(predictor)
    good, n = _requests()[1]

    async def run():
        bad = loop.generate({"task": "vqa", "images": {"prior": good["images"]["frontal"]}, "text": "q"}, 4)
        return await asyncio.gather(bad, loop.generate(good, n), return_exceptions=True)

    bad, ok = asyncio.run(run())
    assert isinstance(bad, ValueError) and "frontal or a lateral" in str(bad)
    assert ok.tokens == predictor.generate_batch([good], GenerationOptions(max_new_tokens=n))[0].tokens


def test_arrivals_wait_to_be_prefilled_together_only_while_a_batch_runs(predictor):
    """TGI's rule: an idle loop admits at once; a running batch takes arrivals once they are
    waiting_served_ratio of it, once they would fill it, or once the oldest waited max_waiting_steps."""
    from collections import deque

    from cxrfm.serving.continuous import _Sequence

    loop = DecodeLoop(predictor, max_batch_size=16, waiting_served_ratio=0.3, max_waiting_steps=4)
    seq = lambda: _Sequence({}, 1, None, None)  # noqa: E731
    loop.waiting = deque([seq()])
    assert loop._admit_now()  # idle: no window
    loop.running = [seq() for _ in range(10)]
    assert not loop._admit_now()  # 1 waiting < 0.3 x 10 running
    loop.waiting[0].waited = 4
    assert loop._admit_now()  # waited long enough
    loop.waiting = deque([seq() for _ in range(3)])
    assert loop._admit_now()  # 3 >= 0.3 x 10: one prefill for the three
    loop.running = [seq() for _ in range(14)]
    loop.waiting = deque([seq(), seq()])
    assert loop._admit_now()  # they fill the batch
    loop.running = [seq() for _ in range(16)]
    loop.waiting[0].waited = 100
    assert not loop._admit_now()  # full: they wait for a sequence to leave
