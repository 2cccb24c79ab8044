"""The training loop that ``dsbuild train`` and ``dsbuild train-generator`` share.

A trainer supplies a *denoising objective* (``loss_fn(micro, generator) -> loss``: which rows,
how they are noised and what the model is asked to predict); this module owns everything
else: the output folder's guard, accelerate's gradient accumulation, clipping, the optimizer
and LR steps, EMA, checkpoints written atomically and pruned, ``--resume`` state (optimizer
step, data position and the seeded generator, through ``register_for_checkpointing``),
validation hooks, progress and the test kill switch. So both commands resume exactly.

The output folder is locked for the whole run (a second run into it is refused, naming the
holder, or waits with ``--wait``); the final step is checkpointed too, so ``--resume latest``
on a finished folder has nothing to redo; a write that fails (disk full) is one line naming
the file, and a failed run takes back what nothing can resume from (temp checkpoints, a half
saved model, a folder it claimed but never checkpointed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from dsbuild.core.errors import DsbuildError, MissingDependency, WriteFailed
from dsbuild.core.progress import progress

RUN_FILE = "dsbuild-train.json"  # settings of the run that owns the folder (written first)
KILL_ENV = "DSBUILD_TRAIN_KILL_AFTER_STEP"  # tests: SIGKILL self after this step (no cleanup)
MODEL_TMP = ".model.tmp"  # the finished model is saved here, then moved into the folder
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def lock_out(out: Path, command: str):
    """The lock of an output folder, held for a whole run: a file beside the folder (so a
    refused run writes nothing into it), with the message and ``--wait`` of stage locks."""
    from dsbuild.core import locks

    real = out.resolve()
    return locks.hold(real.parent / f".{real.name}.lock", f"the {command} run into {out}")


def write_failed(path: Path, exc: BaseException, fix: str) -> WriteFailed:
    """One line for a failed write: the file, the system's reason, the space left, the fix."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return WriteFailed(f"cannot write {path} ({' '.join(reason.split())[:200]}; {free}); {fix}")


@contextlib.contextmanager
def writing(path: Path, fix: str, remove: Path | None = None) -> Iterator[None]:
    """Around a save: a failed write (torch's writer raises RuntimeError on a full disk,
    safetensors its own error) becomes one WriteFailed line naming ``path``; ``remove`` (the
    save's temp folder) is deleted first."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, OSError | RuntimeError) and \
                type(exc).__name__ != "SafetensorError":
            raise
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        raise write_failed(path, exc, fix) from None


@contextlib.contextmanager
def output_folder(out: Path, command: str) -> Iterator[None]:
    """Hold OUT's lock for the run; when the run fails, take back what nothing can resume from
    (the folder's claim, validation grids and the folder itself, if the run claimed it and
    wrote no checkpoint); a disk error anywhere becomes one WriteFailed line. Under
    ``accelerate launch`` only the main process (``RANK`` 0) locks and tidies."""
    main = int(os.environ.get("RANK", "0") or 0) == 0
    with lock_out(out, command) if main else contextlib.nullcontext():
        fresh, claimed = not out.exists(), (out / RUN_FILE).exists()
        try:
            yield
        except BaseException as exc:
            if main and not claimed and (out / RUN_FILE).exists() and not checkpoints(out):
                (out / RUN_FILE).unlink()
                shutil.rmtree(out / "validation", ignore_errors=True)
                shutil.rmtree(out / MODEL_TMP, ignore_errors=True)
                if fresh and not any(out.iterdir()):
                    out.rmdir()
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise write_failed(Path(exc.filename or out), exc, resume_fix(out)) from None
            raise


def resume_fix(out: Path) -> str:
    """What to do after a failed write: free space, and resume if there is a checkpoint."""
    return "free space, then rerun" + (" with --resume latest" if checkpoints(out) else "")


def finished(out: Path, s, config_file: str) -> dict | None:
    """The config of the model OUT already holds when it is the one ``s`` asks for (the same
    length: ``max_steps`` and ``epochs``), so ``--resume latest`` has nothing left to do."""
    path = out / config_file
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    old, mine = config.get("settings", {}), s.model_dump(mode="json")
    return config if all(old.get(k) == mine.get(k) for k in ("max_steps", "epochs")) else None


def publish_model(stage: Path, out: Path) -> None:
    """Move a model saved whole into ``stage`` into OUT, replacing the entries it has."""
    for entry in stage.iterdir():
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(entry, dest)
    stage.rmdir()


class TrainState:
    """What accelerate cannot see: optimizer steps, micro-batches consumed (the data position)
    and the generator for noise, timesteps, flips and dropout. Checkpointed with the model."""

    def __init__(self, seed: int):
        import torch

        self.step = 0
        self.micro = 0
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.generator.set_state(state["generator"])


def accelerate_precision(precision: str) -> str:
    """accelerate's name of a ``--precision`` (fp32 is its "no": no mixed precision)."""
    return "no" if precision == "fp32" else precision


def weight_dtype(acc):
    """The dtype of frozen models under the accelerator's mixed precision."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision,
                                                              torch.float32)


def begin_run(acc, s, out: Path, start_from: Path | None, state) -> int | None:
    """Note the run's settings in OUT (its first start only: they own the folder), then
    restore ``start_from``; returns the step resumed from (None for a new run)."""
    from dsbuild import __version__
    from dsbuild.core.records import write_json

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for litter in [*out.glob(".checkpoint-*.tmp"), out / MODEL_TMP]:  # a killed run's
            shutil.rmtree(litter, ignore_errors=True)
        if not (out / RUN_FILE).exists():
            write_json(out / RUN_FILE, {"settings": s.model_dump(mode="json"),
                                        "dsbuild_version": __version__})
    if start_from is None:
        return None
    acc.load_state(str(start_from))
    return state.step


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a half-written one is a hidden temp folder)."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def changed_keys(old: dict, new: dict, volatile: frozenset[str]) -> list[str]:
    keys = (set(old) | set(new)) - volatile
    return sorted(k for k in keys if old.get(k) != new.get(k))


def prepare_out(out: Path, s, resume: str | None, command: str = "train",
                config_file: str = "train_config.json") -> Path | None:
    """Check the output folder and pick the checkpoint to resume from; nothing is deleted.

    A folder of another run (different settings) is refused; so is a folder that already holds
    this run's checkpoints unless ``--resume`` says to continue."""
    mine = s.model_dump(mode="json")
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise DsbuildError(f"--out {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()):
        if not run_file.exists():
            raise DsbuildError(f"--out {out} is not empty and is not a dsbuild {command} folder; "
                               "choose an empty or new folder")
        old = json.loads(run_file.read_text())["settings"]
        try:  # a folder trained before a setting was renamed
            old = type(s).upgrade(old)
        except ValueError:
            pass
        diff = changed_keys(old, mine, type(s).volatile)
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {mine.get(k)!r}" for k in diff)
            if resume:
                raise DsbuildError(f"--resume with changed settings ({detail}); resume with the "
                                   f"settings of {run_file}, or train into a new --out")
            raise DsbuildError(f"--out {out} holds another run's checkpoints (settings differ: "
                               f"{detail}); choose a new --out, or --resume it with its settings")
        if not resume and (checkpoints(out) or (out / config_file).exists()):
            raise DsbuildError(f"--out {out} already holds this run's checkpoints or model; pass "
                               "--resume latest to continue, or choose a new --out")
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(out) if out.exists() else []
        return found[-1] if found else None
    path = Path(resume) if Path(resume).is_dir() else out / resume
    if not path.is_dir() or path.parent.resolve() != out.resolve():
        raise DsbuildError(f"--resume {resume}: no such checkpoint in {out} (have: "
                           f"{', '.join(p.name for p in checkpoints(out)) or 'none'})")
    return path


def make_optimizer(s, params, lr: float):
    """AdamW on ``params`` with the settings' betas, weight decay and epsilon: torch's, fused
    (one kernel over every tensor instead of the per-tensor loop torch runs on CPU; the same
    update up to float rounding), or bitsandbytes' AdamW8bit with ``s.use_8bit_adam``."""
    import torch

    kwargs = dict(lr=lr, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.adam_weight_decay,
                  eps=s.adam_epsilon)
    if not s.use_8bit_adam:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MissingDependency("--use-8bit-adam needs bitsandbytes, which is not installed.\n"
                                "  Install it with: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def encode_text(text_encoder, tokenizer, prompts, device, dtype, batch: int = 64):
    """Last hidden states of the CLIP text encoder (what the UNet cross-attends to)."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = tokenizer(list(prompts[i:i + batch]), max_length=tokenizer.model_max_length,
                            padding="max_length", truncation=True, return_tensors="pt").input_ids
            outs.append(text_encoder(ids.to(device))[0].to(dtype))
    return torch.cat(outs)


def save_checkpoint(acc, out: Path, step: int, s) -> Path:
    """accelerate ``save_state`` into a temp folder, renamed when complete; oldest pruned."""
    tmp = out / f".checkpoint-{step}.tmp"
    final = out / f"checkpoint-{step}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    with writing(final, resume_fix(out), remove=tmp):
        acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if s.checkpoint_limit:
            for old in checkpoints(out)[:-s.checkpoint_limit]:
                shutil.rmtree(old)
    return final


def checkpoint_last(acc, out: Path, state: TrainState, s, losses: list[float]) -> None:
    """Checkpoint the final step when this run took steps (after the loop, so the loop's
    timings leave it out): ``--resume latest`` after a failed model save, or with more steps,
    redoes none."""
    if losses:
        save_checkpoint(acc, out, state.step, s)


def ema_weights(ema, params):
    """Context: the EMA weights in ``params`` for the block, the trained ones after."""
    from contextlib import contextmanager

    @contextmanager
    def swap():
        if ema is None:
            yield
            return
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    return swap()




def noised(latents, noise_sched, generator, device):
    """The denoising target at a uniform timestep: (noisy latents, timesteps, target), noise
    and timesteps drawn from ``generator``; the target is the noise, or v for v-prediction."""
    import torch

    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],),
                      generator=generator).to(device)
    noisy = noise_sched.add_noise(latents, noise, t)
    if noise_sched.config.prediction_type == "v_prediction":
        return noisy, t, noise_sched.get_velocity(latents, noise, t)
    return noisy, t, noise


def run_loop(acc, state: TrainState, s, out: Path, *, max_steps: int,
             loss_fn: Callable, models: list, params: list, opt, lr_sched, ema=None,
             validate: Callable[[int], None] | None = None, desc: str = "train") -> list[float]:
    """Optimizer steps until ``max_steps``: ``loss_fn(micro, generator)`` gives each
    micro-batch's loss; accumulation, clipping, EMA, checkpoints (``s.checkpoint_every``,
    ``s.checkpoint_limit``), ``validate(step)`` every ``s.validate_every`` steps and the
    progress bar are handled here. Returns the loss of each optimizer step run."""
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    losses: list[float] = []
    bar = progress(total=max_steps, initial=state.step, desc=desc, unit="step")
    try:
        while state.step < max_steps:
            with acc.accumulate(*models):
                loss = loss_fn(state.micro, state.generator)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, s.max_grad_norm)
                opt.step()
                lr_sched.step()
                opt.zero_grad(set_to_none=True)
            state.micro += 1
            if not acc.sync_gradients:
                continue
            if ema:
                ema.step(params)
            state.step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
            if state.step % s.checkpoint_every == 0 and state.step < max_steps:
                save_checkpoint(acc, out, state.step, s)
            if validate and s.validate_every and state.step % s.validate_every == 0:
                validate(state.step)
            if kill_at and state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
    return losses
