"""The multitask CXR model: vision encoder -> projector -> visual tokens interleaved into a causal LM.

Report, VQA and grounding are one format: a prompt with `<image>` placeholders and an answer that the
LM loss covers (answer tokens only). Several images per study (frontal, lateral, prior) are each
encoded and written into their own placeholders, in prompt order.

Load and save like transformers: `save_pretrained(dir)` writes config.json (the full cxrfm config +
vocab size), model.safetensors and, when given, the tokenizer; `from_pretrained(dir)` (= `load_export`)
needs neither Ray nor DeepSpeed. Build and load only through cxrfm.model.build: it decides attention,
kernels, device and dtype in the process that runs the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from cxrfm.config import Config, ModelConfig
from cxrfm.data.samples import ALL_TASKS, IGNORE, LM_TASKS, ROLES, VIEW_CLASSES
from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.model.diffusion import DiffusionDecoder, pack_tokens
from cxrfm.model.heads import LMHead, swap_rmsnorm
from cxrfm.model.language import build_language_model
from cxrfm.model.projector import Projector
from cxrfm.model.vision import VisionEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class MultitaskModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_token_id: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.vision = VisionEncoder(cfg.vision, attn_implementation)
        self.language = build_language_model(cfg.language, vocab_size, attn_implementation)
        head = LMHead(cfg.language.hidden_size, vocab_size, fused=cfg.fused_cross_entropy)
        if cfg.language.tie_word_embeddings:
            head.weight = self.language.get_input_embeddings().weight
        self.language.lm_head = head
        if cfg.fused_rmsnorm:
            swap_rmsnorm(self.language)
        # Text-to-CXR: a diffusion decoder conditioned on the LM's hidden states of the report text.
        self.diffusion = DiffusionDecoder(cfg.diffusion, cfg.language.hidden_size) if cfg.diffusion.enabled else None
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.language.hidden_size)
        # Auxiliary head: CheXpert observations from pooled patch features (training signal only).
        self.finding_head = nn.Linear(cfg.vision.hidden_size, len(CHEXPERT_LABELS)) if cfg.finding_loss_weight > 0 else None
        self.view_head = nn.Linear(cfg.vision.hidden_size, len(VIEW_CLASSES)) if cfg.view_loss_weight > 0 else None

    def enable_activation_checkpointing(self) -> None:
        for part in (self.language, self.vision.backbone):
            if not getattr(part, "supports_gradient_checkpointing", False):
                continue
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.x name
                part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor, image_present: torch.Tensor,
              patches: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every `<image>` position replaced by a visual token."""
        emb = self.language.get_input_embeddings()(input_ids)  # (B, T, D)
        if patches is None:
            patches = self.vision(images[image_present])  # (n, P, Dv): present images, batch-major, role order
        roles = image_present.nonzero(as_tuple=True)[1]  # (n,): each present image's role, same order as patches
        visual = self.projector(patches, roles)  # (n, N, D)
        slots = input_ids == self.image_token_id  # (B, T)
        if int(slots.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError(
                f"{int(slots.sum())} <image> positions but {visual.shape[0]} images x {visual.shape[1]} tokens; "
                "the prompt and the image stack disagree (model.projector.num_tokens changed after tokenizing?)"
            )
        return emb.masked_scatter(slots.unsqueeze(-1), visual.to(emb.dtype))

    def forward(self, input_ids, attention_mask, images, image_present, labels=None, task=None, findings=None,
                views=None) -> dict:
        """Without labels: logits (B, T, V). With labels: the mean answer-token loss and, given `task`,
        per-task loss sums and token counts. Logits are then computed at answer positions only.
        `findings` (B, 14) and `views` (B, 3) feed the auxiliary finding and view losses when the model has those heads."""
        patches = self.vision(images[image_present])  # (n, P, Dv)
        embeds = self.embed(input_ids, images, image_present, patches)
        hidden = self.language.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        if labels is None:
            return {"logits": self.language.lm_head(hidden)}
        # Next-token prediction: position t predicts labels[t + 1]; only answer tokens count.
        target = labels[:, 1:]  # (B, T-1)
        counted = target != IGNORE
        task = task if task is not None else torch.zeros(len(labels), dtype=torch.long, device=labels.device)
        out, total = {}, hidden.new_zeros((), dtype=torch.float32)
        lm_rows = torch.zeros((), dtype=torch.long, device=labels.device)
        for i, name in enumerate(LM_TASKS):
            sel = counted & (task == i).unsqueeze(1)  # (B, T-1)
            loss_sum = self.language.lm_head(hidden[:, :-1][sel], target[sel])  # fp32 scalar
            n_sel = sel.sum()
            if self.cfg.lm_loss_average == "task":  # this task's token mean x its rows (divided by all LM rows below)
                rows = (sel.any(1)).sum()
                lm_rows = lm_rows + rows
                total = total + loss_sum / n_sel.clamp(min=1) * rows
            else:
                total = total + loss_sum
            out[f"loss_sum/{name}"] = loss_sum.detach()
            out[f"tokens/{name}"] = n_sel
        n_tok = counted.sum()
        out["loss"] = total / (lm_rows if self.cfg.lm_loss_average == "task" else n_tok).clamp(min=1)
        out["tokens"] = n_tok
        if self.diffusion is not None:
            out["loss"] = out["loss"] + self._generate_loss(hidden, attention_mask, images, task, out)
        if self.finding_head is not None:
            out["loss"] = out["loss"] + self._finding_loss(patches, image_present, findings, out)
        if self.view_head is not None:
            out["loss"] = out["loss"] + self._view_loss(patches, image_present, views, out)
        return out

    def _finding_loss(self, patches, image_present, findings, out: dict) -> torch.Tensor:
        """Mean BCE of the study's CheXpert observations from each current image (frontal, lateral; a prior
        shows an older exam). Entries marked -1 (uncertain, unlabeled) do not count. Runs on every step,
        with 0 x the head's output when nothing is labeled, so ZeRO-3 ranks gather the head together."""
        logits = self.finding_head(patches.mean(dim=1)).float()  # (n, 14)
        if findings is None:
            findings = logits.new_full((image_present.shape[0], logits.shape[1]), -1.0)
        rows, roles = image_present.nonzero(as_tuple=True)  # (n,), (n,): same order as the patches
        target = findings[rows].float()  # (n, 14)
        keep = (target >= 0) & (roles != ROLES.index("prior")).unsqueeze(1)  # (n, 14)
        bce = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        n = keep.sum()
        loss = (bce * keep).sum() / n.clamp(min=1)
        out["loss_sum/findings"] = loss.detach() * n
        out["tokens/findings"] = n
        return self.cfg.finding_loss_weight * loss

    def _view_loss(self, patches, image_present, views, out: dict) -> torch.Tensor:
        """Mean cross-entropy of each shown image's view from its mean patch feature; -1 (unknown) does not
        count. Runs on every step like the finding loss (ZeRO-3 gathers the head on all ranks together)."""
        logits = self.view_head(patches.mean(dim=1)).float()  # (n, 3)
        rows, roles = image_present.nonzero(as_tuple=True)  # (n,), (n,): same order as the patches
        target = views[rows, roles] if views is not None else rows.new_full(rows.shape, -1)  # (n,)
        known = target >= 0  # (n,)
        n = known.sum()
        # masked rather than indexed: the head stays in the graph (0 x its output) with nothing to count
        loss = (F.cross_entropy(logits, target.clamp(min=0), reduction="none") * known).sum() / n.clamp(min=1)
        out["loss_sum/views"] = loss.detach() * n
        out["tokens/views"] = n
        return self.cfg.view_loss_weight * loss

    def _generate_loss(self, hidden, attention_mask, images, task, out: dict) -> torch.Tensor:
        """Diffusion loss of the `generate` rows. Their prompt is text only (no image placeholders), so the
        condition cannot have seen the target image. The decoder runs on every step, even with no such
        row (it then returns 0 x a dummy loss): ZeRO-3 gathers its weights collectively on all ranks."""
        gen = task == ALL_TASKS.index("generate")  # (B,)
        cond, cond_mask = pack_tokens(hidden[gen], attention_mask[gen].bool(), self.cfg.diffusion.max_text_tokens)
        loss = self.diffusion(images[gen][:, 0], cond, cond_mask)  # mean epsilon MSE, fp32
        n = gen.sum()
        out["loss_sum/generate"] = loss.detach() * n
        out["tokens/generate"] = n
        return self.cfg.diffusion.loss_weight * loss

    # ---- transformers-style persistence -------------------------------------------------------
    def save_pretrained(self, path: str | Path, full_config: Config | None = None, tokenizer=None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"vocab_size": self.vocab_size, "image_token_id": self.image_token_id,
                "config": full_config.dump() if full_config else {"model": self.cfg.model_dump(mode="json")}}
        state = state_dict if state_dict is not None else self.state_dict()
        # safetensors refuses shared storage; untie explicitly so exports load anywhere.
        state = {k: v.detach().contiguous().clone() for k, v in state.items()}
        save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
        (path / CONFIG).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", dtype: str | torch.dtype | None = "auto",
                        attention: str | None = None) -> "MultitaskModel":
        """transformers-style loading; the same as `cxrfm.model.build.load_export` (the one entry point)."""
        from cxrfm.model.build import load_export  # here: build.py imports this module

        return load_export(path, device=device, dtype=dtype, attention=attention)
