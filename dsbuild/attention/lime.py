"""LIME-style attention regularisation inside an InstructPix2Pix editor's UNet.

LIME (Simsar et al., WACV 2025) penalises, inside the region of interest, the cross-attention
scores of the tokens unrelated to the edit: ``R(QKᵀ, M)[i, t] = QKᵀ[i, t] − α`` where the
query position ``i`` lies in the mask (``M_i = 1``) and ``t`` is an unrelated token (start of
text, end of text, padding, function words), then ``softmax(R / √d)``. Here the edit's tokens
are the content words of the instruction; every other token is penalised. The penalty is an
additive ``attn_mask`` of ``−α/√d`` handed to fused SDPA, so no attention map is materialised.

It acts on cross-attention layers only (``layers``: which of down/mid/up), on the rows that
carry the instruction (the text-conditional third of InstructPix2Pix's guidance batch), for
steps in ``[start·steps, end·steps)``. An empty mask adds nothing: the edit is plain editing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dsbuild.core.settings.localize import RegularisationSettings


def penalty_bias(mask: torch.Tensor, edit_tokens: torch.Tensor, alpha: float, head_dim: int,
                 hw: tuple[int, int]) -> torch.Tensor:
    """The additive SDPA bias ``[B, 1, h·w, L]``: ``−α/√d`` where the query lies in ``mask``
    (``[B, H, W]`` in {0, 1}, resized to ``hw``) and the token is not an edit token
    (``edit_tokens``: ``[B, L]`` bool), 0 elsewhere."""
    m = F.interpolate(mask[:, None].float(), size=hw, mode="area")[:, 0].ge(0.5)
    m = m.flatten(1).float()  # [B, N]
    unrelated = (~edit_tokens.bool()).float()  # [B, L]
    return (-alpha * head_dim ** -0.5) * m[:, None, :, None] * unrelated[:, None, None, :]


def regularised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention with the LIME penalty (``bias`` from :func:`penalty_bias`) added."""
    bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias if attn_mask is None else attn_mask + bias)


class LocalizeController:
    """Per-run state for the processors: mask, edit tokens, step window, layers, α."""

    def __init__(self, settings: RegularisationSettings):
        settings.check()
        self.s = settings
        self.active = False
        self.step = 0
        self.calls = 0  # attention calls that carried the penalty (tests read it)

    def configure(self, mask: torch.Tensor, edit_tokens: torch.Tensor, steps: int,
                  latent_hw: tuple[int, int]) -> None:
        """Start one edit of ``B`` images: ``mask`` [B, H, W], ``edit_tokens`` [B, L]."""
        self.mask, self.edit_tokens, self.steps = mask, edit_tokens, steps
        self.latent_hw = latent_hw
        self.step, self.calls = 0, 0
        self._bias: dict[tuple, torch.Tensor] = {}
        # an empty mask changes nothing: leave every layer on plain SDPA
        self.active = bool(mask.bool().any()) and self.s.alpha > 0

    def reset(self) -> None:
        self.active = False
        self._bias = {}

    def in_window(self) -> bool:
        return self.s.start * self.steps <= self.step < self.s.end * self.steps

    def wants(self, name: str) -> bool:
        return name.split("_", 1)[0] in self.s.layers and ".attn2." in name

    def attend(self, name: str, is_cross: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B = self.mask.shape[0]
        if not (is_cross and self.wants(name) and self.in_window()) or q.shape[0] % B:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        N, L, d = q.shape[2], k.shape[2], q.shape[3]
        key = (N, L, d, q.shape[0], q.device, q.dtype)
        bias = self._bias.get(key)
        if bias is None:
            H, W = self.latent_hw
            f = max(1, round((H * W / N) ** 0.5))
            own = penalty_bias(self.mask.to(q.device), self.edit_tokens.to(q.device),
                               self.s.alpha, d, (H // f, W // f))
            # the instruction's rows come first (InstructPix2Pix: text, no text, no image)
            bias = torch.zeros(q.shape[0], 1, N, L, device=q.device, dtype=q.dtype)
            bias[:B] = own.to(q.dtype)
            self._bias[key] = bias
        self.calls += 1
        return regularised_attention(q, k, v, bias, mask)


def edit_token_mask(tokenizer, instructions: list[str]) -> torch.Tensor:
    """``[B, L]`` bool: the tokens of each instruction's content words (LIME's related tokens;
    start/end of text, padding and function words are the unrelated ones)."""
    from dsbuild.attention.align import is_content, max_length, prompt_words, token_weights

    L = max_length(tokenizer)
    rows = []
    for text in instructions:
        words, _ = prompt_words(tokenizer, text)
        content = [w.text for w in words if is_content(w.text)]
        rows.append(token_weights(words, content, L).bool())
    return torch.stack(rows)


@contextmanager
def regularised(pipe, controller: LocalizeController):
    """Put localize processors on every attention layer of ``pipe.unet`` for the block; the
    pipeline's own processors come back afterwards, so a loaded editor can be reused."""
    from dsbuild.attention.processors import P2PAttnProcessor

    unet = pipe.unet
    before = dict(unet.attn_processors)
    unet.set_attn_processor({n: P2PAttnProcessor(controller, n) for n in before})
    try:
        yield controller
    finally:
        controller.reset()
        unet.set_attn_processor(before)


def step_callback(controller: LocalizeController):
    """A diffusers ``callback_on_step_end`` that tells the controller which step comes next."""
    def callback(pipe, i, t, kwargs):
        controller.step = i + 1
        return kwargs
    return callback
