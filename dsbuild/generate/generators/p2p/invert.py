"""Real photos for Prompt-to-Prompt: the photo's latent inverted under its caption.

The photo is VAE-encoded (the latent distribution's mean, as the P2P authors' notebook does) and
DDIM-inverted under its caption with the conditional branch alone, which gives the start latent
x_T and the DDIM trajectory. Plain DDIM inversion drifts once classifier-free guidance amplifies
the difference between the conditional and the unconditional branch, so one of two fixes gives
each sampling step its own unconditional embedding:

- ``negative-prompt`` (Miyake et al., "Negative-prompt Inversion"): the unconditional embedding
  is the source caption's own, so the guided prediction is the conditional one and sampling
  retraces the inversion. No optimisation: the inversion costs one extra pass of ``steps``
  UNet calls on one row.
- ``null-text`` (Mokady et al., google/prompt-to-prompt ``null_text_w_ptp.ipynb``): per
  timestep, starting from the empty caption's embedding (or the previous step's result), Adam
  optimises the unconditional embedding so that the guided DDIM step lands on the inversion's
  trajectory: at most 10 inner steps, learning rate 1e-2 * (1 - i/100) at step i, early stop
  when the latent MSE is below 1e-5 + i * 2e-5. Up to 10 forward + backward passes per step
  on top of the inversion, and it depends on the guidance scale.

Sampling then runs DDIM (eta 0) from x_T with those per-step embeddings; the source branch
reconstructs the photo. An :class:`Inverter` keeps each inversion in a folder of the build
(``pairs/inversions/<key>.pt``, written atomically), keyed by (photo id, model, caption, steps,
method, guidance — the last only for null-text), so every variant of a photo and a resumed run
reuse it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.pause import pause_point

METHODS = ("negative-prompt", "null-text")
INNER_STEPS = 10  # the notebook's num_inner_steps
EPSILON = 1e-5  # its early_stop_epsilon


@dataclass
class Inversion:
    """One photo inverted: the start latent, each step's unconditional embedding and the
    photo's VAE round trip (what the reconstruction is measured against)."""

    latents: torch.Tensor  # [C, h, w] x_T
    uncond: torch.Tensor  # [steps, L, D]
    round_trip: np.ndarray  # H x W x 3 float in [0, 1]: decode(encode(photo))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [0, 1] images (capped at 100 dB for identical ones)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 100.0 if mse <= 1e-10 else round(float(10 * np.log10(1.0 / mse)), 3)


def ddim(scheduler_config, steps: int, device):
    """The DDIM scheduler (eta 0) inversion and photo sampling both use."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, device=device)
    return sched


class Inverter:
    """Inversions of photos on one P2P sampler's model, cached in ``folder`` (None: none)."""

    def __init__(self, sampler, model: str, method: str, folder: Path | None = None):
        if method not in METHODS:
            raise DsbuildError(f"generate.inversion must be one of {', '.join(METHODS)} "
                               f"(got {method!r})")
        if sampler.xl:
            raise DsbuildError("generate.model: P2P on real photos (inversion) runs on SD "
                               "1.x/2.x checkpoints; this one is SDXL, pick an SD 1.x/2.x "
                               "model for photo builds")
        self.sampler, self.model, self.method = sampler, model, method
        self.folder = Path(folder) if folder is not None else None
        self.computed = 0  # inversions computed in this process (a loaded one is not)
        self.loaded = 0  # inversions reused (from this process or the folder)
        self._memo: dict[str, Inversion] = {}

    def key(self, photo_id: str, caption: str, steps: int, guidance: float) -> str:
        g = float(guidance) if self.method == "null-text" else None
        return content_id("inversion", photo_id, self.model, caption, steps, self.method, g)

    def get(self, photo_id: str, image: np.ndarray, caption: str, steps: int,
            guidance: float) -> Inversion:
        """The photo's inversion: reused when this process or the folder has it, else
        computed and written there (atomically) before it is used."""
        key = self.key(photo_id, caption, steps, guidance)
        if key in self._memo:
            self.loaded += 1
            return self._memo[key]
        if len(self._memo) > 64:
            self._memo.clear()
        inv = self._memo[key] = self._read_or_invert(key, image, caption, steps, guidance)
        return inv

    def _read_or_invert(self, key, image, caption, steps, guidance) -> Inversion:
        path = None
        if self.folder is not None:
            path = self.folder / f"{key}.pt"
            if path.exists():
                data = torch.load(path, map_location="cpu", weights_only=False)
                self.loaded += 1
                return Inversion(data["latents"], data["uncond"], data["round_trip"])
        inv = self.invert(image, caption, steps, guidance)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"latents": inv.latents, "uncond": inv.uncond,
                        "round_trip": inv.round_trip}, tmp)
            os.replace(tmp, path)
            pause_point(self.folder, sum(1 for _ in self.folder.glob("*.pt")))
        return inv

    # ------------------------------------------------------------------ the inversion
    def _unet(self, latents, t, emb):
        return self.sampler.pipe.unet(latents.to(self.sampler.dtype), t,
                                      encoder_hidden_states=emb.to(self.sampler.dtype),
                                      return_dict=False)[0].float()

    @staticmethod
    def _eps_x0(out, x, a):
        """(epsilon, x0) from a model output at a noise level with alpha_cumprod ``a``."""
        if out.shape != x.shape:
            raise DsbuildError("generate.model: its UNet predicts a different shape than its "
                               "latents; inversion needs an epsilon or v prediction UNet")
        return out, (x - (1 - a) ** 0.5 * out) / a ** 0.5

    def _move(self, sched, out, x, a_from, a_to):
        """A deterministic DDIM move from noise level ``a_from`` to ``a_to``."""
        kind = sched.config.prediction_type
        if kind == "v_prediction":
            x0 = a_from ** 0.5 * x - (1 - a_from) ** 0.5 * out
            eps = a_from ** 0.5 * out + (1 - a_from) ** 0.5 * x
        elif kind == "epsilon":
            eps, x0 = self._eps_x0(out, x, a_from)
        else:
            raise DsbuildError(f"generate.model: its scheduler predicts {kind!r}; inversion "
                               "needs an epsilon or v_prediction model")
        return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps

    @staticmethod
    def _alphas(sched, t):
        """(alpha_cumprod at t, at the step before t) as DDIMScheduler.step reads them."""
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[int(t)]
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        return a_t.float(), torch.as_tensor(a_prev).float()

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The photo's latent (the distribution's mean, scaled) and its VAE round trip."""
        vae = self.sampler.pipe.vae
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)[None]
        x = (x * 2 - 1).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        return z.float(), self.sampler.decode(z)[0]

    def invert(self, image: np.ndarray, caption: str, steps: int, guidance: float,
               method: str | None = None) -> Inversion:
        """DDIM inversion, then ``method`` (default: this inverter's; ``"ddim"``: none, the
        empty caption's embedding at every step, the plain baseline)."""
        method = method or self.method
        s = self.sampler
        dev = s.device
        z0, round_trip = self.encode(image)
        sched = ddim(s.pipe.scheduler.config, steps, dev)
        ts = sched.timesteps
        cond = s.encode([caption]).float()
        trajectory = [z0]
        z = z0
        with torch.no_grad():
            for t in reversed(ts):  # x_0 -> x_T: each step run backwards
                a_t, a_prev = self._alphas(sched, t)
                z = self._move(sched, self._unet(z, t, cond), z, a_prev, a_t)
                trajectory.append(z)
        if method == "negative-prompt":
            uncond = cond.expand(len(ts), -1, -1)
        elif method == "ddim":
            uncond = s.unconditional(1)[0].float().expand(len(ts), -1, -1)
        else:
            uncond = self._null_text(sched, trajectory, cond, guidance)
        self.computed += 1
        return Inversion(trajectory[-1][0].cpu(), uncond.detach().cpu().contiguous().clone(),
                         round_trip)

    def _null_text(self, sched, trajectory, cond, guidance: float) -> torch.Tensor:
        """Null-text inversion: each step's unconditional embedding optimised (Adam) so the
        guided DDIM step lands on the inversion's trajectory."""
        ts = sched.timesteps
        n = len(ts)
        uncond = self.sampler.unconditional(1)[0].float()
        out = []
        latent = trajectory[-1]
        for i, t in enumerate(ts):
            a_t, a_prev = self._alphas(sched, t)
            target = trajectory[n - i - 1]
            uncond = uncond.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
            with torch.no_grad():
                n_cond = self._unet(latent, t, cond)
            for _ in range(INNER_STEPS):
                with torch.enable_grad():
                    n_unc = self._unet(latent, t, uncond)
                    noise = n_unc + guidance * (n_cond - n_unc)
                    rec = self._move(sched, noise, latent, a_t, a_prev)
                    loss = torch.nn.functional.mse_loss(rec, target)
                    # the embedding's gradient only (no .grad on the shared UNet's weights)
                    (uncond.grad,) = torch.autograd.grad(loss, [uncond])
                opt.step()
                if loss.item() < EPSILON + i * 2e-5:
                    break
            uncond = uncond.detach()
            out.append(uncond[0])
            with torch.no_grad():
                n_unc = self._unet(latent, t, uncond)
                latent = self._move(sched, n_unc + guidance * (n_cond - n_unc), latent, a_t,
                                    a_prev)
        return torch.stack(out)
