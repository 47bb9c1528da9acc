"""Generation from an exported model: report, VQA and grounding answers through transformers `generate`.

The prompt is laid out exactly as in training (`cxrfm.data.samples.prompt_ids`); its `<image>` slots are
filled with visual tokens and the whole prompt goes to `generate` as `inputs_embeds`, so decoding uses
the KV cache of the Llama model (greedy, beam search or sampling; stops at EOS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from cxrfm.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, read_image
from cxrfm.data.samples import ROLES, prompt_ids, report_prompt
from cxrfm.text.tokenizer import EOS, PAD, load_tokenizer, loc_tokens_to_boxes


@dataclass
class GenerationOptions:
    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Answer:
    text: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # grounding, original pixels
    problems: list[str] = field(default_factory=list)  # malformed location tokens, reported not guessed
    tokens: int = 0  # generated tokens, EOS excluded


class _StepHook(BaseStreamer):
    """transformers streamer -> one on_step(list of token ids) per decoding step. generate's first put() is
    the prompt (2-D, empty with inputs_embeds) and is skipped; each step puts the (B,) chosen tokens."""

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step = on_step

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:
            self.on_step(value.tolist())

    def end(self) -> None:
        pass


class ImageError(ValueError):
    """An input image cannot be used; the message says which and why."""


def load_image(data: bytes | str | Path | np.ndarray, what: str = "image") -> np.ndarray:
    """PNG (8/16-bit), JPEG or DICOM bytes or path, or an array -> (H, W) uint8 grayscale.

    Files and bytes go through cxrfm.data.images, the decoder of the data build and serving, so a
    study reads the same here as in training and behind /v1/report."""
    if isinstance(data, np.ndarray):
        return data if data.dtype == np.uint8 else np.clip(data, 0, 255).astype(np.uint8)
    try:
        if isinstance(data, (str, Path)):
            return read_image(data)
        return decode_image(bytes(data), what, max_pixels=MAX_IMAGE_PIXELS)
    except ImageDecodeError as e:
        raise ImageError(f"{what}: {e.message}") from None


class Predictor:
    """An exported model and its tokenizer, ready to answer. No Ray or DeepSpeed needed."""

    def __init__(self, export_dir: str | Path, device: str = "auto", attention: str | None = None,
                 dtype: str = "auto", check_memory: bool = False):
        """device/dtype "auto": this process's GPU in bf16 if it has one, else the CPU in fp32. attention:
        None runs the export's model.attention where it can run here (see `load_export`)."""
        from cxrfm.model.build import load_export

        self.model = load_export(export_dir, device=device, dtype=dtype, attention=attention, check_memory=check_memory)
        self.runtime = self.model.runtime  # what this process runs: device, dtype, attention, fused kernels
        self.tokenizer = load_tokenizer(export_dir)
        self.device = torch.device(self.runtime.device)
        self.vocab = self.tokenizer.get_vocab()
        self.image_size = self.model.cfg.vision.image_size
        self.num_image_tokens = self.model.cfg.projector.num_tokens

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if image.shape == (self.image_size, self.image_size):
            return image
        return np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.BILINEAR))

    def prompt(self, task: str, images: dict[str, np.ndarray], text: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """One request's prompt: token ids, the image stack (len(ROLES), S, S) uint8 and which roles are
        present (len(ROLES),) bool, as generate_batch and serving's continuous batching feed the model."""
        if "frontal" not in images and "lateral" not in images:
            raise ImageError("a study needs a frontal or a lateral image")
        ids = prompt_ids(self.tokenizer, list(images), task, text, self.num_image_tokens)
        stack = np.zeros((len(ROLES), self.image_size, self.image_size), np.uint8)
        present = np.zeros(len(ROLES), bool)
        for i, role in enumerate(ROLES):
            if role in images:
                stack[i], present[i] = self._resize(images[role]), True
        return ids, stack, present

    @torch.no_grad()
    def generate_batch(self, requests: list[dict], options: GenerationOptions | None = None,
                       on_step: Callable[[list[int]], None] | None = None) -> list[Answer]:
        """requests: [{"task", "images": {role: array}, "text": prompt text}] -> answers, in order.

        Prompts are left-padded so that every row's answer starts at the same position. on_step, if given,
        is called after every decoding step with the token id each row chose (one per request, in order;
        rows that have ended get the pad id), so a caller can stream (greedy or sampled, not beam search)."""
        opts = options or GenerationOptions()
        if on_step is not None and opts.num_beams > 1:
            raise ValueError("on_step streams greedy or sampled decoding; beam search only knows its tokens at the end")
        prompts = [self.prompt(r["task"], r["images"], r.get("text", "")) for r in requests]
        width = max(len(p[0]) for p in prompts)
        pad = self.vocab[PAD]
        ids = torch.tensor([[pad] * (width - len(p[0])) + p[0] for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p[0])) + [1] * len(p[0]) for p in prompts], device=self.device)
        images = torch.as_tensor(np.stack([p[1] for p in prompts]), device=self.device)
        present = torch.as_tensor(np.stack([p[2] for p in prompts]), device=self.device)
        embeds = self.model.embed(ids, images, present)  # (B, T, D)
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        out = self.model.language.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=opts.max_new_tokens,
            num_beams=opts.num_beams, do_sample=opts.do_sample, temperature=opts.temperature, top_p=opts.top_p,
            eos_token_id=self.vocab[EOS], pad_token_id=pad, use_cache=True,
            streamer=None if on_step is None else _StepHook(on_step),
        )  # (B, new tokens): with only inputs_embeds, generate returns the continuation alone
        answers, eos = [], self.vocab[EOS]
        for r, row in zip(requests, out.tolist()):
            if eos in row:
                row = row[: row.index(eos)]
            row = [t for t in row if t != pad]  # rows that stopped early are padded to the longest
            answer = self._finish(r, self.tokenizer.decode(row, skip_special_tokens=False).strip())
            answer.tokens = len(row)
            answers.append(answer)
        return answers

    def _finish(self, request: dict, text: str) -> Answer:
        if request["task"] != "grounding":
            return Answer(text)
        ref = request["images"].get("frontal", request["images"].get("lateral"))
        height, width = ref.shape
        boxes, problems = loc_tokens_to_boxes(text, width, height)
        if not boxes and not problems:
            problems.append("the answer holds no location tokens")
        return Answer(text, boxes, problems)

    @torch.no_grad()
    def generate_image(self, text: str, seed: int = 0, steps: int | None = None,
                       guidance: float | None = None) -> np.ndarray:
        """Text-to-CXR: the LM reads the report text (no image), the diffusion decoder draws (S, S) uint8."""
        return self.generate_images([text], seed, steps, guidance)[0]

    @torch.no_grad()
    def generate_images(self, texts: list[str], seed: int = 0, steps: int | None = None,
                        guidance: float | None = None) -> np.ndarray:
        """A batch of reports -> (n, S, S) uint8, sampled together (one seeded noise draw for the batch)."""
        from cxrfm.model.diffusion import pack_tokens

        if self.model.diffusion is None:
            raise ValueError("this model has no diffusion decoder (it was trained with model.diffusion.enabled=false)")
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("generate needs a non-empty report text for every image")
        rows = [prompt_ids(self.tokenizer, [], "generate", t, self.num_image_tokens) for t in texts]
        width = max(len(r) for r in rows)
        # Right padding: the LM is causal, so pads after a prompt never change its hidden states.
        ids = torch.tensor([r + [self.vocab[PAD]] * (width - len(r)) for r in rows], device=self.device)  # (n, T)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        embeds = self.model.language.get_input_embeddings()(ids)
        hidden = self.model.language.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (n, T, D)
        cond, cond_mask = pack_tokens(hidden, mask.bool(), self.model.cfg.diffusion.max_text_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        images = self.model.diffusion.sample(cond, cond_mask, num_steps=steps, guidance_scale=guidance, generator=generator)
        return images.cpu().numpy()

    # ---- one-call helpers per task -----------------------------------------------------------
    def report(self, images: dict[str, np.ndarray], indication: str = "", options: GenerationOptions | None = None) -> Answer:
        return self.generate_batch([{"task": "report", "images": images,
                                     "text": report_prompt(indication, "prior" in images)}], options)[0]

    def vqa(self, images: dict[str, np.ndarray], question: str, options: GenerationOptions | None = None) -> Answer:
        if not question.strip():
            raise ValueError("vqa needs a question")
        return self.generate_batch([{"task": "vqa", "images": images, "text": question}], options)[0]

    def grounding(self, images: dict[str, np.ndarray], phrase: str, options: GenerationOptions | None = None) -> Answer:
        if not phrase.strip():
            raise ValueError("grounding needs a phrase")
        return self.generate_batch([{"task": "grounding", "images": images, "text": phrase}], options)[0]


def draw_boxes(image: np.ndarray, boxes: list[tuple[float, float, float, float]], path: str | Path) -> None:
    from PIL import ImageDraw

    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for x1, y1, x2, y2 in boxes:
        draw.rectangle((x1, y1, x2, y2), outline=(255, 0, 0), width=max(1, image.shape[0] // 128))
    canvas.save(path)
