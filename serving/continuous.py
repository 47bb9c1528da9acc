"""Continuous batching (iteration-level scheduling, as vLLM and TGI do it) for greedy text generation.

One `DecodeLoop` per loaded model in a replica owns one thread that runs one decode loop:

- new requests are prefilled together (one left-padded forward pass over all that arrived since the last
  step, as `Predictor.generate_batch` lays out a batch) and join the running batch at the next step;
- every step decodes one token for every running sequence in ONE forward pass over a left-padded batched
  KV cache allocated once per batch membership (serving/decode_step.py), with each row's own RoPE
  positions and a mask over its padding; the batch is re-laid only when its membership changes;
- a sequence that emits EOS, reaches its budget or whose caller went away leaves at once, and its cache
  rows are dropped (the padding of the rest is trimmed);
- when nothing runs the thread sleeps on the queue: an idle replica starts a request immediately, there is
  no batch window;
- while a batch runs, arrivals wait (a few steps at most) until enough are there to be prefilled together,
  as TGI's router does (`waiting_served_ratio`, `max_waiting_tokens`): one prefill of k prompts costs far
  less than k prefills of one, and each prefill pauses every running sequence for its duration.

Hand-written rather than transformers' continuous batching (`generate_batch` / `ContinuousBatchingManager`,
paged cache): that takes token ids only, while our prompts carry image embeddings in the `<image>` slots
(`inputs_embeds`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .decode_step import BatchKV, LlamaDecoder


@dataclass
class _Sequence:
    request: dict  # {"task", "images": {role: (H, W) uint8}, "text"} as for Predictor.generate_batch
    budget: int  # max new tokens
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_token: object = None  # callable(token id), called on the event loop, for streaming
    tokens: list[int] = field(default_factory=list)
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, kv heads, length, head dim)
    position: int = 0  # RoPE position of the next token
    length: int = 0  # positions in its KV cache (prompt + generated tokens fed back)
    prompt: tuple | None = None  # (ids, image stack, present) between admission and prefill
    cancelled: bool = False
    waited: int = 0  # decode steps run while it waited for admission


class DecodeLoop:
    """Iteration-level scheduler over one Predictor. `generate()` is called on the replica's event loop;
    the model runs in this loop's own thread."""

    def __init__(self, predictor, max_batch_size: int = 16, idle_exit_s: float = 60.0, on_step=None,
                 waiting_served_ratio: float = 0.3, max_waiting_steps: int = 4):
        from cxrfm.text.tokenizer import EOS, PAD

        self.p, self.max_batch_size, self.idle_exit_s = predictor, max_batch_size, idle_exit_s
        # While a batch runs, admit arrivals once they are at least this share of the running sequences,
        # or once the oldest has waited this many steps (an idle loop admits at once).
        self.waiting_served_ratio, self.max_waiting_steps = waiting_served_ratio, max_waiting_steps
        self.eos, self.pad = predictor.vocab[EOS], predictor.vocab[PAD]
        self.pending: queue.Queue[_Sequence] = queue.Queue()  # from the callers' event loops
        self.waiting: deque[_Sequence] = deque()  # taken off `pending` by the loop, not admitted yet
        self.running: list[_Sequence] = []
        # The batched KV cache of the last step and its sequences in row order.
        self.batch_kv: BatchKV | None = None
        self.batch_seqs: list[_Sequence] = []
        self.decoder = LlamaDecoder(predictor.model.language)
        self.step_sizes: deque[int] = deque(maxlen=10_000)  # sequences per decode step (stats)
        self.on_step = on_step  # callable(sequences in this step), from the loop's thread
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- the caller's side (event loop) ------------------------------------------------------------
    async def generate(self, request: dict, max_new_tokens: int, on_token=None):
        """-> Answer (as Predictor.generate_batch gives). Cancelling the awaiting task removes the sequence
        from the batch at the next step."""
        loop = asyncio.get_running_loop()
        seq = _Sequence(request, int(max_new_tokens), loop, loop.create_future(), on_token)
        self.pending.put(seq)
        self._ensure_thread()
        try:
            return await asyncio.shield(seq.future)
        except asyncio.CancelledError:
            seq.cancelled = True
            raise

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cxrfm-decode-loop", daemon=True)
                self._thread.start()

    # ---- the loop (its own thread) --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                try:  # idle: block until a request comes, no window
                    self.waiting.append(self.pending.get(timeout=self.idle_exit_s))
                except queue.Empty:
                    with self._lock:
                        if self.pending.empty():
                            self._thread = None
                            return
                    continue
            while True:
                try:
                    self.waiting.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            self.waiting = deque(s for s in self.waiting if not s.cancelled)  # their callers went away
            if self._admit_now():
                self._admit()
            for seq in self.waiting:
                seq.waited += 1
            if self.running:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - fail the batch, keep the loop for the next requests
                    for seq in self.running:
                        self._fail(seq, e)
                    self.running, self.batch_seqs = [], []

    def _admit_now(self) -> bool:
        waiting, running = self.waiting, len(self.running)
        if not waiting or running >= self.max_batch_size:
            return False
        return (not running or len(waiting) >= self.waiting_served_ratio * running
                or running + len(waiting) >= self.max_batch_size or waiting[0].waited >= self.max_waiting_steps)

    def _admit(self) -> None:
        new = []
        while len(self.running) + len(new) < self.max_batch_size and self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled:
                continue
            try:
                r = seq.request
                seq.prompt = self.p.prompt(r["task"], r["images"], r.get("text", ""))
            except Exception as e:  # noqa: BLE001 - this request's input, not the loop's problem
                self._fail(seq, e)
                continue
            new.append(seq)
        if not new:
            return
        try:
            firsts = self._prefill(new)
        except Exception:  # noqa: BLE001 - find the request at fault: one at a time
            firsts = []
            for seq in list(new):
                try:
                    firsts += self._prefill([seq])
                except Exception as e:  # noqa: BLE001
                    self._fail(seq, e)
                    new.remove(seq)
        for seq, first in zip(new, firsts):
            seq.prompt = None
            self.running.append(seq)
            self._emit(seq, first)
        self._drop_finished()

    @torch.no_grad()
    def _prefill(self, seqs: list[_Sequence]) -> list[int]:
        """One forward pass over the prompts of `seqs`, left-padded; each keeps its own cache rows."""
        p, dev = self.p, self.p.device
        lengths = [len(s.prompt[0]) for s in seqs]
        width = max(lengths)
        ids = torch.tensor([[self.pad] * (width - n) + s.prompt[0] for s, n in zip(seqs, lengths)], device=dev)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=dev)  # (B, T)
        images = torch.as_tensor(np.stack([s.prompt[1] for s in seqs]), device=dev)
        present = torch.as_tensor(np.stack([s.prompt[2] for s in seqs]), device=dev)
        embeds = p.model.embed(ids, images, present)  # (B, T, D)
        out = p.model.language(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               use_cache=True, logits_to_keep=1)
        cache = out.past_key_values  # a DynamicCache: per layer (B, Hkv, T, Dh)
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            s.cache = [(layer.keys[row:row + 1, :, width - n:], layer.values[row:row + 1, :, width - n:])
                       for layer in cache.layers]
            s.position = s.length = n
        return out.logits[:, -1].argmax(-1).tolist()

    def _rebuild(self) -> None:
        """A new batched cache for the running sequences (membership changed), each row right-aligned to
        the longest: the rows still running are gathered from the old batch in one index per layer (their
        common left padding trimmed), freshly prefilled ones are appended. A few tensor ops per layer, not
        per sequence: sequences join and leave every few steps."""
        dev = self.p.device
        row_of = {id(s): row for row, s in enumerate(self.batch_seqs)}
        old = [s for s in self.running if s.cache is None]  # their data lives in the old batch
        new = [s for s in self.running if s.cache is not None]  # prefilled since: their own cache rows
        self.running = seqs = old + new  # the batch's row order
        blocks = []
        if old:
            index = torch.tensor([row_of[id(s)] for s in old], device=dev)
            blocks.append(self.batch_kv.rows(index, max(s.length for s in old)))
        blocks += [s.cache for s in new]
        lengths = [s.length for s in seqs]
        headroom = max(s.budget - len(s.tokens) for s in seqs)  # enough for every row to finish
        self.batch_kv = BatchKV.from_rows(blocks, lengths, min(headroom, 256))
        for s in new:
            s.cache = None  # its data lives in the batch now
        self.batch_seqs = list(seqs)

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every running sequence: one forward pass over the batched cache, which is rebuilt
        only when sequences joined or left since the last step."""
        seqs, dev = self.running, self.p.device
        self.step_sizes.append(len(seqs))
        if self.on_step is not None:
            self.on_step(len(seqs))
        if [id(s) for s in seqs] != [id(s) for s in self.batch_seqs]:
            self._rebuild()
            seqs = self.running  # in the batch's row order
        last = torch.tensor([s.tokens[-1] for s in seqs], device=dev)  # (B,)
        positions = torch.tensor([s.position for s in seqs], device=dev)  # (B,)
        nxt = self.decoder.step(self.batch_kv, last, positions).argmax(-1).tolist()  # (B,) greedy
        for row, s in enumerate(seqs):
            s.position += 1
            s.length += 1
            self._emit(s, nxt[row])
        self._drop_finished()

    def _emit(self, seq: _Sequence, token: int) -> None:
        if seq.cancelled:
            return
        if token == self.eos:
            seq.budget = len(seq.tokens)  # finished: EOS is not part of the answer
            return
        seq.tokens.append(token)
        if seq.on_token is not None:
            seq.loop.call_soon_threadsafe(seq.on_token, token)

    def _drop_finished(self) -> None:
        still = []
        for s in self.running:
            if s.cancelled:
                continue
            if len(s.tokens) >= s.budget:
                self._finish(s)
            else:
                still.append(s)
        self.running = still

    def _finish(self, seq: _Sequence) -> None:
        try:
            text = self.p.tokenizer.decode(seq.tokens, skip_special_tokens=False).strip()
            answer = self.p._finish(seq.request, text)
            answer.tokens = len(seq.tokens)
        except Exception as e:  # noqa: BLE001
            self._fail(seq, e)
            return
        seq.cache = None
        seq.loop.call_soon_threadsafe(_resolve, seq.future, answer, None)

    def _fail(self, seq: _Sequence, error: Exception) -> None:
        seq.cache = None
        seq.loop.call_soon_threadsafe(_resolve, seq.future, None, error)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

