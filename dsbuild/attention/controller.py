"""All per-run Prompt-to-Prompt state in one object; processors only call ``attend``.

A UNet batch holds ``2R`` rows: R unconditional then R conditional, one per image (or only the
R conditional rows when no row uses classifier-free guidance: few-step models at guidance 0
or 1). Every image row is a source or a target; a target names its source row. Edits are linear in the
attention map columns, so they run on fused SDPA without materialised probabilities:

- self-attention injection: ``softmax(Q_src K_srcᵀ) V_tgt`` = SDPA(Q_src, K_src, V_tgt);
- cross-attention replace/refine/reweight: the edited map is ``A_src M + A_tgt diag(c)``
  (M maps source tokens to target columns, scaled by the per-word step window and the
  equalizer), so the output is SDPA(Q_src, K_src, M V_tgt) + SDPA(Q_tgt, K_tgt, c ⊙ V_tgt);
- local blend is the one place that materialises probabilities: the chosen words' maps at
  the lowest attention resolution, only for the rows that blend (both sides in one product).

Self-attention injection applies to both guidance halves (as InstructPix2Pix); cross-attention
edits apply to the conditional half (as Prompt-to-Prompt).

Chains (multi-turn sessions, dsbuild.core.sessions): a target's source row may itself be a
target (a session node reads its parent's row). It then reads the parent's *edited* attention,
the map the parent's image was made with: self-attention composes the row indices (a child
reads whatever row its parent reads), and the edited cross map, linear in the maps, expands
into one term per edited ancestor, ``A_r = A_p M_r' + A_r diag(c_r)`` with ``A_p`` itself
``A_g M_p' + A_p diag(c_p)``, each term one SDPA. Local blend reads the parent's edited maps
on the source side and blends parents first, so a child blends with its parent's post-blend
latents. A batch without chains runs exactly the single-edit path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsbuild.attention.align import Alignment


def _rows(mask: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of the rows whose keys are used (masks follow their keys' row)."""
    return mask if mask is None or mask.shape[0] == 1 else mask[idx]


@dataclass
class RowEdit:
    """How one target row is edited relative to its source row."""

    source: int  # row index of the source image
    self_replace: float = 0.0  # fraction of steps reusing the source's self-attention
    alignment: Alignment | None = None  # None: no cross-attention edit
    cross_replace: torch.Tensor | None = None  # [L] per-token fraction of steps
    equalizer: torch.Tensor | None = None  # [L] per-token scale (reweight), default 1
    blend_src: torch.Tensor | None = None  # [L] source tokens whose maps form the blend mask
    blend_tgt: torch.Tensor | None = None  # [L] target tokens whose maps form the blend mask
    segment_phrase: str | None = None  # blend_mask=segment: what to segment in the source


class P2PController:
    """Per-run edit state: which rows read which, step windows, blend maps and masks."""

    def __init__(self, blend_threshold: float = 0.3, blend_start: float = 0.2):
        self.active = False
        self.blend_threshold = blend_threshold
        self.blend_start = blend_start
        self.blend_layers: set[str] = set()
        self.last_mask: torch.Tensor | None = None
        self.zero_kv_layers: set[str] = set()
        self.zero_uncond = False
        self.calls = {"self_injected": 0, "cross_edited": 0, "probs": 0, "uncond_skipped": 0}
        # blend_mask=segment: (source x0 latents [n, C, h, w], phrases) -> [n, 1, h, w] bool
        self.segment = None

    # ------------------------------------------------------------------ setup
    def set_layers(self, names: list[str], unet) -> None:
        """Blend reads the cross-attention layers at the lowest down/up attention resolution."""
        n_up = len(unet.up_blocks)
        levels: dict[str, int] = {}
        for n in names:
            if ".attn2." not in n:
                continue
            m = re.match(r"(down|up)_blocks\.(\d+)\.", n)
            if m:
                i = int(m.group(2))
                levels[n] = i if m.group(1) == "down" else n_up - 1 - i
        if levels:
            top = max(lv for n, lv in levels.items() if n.startswith("down")) \
                if any(n.startswith("down") for n in levels) else max(levels.values())
            self.blend_layers = {n for n, lv in levels.items() if lv == top}
        # cross-attention layers whose keys and values of all-zero text states are zero (no
        # bias, no norm of the text states): their output there is exactly zero
        for n in names:
            if ".attn2." in n:
                a = unet.get_submodule(n.removesuffix(".processor"))
                if a.to_k.bias is None and a.to_v.bias is None and not a.norm_cross:
                    self.zero_kv_layers.add(n)

    def configure(self, n_rows: int, edits: dict[int, RowEdit], steps: int, device,
                  dtype, cfg: bool = True, zero_uncond: bool = False) -> None:
        """Start a run of ``n_rows`` images; ``edits`` maps target row -> its edit. ``cfg``:
        the UNet batch has the unconditional half before the conditional one; ``zero_uncond``:
        that half's text states are all zero (SDXL's force_zeros_for_empty_prompt), so the
        cross-attention of a zero-key/value layer is computed for the conditional half only."""
        self.R, self.edits, self.steps = n_rows, edits, steps
        # rows in the UNet batch, and where its conditional half starts
        self.B, self.C = (2 * n_rows, n_rows) if cfg else (n_rows, 0)
        self.zero_uncond = bool(cfg and zero_uncond)
        self.device, self.dtype = device, dtype
        self.depth = _depths(edits)
        # parents first: a chained row's edit is built on its parent's, already resolved
        self.order = sorted(edits, key=lambda r: (self.depth[r], r))
        self.chained = any(e.source in edits for e in edits.values())
        self.blend_rows = [r for r, e in edits.items()
                           if e.blend_tgt is not None or e.blend_src is not None]
        self.maps_src: torch.Tensor | None = None
        self.maps_tgt: torch.Tensor | None = None
        self.maps_seen = False
        if self.blend_rows:
            first = edits[self.blend_rows[0]]
            z = torch.zeros_like(first.blend_tgt if first.blend_tgt is not None
                                 else first.blend_src)
            self.b_tgt = torch.stack([edits[r].blend_tgt if edits[r].blend_tgt is not None
                                      else z for r in self.blend_rows]).to(device, torch.float32)
            self.b_src = torch.stack([edits[r].blend_src if edits[r].blend_src is not None
                                      else z for r in self.blend_rows]).to(device, torch.float32)
            # decided once per run, not per layer or step: a side no row names is never computed
            self.use_tgt, self.use_src = bool(self.b_tgt.any()), bool(self.b_src.any())
            self.blend_idx = torch.tensor(self.blend_rows, device=device)
            self.blend_src_idx = torch.tensor([edits[r].source for r in self.blend_rows],
                                              device=device)
            # conditional-half rows; a source shared by several targets is computed once
            self.b_rows = self.blend_idx + self.C
            # blend levels (parents first): positions into blend_rows, by depth
            levels: dict[int, list[int]] = {}
            for j, r in enumerate(self.blend_rows):
                levels.setdefault(self.depth[r], []).append(j)
            self.blend_levels = [torch.tensor(levels[d], device=device) for d in sorted(levels)]
            self.b_src_rows, self.b_src_inv = torch.unique(self.blend_src_idx + self.C,
                                                           return_inverse=True)
            self._plan_maps()
            if self.segment is not None:  # the mask is segmented, not read from attention
                self.use_tgt = self.use_src = False
                self.seg_phrases = [edits[r].segment_phrase or "" for r in self.blend_rows]
        self.seg_mask: torch.Tensor | None = None
        self.last_mask = None
        self.x_terms, self.x_maps = None, {}
        self.active = True

    def reset(self) -> None:
        """Back to plain SDPA everywhere."""
        self.active = False
        self.zero_uncond = False
        self.edits = {}
        self.maps_src = self.maps_tgt = None

    # ------------------------------------------------------------------ per step
    def begin_step(self, i: int) -> None:
        """Work out, once per step, which rows read which (not once per layer)."""
        C, dev = self.C, self.device
        self.step = i
        self_rows = [(r, self.edits[r].source) for r in self.order
                     if i < int(self.edits[r].self_replace * self.steps)]
        if self_rows:
            idx = torch.arange(self.B, device=dev)
            for r, s in self_rows:  # parents first: a child reads what its parent reads
                idx[r], idx[C + r] = idx[s], idx[C + s]  # both halves (one without CFG)
            self.self_idx = idx
        else:
            self.self_idx = None
        rows, srcs, mats, cs = [], [], [], []
        edited: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (M', c) this step
        for r in self.order:
            e = self.edits[r]
            if e.alignment is None:
                continue
            w = (i < (e.cross_replace * self.steps).floor()).float()
            if not bool(w.any()):
                continue
            we = w * e.equalizer if e.equalizer is not None else w
            mats.append(e.alignment.mapper * we[None, :])
            cs.append(we * (1 - e.alignment.alpha) + (1 - w))
            edited[r] = (mats[-1], cs[-1])
            rows.append(C + r)
            srcs.append(C + e.source)
        self.x_terms = None
        self.x_maps: dict[int, list[tuple[int, torch.Tensor]]] = {}
        chain = bool(rows) and any(e.source in edited for e in self.edits.values())
        if chain:  # the main SDPA reads each row's first unedited ancestor
            self._chain_terms(edited)
            srcs, mats = self._chain_top
        if rows:
            self.x_rows = torch.tensor(rows, device=dev)
            idx = torch.arange(self.B, device=dev)
            idx[self.x_rows] = torch.tensor(srcs, device=dev)
            self.x_idx = idx
            self.x_M = torch.stack(mats).to(dev, self.dtype)
            c = torch.stack(cs)
            self.x_c = c.to(dev, self.dtype) if bool((c != 0).any()) else None
        else:
            self.x_rows = None

    def _chain_terms(self, edited: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A chained step: each edited row's map as a sum of its ancestors' own maps,
        ``A_r = sum_a A_a W_a`` (W_a [L, L] acting on the row's values). The first unedited
        ancestor's term runs in the main SDPA (``x_idx``, ``x_M``), the row's own as without
        chains (``x_c``), each edited ancestor's own as an extra SDPA term (``x_terms``)."""
        dev, C = self.device, self.C
        maps: dict[int, list[tuple[int, torch.Tensor]]] = {}  # row -> [(row a, W_a)]
        top: dict[int, tuple[int, torch.Tensor]] = {}
        out_rows, qk_rows, ws = [], [], []
        for r in self.order:
            if r not in edited:
                continue
            m, c = edited[r]
            s = self.edits[r].source
            up = maps.get(s, [(s, None)])  # an unedited parent: its own map
            terms = [(a, m if w is None else w @ m) for a, w in up]
            terms.append((r, torch.diag(c)))
            maps[r] = terms
            top[r] = terms[0]
            for a, w in terms[1:-1]:  # the row's own term is x_c's, as without chains
                if bool((w != 0).any()):
                    out_rows.append(C + r)
                    qk_rows.append(C + a)
                    ws.append(w)
        self.x_maps = maps
        srcs = [C + top[r][0] for r in self.order if r in edited]
        mats = [top[r][1] for r in self.order if r in edited]
        self._chain_top = (srcs, mats)
        if out_rows:
            self.x_terms = (torch.tensor(out_rows, device=dev), torch.tensor(qk_rows, device=dev),
                            torch.stack(ws).to(dev, self.dtype))

    # ------------------------------------------------------------------ attention
    def attend(self, name: str, is_cross: bool, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The attention op of one layer for the whole batch (q, k, v: [B, heads, N, d])."""
        if q.shape[0] != self.B:  # not a batch this controller planned: leave it alone
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if not is_cross:
            if self.self_idx is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            self.calls["self_injected"] += 1
            idx = self.self_idx
            return F.scaled_dot_product_attention(q[idx], k[idx], v, attn_mask=_rows(mask, idx))
        if self.blend_rows and name in self.blend_layers and (self.use_src or self.use_tgt):
            self._store_blend_maps(q, k)
        C = self.C
        if self.zero_uncond and mask is None and name in self.zero_kv_layers:
            # the unconditional half reads zero keys and values: its output is exactly zero
            self.calls["uncond_skipped"] += 1
            out = q.new_zeros(*q.shape[:-1], v.shape[-1])
            out[C:] = self._cross(q[C:], k[C:], v[C:], None, C)
            return out
        return self._cross(q, k, v, mask, 0)

    def _cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, off: int) -> torch.Tensor:
        """Cross-attention with this step's edits, on the batch rows from ``off`` on."""
        if self.x_rows is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        self.calls["cross_edited"] += 1
        rows = self.x_rows - off if off else self.x_rows
        idx = self.x_idx[off:] - off if off else self.x_idx
        v2 = v.clone()
        v2[rows] = torch.einsum("rst,rhtd->rhsd", self.x_M, v[rows])
        out = F.scaled_dot_product_attention(q[idx], k[idx], v2, attn_mask=_rows(mask, idx))
        if self.x_c is not None:
            own = F.scaled_dot_product_attention(q[rows], k[rows],
                                                 v[rows] * self.x_c[:, None, :, None],
                                                 attn_mask=_rows(mask, rows))
            out[rows] = out[rows] + own
        if self.x_terms is not None:  # a chain: the rows' own and edited ancestors' terms
            o_rows, a_rows, W = self.x_terms
            if off:
                o_rows, a_rows = o_rows - off, a_rows - off
            vv = torch.einsum("nst,nhtd->nhsd", W, v[o_rows])
            extra = F.scaled_dot_product_attention(q[a_rows], k[a_rows], vv,
                                                   attn_mask=_rows(mask, a_rows))
            out = out.index_add(0, o_rows, extra)
        return out

    # ------------------------------------------------------------------ local blend
    def _plan_maps(self) -> None:
        """One product per blend layer for both sides: the rows whose maps are read (the
        blending targets, then each distinct source once) and, as columns, every blend row's
        token weights (target sides, then source sides)."""
        n = len(self.blend_rows)
        rows, cols, dev = [], [], self.device
        ar = torch.arange(n, device=dev)
        if self.use_tgt:
            rows.append(self.b_rows)
            cols.append(self.b_tgt)
            self.sel_tgt = (ar, ar)
        if self.use_src:
            off = self.b_rows.numel() if self.use_tgt else 0
            rows.append(self.b_src_rows)
            cols.append(self.b_src)
            self.sel_src = (off + self.b_src_inv, ar + (n if self.use_tgt else 0))
        if rows:
            self.map_rows = torch.cat(rows)
            self.map_w = torch.cat(cols).T.contiguous()  # [L, sides * n]

    def _store_blend_maps(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Head-mean attention probabilities of the chosen tokens (materialised here only), for
        both sides in one product: ``mean_h softmax(QKᵀ/√d)`` of the rows read, times every
        blend row's token weights. ``calls["probs"]`` counts the sides computed."""
        self.calls["probs"] += int(self.use_tgt) + int(self.use_src)
        rows = self.map_rows
        scale = q.shape[-1] ** -0.5
        probs = torch.softmax((q[rows].float() @ k[rows].float().transpose(-1, -2)) * scale, -1)
        out = probs.mean(1) @ self.map_w  # [rows, N, columns]
        if self.use_tgt:
            m = out[self.sel_tgt[0], :, self.sel_tgt[1]]
            self.maps_tgt = m if self.maps_tgt is None else self.maps_tgt.add_(m)
        if self.use_src:
            m = out[self.sel_src[0], :, self.sel_src[1]]
            if self.x_maps:  # a chain: a source edited this step is read by its edited map
                m = self._chained_src_maps(q, k, m, scale)
            self.maps_src = m if self.maps_src is None else self.maps_src.add_(m)
        self.maps_seen = True

    def _chained_src_maps(self, q: torch.Tensor, k: torch.Tensor, m: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """The source-side blend maps of the rows whose source is edited at this step: the
        source's edited map ``sum_a A_a W_a`` times the blend words' weights."""
        C, m = self.C, m.clone()
        for j, r in enumerate(self.blend_rows):
            terms = self.x_maps.get(self.edits[r].source)
            if not terms:
                continue
            acc = None
            for a, w in terms:
                probs = torch.softmax((q[C + a].float() @ k[C + a].float().transpose(-1, -2))
                                      * scale, -1).mean(0)  # [N, L]
                part = probs @ (w.to(probs) @ self.b_src[j])
                acc = part if acc is None else acc + part
            m[j] = acc
        return m

    def _mask(self, maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        H, W = hw
        f = max(1, round((H * W / maps.shape[1]) ** 0.5))
        m = maps.reshape(maps.shape[0], 1, H // f, W // f)
        m = F.max_pool2d(m, 3, 1, padding=1)
        m = F.interpolate(m, size=(H, W))
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return m.gt(self.blend_threshold)

    def after_step(self, latents: torch.Tensor, i: int,
                   x0: torch.Tensor | None = None) -> torch.Tensor:
        """Local blend: outside the chosen words' mask a target's latents become its source's.
        With ``segment``, the mask is the source's words segmented in its predicted image
        ``x0`` (else the latents) at the first blending step, and kept."""
        if not self.blend_rows or i < int(self.blend_start * self.steps):
            return latents
        hw = tuple(latents.shape[-2:])
        if self.segment is not None:
            if self.seg_mask is None:
                pred = x0 if x0 is not None else latents
                self.seg_mask = self.segment(pred[self.blend_src_idx], self.seg_phrases)
            mask = self.seg_mask.to(latents.device, latents.dtype)
        else:
            if not self.maps_seen:
                return latents
            mask = torch.zeros(len(self.blend_rows), 1, *hw, dtype=torch.bool,
                               device=latents.device)
            if self.use_tgt:
                mask |= self._mask(self.maps_tgt, hw)
            if self.use_src:
                mask |= self._mask(self.maps_src, hw)
            mask = mask.to(latents.dtype)
        rows, srcs = self.blend_idx, self.blend_src_idx
        latents = latents.clone()
        for lv in self.blend_levels:  # parents first: a child blends with its parent's result
            r, sr = rows[lv], srcs[lv]
            latents[r] = latents[sr] + mask[lv] * (latents[r] - latents[sr])
        self.last_mask = mask
        return latents


def _depths(edits: dict[int, RowEdit]) -> dict[int, int]:
    """Each target row's depth: 1 when its source is no target, else its source's + 1."""
    out: dict[int, int] = {}
    for r in edits:
        seen, chain, row = set(), [], r
        while row in edits and row not in out:
            if row in seen:
                raise ValueError(f"P2P rows {sorted(seen)} read each other in a cycle")
            seen.add(row)
            chain.append(row)
            row = edits[row].source
        d = out.get(row, 0)
        for row in reversed(chain):
            d += 1
            out[row] = d
    return out
