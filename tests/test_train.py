"""dsbuild train: an SD base widened with its bias kept, a model diffusers loads, exact resume
after a SIGKILL, LoRA, and bad input refused before anything is written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from builders import TRIPLES, make_build
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("datasets")

from dsbuild.cli import cli  # noqa: E402
from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.train.settings import TrainSettings  # noqa: E402
from dsbuild.train.trainer import KILL_ENV, train  # noqa: E402

FAST = dict(base="tiny", resolution=32, batch_size=2, checkpoint_every=2, validation_steps=2)


def build_export(root: Path, masks: bool = False) -> Path:
    """A real export (augment's no-change rows included) of a builder-made build; ``masks``:
    half the pairs carry a local-blend mask (the export's ``edit_mask``)."""
    import conftest

    from dsbuild.augment.stage import run_augment
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe
    from dsbuild.export.writer import export_build

    recipe = root / "mini.yaml"
    recipe.write_text(conftest.MINI_RECIPE)
    b = Build.init(root / "build", load_recipe(recipe), recipe_path=str(recipe))
    b.update(["export.grid_pairs=3", "augment.ratio=0.3", "export.test_ratio=0.25"])
    make_build(b, samples=2, triples=TRIPLES, keep_every=1, masks=masks)
    run_augment(b)
    return Path(export_build(b).path)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return build_export(tmp_path_factory.mktemp("export"))


def unet_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_widen_keeps_weights_bias_and_output():
    from dsbuild.models.sd import tiny_sd_components
    from dsbuild.train.model import widen_conv_in

    unet = tiny_sd_components()["unet"]
    old_w, old_b = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(x, 10, text).sample
        widen_conv_in(unet)
        after = unet(torch.cat([x, torch.randn_like(x)], 1), 10, text).sample
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], old_w)
    assert not unet.conv_in.weight[:, 4:].any()
    assert torch.equal(unet.conv_in.bias, old_b)  # diffusers' example script drops it
    # zero new channels: the widened UNet ignores the image latents until it is trained
    assert torch.allclose(before, after, atol=1e-6)


def test_train_writes_a_pipeline_diffusers_loads(export, tmp_path, one_torch_thread):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    out = tmp_path / "m"
    r = CliRunner().invoke(cli, ["train", str(export), "--base", "tiny", "--out", str(out),
                                 "--max-steps", "3", "--resolution", "32", "--batch-size", "2",
                                 "--validate-every", "3", "--validation-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "trained 3 steps" in r.output
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(out))
    assert pipe.unet.config.in_channels == 8
    im = pipe("make it blue", image=Image.new("RGB", (32, 32), "red"), num_inference_steps=2,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (32, 32)
    card = (out / "README.md").read_text()
    assert "Optimizer steps: 3" in card and "tiny" in card and "Not evaluated yet" in card
    assert (out / "train_config.json").exists()
    assert list((out / "validation").glob("step-000003.png"))
    # trained weights differ from the tiny start
    from dsbuild.models.editor import tiny_editor_components

    start = tiny_editor_components()["unet"].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in unet_weights(out).items())


def test_killed_and_resumed_equals_uninterrupted(export, tmp_path, one_torch_thread):
    """Checkpoint at step 2, SIGKILL after step 3 (its work lost), resume: step 3 is redone
    from the checkpoint's RNG and data position and the weights equal an uninterrupted run."""
    s = TrainSettings(data=str(export), max_steps=4, **FAST)
    whole = train(s, tmp_path / "whole")
    assert whole.steps == 4
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "dsbuild", "train", str(export), "--out", str(cut),
           "--max-steps", "4", "--base", "tiny", "--resolution", "32", "--batch-size", "2",
           "--checkpoint-every", "2", "--validation-steps", "2"]
    env = {**os.environ, KILL_ENV: "3", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert [c.name for c in cut.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (cut / "unet").exists()
    resumed = train(s, cut, resume="latest")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a, b = unet_weights(tmp_path / "whole"), unet_weights(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses[2:] == resumed.losses  # steps 3 and 4 replayed exactly


def test_lora_on_an_sd_base_trains_conv_in_and_fuses(export, tmp_path, one_torch_thread):
    from diffusers import StableDiffusionPipeline

    from dsbuild.models.sd import tiny_sd_components

    base = tmp_path / "sd"
    comps = tiny_sd_components()
    StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(base))
    s = TrainSettings(data=str(export), **{**FAST, "base": str(base)}, method="lora",
                      max_steps=2, ema=False, learning_rate=1e-2)
    res = train(s, tmp_path / "lora")
    assert res.base_kind == "widened"
    w = unet_weights(tmp_path / "lora")
    assert not any("lora" in k for k in w)  # fused into the UNet: loads with no peft
    assert w["conv_in.weight"].shape[1] == 8
    assert w["conv_in.weight"][:, 4:].abs().sum() > 0  # the image channels learned
    assert (tmp_path / "lora" / "unet_lora").is_dir()
    old = comps["unet"].state_dict()
    k = next(k for k in w if k.endswith("attn1.to_q.weight"))
    assert not torch.equal(w[k], old[k])  # LoRA delta fused in


def test_bad_input_is_refused_with_what_to_fix(export, tmp_path):
    import datasets

    # an export missing a column
    bad = tmp_path / "bad"
    (bad / "data").mkdir(parents=True)
    ds = datasets.load_dataset("parquet", data_files={
        "train": [str(p) for p in (export / "data").glob("train-*.parquet")]})["train"]
    ds.remove_columns(["edited_image"]).to_parquet(str(bad / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DsbuildError, match="lacks column.*edited_image"):
        train(TrainSettings(data=str(bad), max_steps=1, **FAST), tmp_path / "o1")
    # a pair whose images differ in colour mode
    mixed = tmp_path / "mixed"
    (mixed / "data").mkdir(parents=True)
    gray = ds.cast_column("edited_image", datasets.Image()).map(
        lambda r: {"edited_image": r["edited_image"].convert("L")})
    gray.to_parquet(str(mixed / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DsbuildError, match="row 0: input_image is RGB but edited_image is L"):
        train(TrainSettings(data=str(mixed), max_steps=1, **FAST), tmp_path / "o2")
    # a base that is not SD-shaped
    notsd = tmp_path / "notsd"
    (notsd / "unet").mkdir(parents=True)
    (notsd / "unet" / "config.json").write_text("{}")
    with pytest.raises(DsbuildError, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        train(TrainSettings(data=str(export), max_steps=1, **{**FAST, "base": str(notsd)}),
              tmp_path / "o3")
    # an output folder that is not ours, or holds another run's checkpoints
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(DsbuildError, match="not a dsbuild train folder"):
        train(TrainSettings(data=str(export), max_steps=1, **FAST), foreign)
    assert (foreign / "keep.txt").read_text() == "precious"
    s = TrainSettings(data=str(export), max_steps=2, **FAST)
    run = tmp_path / "run"
    from dsbuild.core.records import write_json
    from dsbuild.train.trainer import RUN_FILE

    run.mkdir()
    write_json(run / RUN_FILE, {"settings": s.model_dump(mode="json")})
    (run / "checkpoint-2").mkdir()
    other = TrainSettings(data=str(export), max_steps=2, **{**FAST, "resolution": 64})
    with pytest.raises(DsbuildError, match="holds another run's checkpoints.*resolution"):
        train(other, run)
    with pytest.raises(DsbuildError, match="--resume with changed settings.*resolution"):
        train(other, run, resume="latest")
    with pytest.raises(DsbuildError, match="already holds this run's checkpoints"):
        train(s, run)
    assert (run / "checkpoint-2").is_dir()


def test_train_without_its_extra_says_how_to_install(tmp_path):
    """With torch hidden, `dsbuild train` exits 2 with the pip line."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from dsbuild.cli import main\n"
            f"main(['train', {str(tmp_path)!r}, '--out', {str(tmp_path / 'o')!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "pip install 'dsbuild[train]'" in p.stderr


def dsbuild(args: list[str], capsys):
    """Run the dsbuild command in process: (exit status, captured stdout and stderr)."""
    from dsbuild.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


TRAIN = ["--base", "tiny", "--resolution", "32", "--batch-size", "2", "--validation-steps", "2"]


def test_a_second_run_into_a_locked_out_is_refused_or_waits(export, tmp_path, capsys):
    """While a run holds OUT (here the test holds its lock), train and train-generator exit 2
    naming the holder and write nothing; `train --wait` waits, then trains."""
    from dsbuild.train.loop import lock_out

    out = tmp_path / "m"
    with lock_out(out, "train"):
        code, res = dsbuild(["train", str(export), "--out", str(out), "--max-steps", "1",
                             *TRAIN], capsys)
        assert code == 2
        [line] = error_lines(res.err)
        assert f"the train run into {out} is being written by PID {os.getpid()}" in line
        assert "rerun with --wait" in line
        assert not out.exists()
        code, res = dsbuild(["train-generator", str(tmp_path / "photos"), "--out", str(out)],
                            capsys)
        assert code == 2 and f"PID {os.getpid()}" in error_lines(res.err)[0]
        p = subprocess.Popen([sys.executable, "-m", "dsbuild", "train", str(export), "--out",
                              str(out), "--max-steps", "1", *TRAIN, "--wait"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for line in p.stderr:  # it says it waits before it takes the folder
            if line.startswith("waiting:"):
                break
        assert f"is being written by PID {os.getpid()}" in line
        assert not out.exists()
    stdout, rest = p.communicate(timeout=300)
    assert p.returncode == 0, rest[-2000:]
    assert "trained 1 steps" in stdout and (out / "train_config.json").exists()


def failing_save_state(fail_at: int):
    """accelerate's save_state that writes part of a checkpoint, then fails as torch's writer
    does on a full disk, at its ``fail_at``-th call."""
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) < fail_at:
            return real(self, output_dir, **kw)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    return save_state


def test_disk_full_is_one_line_and_leaves_no_half_file(export, tmp_path, capsys, monkeypatch,
                                                       one_torch_thread):
    """A full disk at the first checkpoint, at a later one, and while the model is saved: exit 1,
    one line naming the file and the fix; no temp checkpoint or half model is left, and a
    folder with no checkpoint is taken back. After the failed model save, --resume latest
    redoes no step (the last one is checkpointed)."""
    import errno

    from accelerate import Accelerator
    from diffusers import StableDiffusionInstructPix2PixPipeline

    args = ["--max-steps", "2", "--checkpoint-every", "1", *TRAIN]
    first = tmp_path / "first"
    with monkeypatch.context() as m:
        m.setattr(Accelerator, "save_state", failing_save_state(1))
        code, res = dsbuild(["train", str(export), "--out", str(first), *args], capsys)
    assert code == 1
    [line] = error_lines(res.err)
    assert line.startswith(f"error: cannot write {first}/checkpoint-1 (")
    assert line.endswith("free space, then rerun")
    assert not first.exists()  # nothing to resume from: the folder is not claimed

    later = tmp_path / "later"
    with monkeypatch.context() as m:
        m.setattr(Accelerator, "save_state", failing_save_state(2))
        code, res = dsbuild(["train", str(export), "--out", str(later), *args], capsys)
    assert code == 1
    [line] = error_lines(res.err)
    assert f"cannot write {later}/checkpoint-2" in line
    assert line.endswith("free space, then rerun with --resume latest")
    assert sorted(p.name for p in later.iterdir()) == ["checkpoint-1", "dsbuild-train.json"]

    final = tmp_path / "final"

    def full(self, save_directory, **kw):
        Path(save_directory, "unet").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(StableDiffusionInstructPix2PixPipeline, "save_pretrained", full)
        code, res = dsbuild(["train", str(export), "--out", str(final), *args], capsys)
    assert code == 1
    [line] = error_lines(res.err)
    assert f"cannot write {final} (No space left on device;" in line
    assert "--resume latest" in line
    assert sorted(p.name for p in final.iterdir()) == ["checkpoint-1", "checkpoint-2",
                                                       "dsbuild-train.json"]
    from dsbuild.cli import main

    main(["train", str(export), "--out", str(final), *args, "--resume", "latest"])
    assert re.search(r"trained 2 steps on \d+ rows \(resumed at step 2\);",
                     capsys.readouterr().out)
    assert (final / "train_config.json").exists() and (final / "unet").is_dir()


def test_resume_latest_on_a_finished_folder_redoes_nothing(export, tmp_path, one_torch_thread):
    s = TrainSettings(data=str(export), max_steps=3, **FAST)
    out = tmp_path / "m"
    train(s, out)
    assert (out / "checkpoint-3").is_dir()  # the last step is checkpointed
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    again = train(s, out, resume="latest")
    assert again.finished and again.losses == [] and again.steps == 3
    assert weights.stat().st_mtime_ns == before
    r = CliRunner().invoke(cli, ["train", str(export), "--out", str(out), "--max-steps", "3",
                                 "--checkpoint-every", "2", *TRAIN, "--resume", "latest"])
    assert r.exit_code == 0 and r.output.startswith(f"nothing to do: {out} is already trained")
    longer = train(s.model_copy(update={"max_steps": 4}), out, resume="latest")
    assert longer.resumed_from == 3 and len(longer.losses) == 1


def test_a_damaged_export_is_one_line(export, tmp_path, capsys):
    """A truncated shard and a split whose shards differ in columns are refused naming the
    file (exit 2, nothing written); splits with different columns are each readable."""
    import shutil

    import pyarrow.parquet as pq

    from dsbuild.train.data import load_split

    trunc = tmp_path / "trunc"
    shutil.copytree(export, trunc)
    shard = next((trunc / "data").glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "o"
    code, res = dsbuild(["train", str(trunc), "--out", str(out), "--max-steps", "1", *TRAIN],
                        capsys)
    assert code == 2
    [line] = error_lines(res.err)
    assert line.startswith(f"error: {shard}: not a whole parquet file")
    assert "dsbuild export BUILD --force" in line
    assert not out.exists()

    cols = tmp_path / "cols"
    shutil.copytree(export, cols)
    train_shard = next((cols / "data").glob("train-*.parquet"))
    pq.write_table(pq.read_table(train_shard).drop_columns(["original_prompt"]), train_shard)
    assert len(load_split(str(cols), "train")) == len(load_split(str(export), "train"))
    assert "original_prompt" in load_split(str(cols), "test").column_names
    extra = cols / "data" / "train-00001-of-00001.parquet"
    shutil.copy(next((export / "data").glob("train-*.parquet")), extra)
    with pytest.raises(DsbuildError, match=f"{extra}: its columns differ from "
                                           f"{train_shard.name}'s .missing: -; extra: "
                                           "original_prompt"):
        load_split(str(cols), "train")
