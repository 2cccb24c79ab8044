"""dsbuild train-generator / eval-generator: a LoRA generator that `dsbuild generate` loads on
its base (merged exactly as peft computes it), DreamBooth with prior preservation and a trained
text encoder resumed exactly after a SIGKILL, and bad input refused with what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dsbuild.cli import cli, main  # noqa: E402
from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.train.generator import read_photos, token_warning, train_generator  # noqa: E402
from dsbuild.train.generator_settings import GeneratorTrainSettings  # noqa: E402
from dsbuild.train.loop import KILL_ENV  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(base="tiny", resolution=32, num_class_images=2, class_steps=2, validation_steps=2)


def draw_photos(folder: Path, n: int = 3, size: tuple[int, int] = (40, 48)) -> Path:
    """A few photos of 'the subject' (a brown blob on a warm wall), drawn with PIL."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (200, 180 - 40 * i, 120))
        ImageDraw.Draw(im).ellipse((5 + i, 8, 30, 40), fill=(90, 40 + 50 * i, 30))
        im.save(folder / f"{i}.png")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSBUILD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lora_generator_drives_generate_and_eval(tmp_path, cache, monkeypatch):
    """The issue's 'done when': train-generator --method lora, a build with generate.model=G makes
    pairs, eval-generator prints base vs tuned."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from dsbuild.models import load_sd_pipeline
    from dsbuild.models.sd import tiny_sd_components

    photos = draw_photos(tmp_path / "photos")
    g = tmp_path / "G"
    r = CliRunner().invoke(cli, [
        "train-generator", str(photos), "--base", "tiny", "--out", str(g), "--method", "lora",
        "--max-steps", "3", "--resolution", "32", "--class", "armchair",
        "--num-class-images", "2", "--class-steps", "2", "--learning-rate", "0.01",
        "--validate-every", "3", "--validation-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "trained 3 steps (lora) on 3 photos + 2 class images" in r.output
    marker = json.loads((g / "dsbuild-generator.json").read_text())
    assert marker["kind"] == "lora" and marker["base"] == "tiny"
    assert not (g / "unet").exists()  # only the adapter, not a copy of the base
    assert len(list(cache.glob("class-images/*/0000[01].png"))) == 2
    assert (g / "validation" / "step-000003.png").exists()
    card = (g / "README.md").read_text()
    assert "a photo of sks armchair" in card and "λ = 1.0" in card
    # generate's loader merges W + scale·B·A; peft's own forward on the base must agree
    merged = load_sd_pipeline(str(g), quiet=True).unet
    ref = tiny_sd_components()["unet"]
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    set_peft_model_state_dict(ref, load_file(str(g / "unet_lora.safetensors")))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = merged(x, 10, text).sample, ref(x, 10, text).sample
        base = tiny_sd_components()["unet"](x, 10, text).sample
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-4)  # the LoRA changed the generator

    # a tiny build generates its pairs with generate.model=G
    monkeypatch.chdir(tmp_path)
    build = tmp_path / "B"
    for args in (["init", str(build), "--set", "captions.backend=template",
                  "--set", "captions.per_agent=1", "--set", f"generate.model={g}",
                  "--set", "generate.steps=2", "--set", "generate.height=32",
                  "--set", "generate.width=32", "--set", "generate.per_triple=1"],
                 ["captions", str(build)], ["generate", str(build)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
    pairs = [json.loads(line) for f in (build / "pairs").glob("r*.jsonl")
             for line in f.read_text().splitlines()]
    assert pairs and all(p["model"] == str(g) for p in pairs)
    assert all((build / p["images"]["output"]).exists() for p in pairs)

    r = CliRunner().invoke(cli, ["eval-generator", str(g), "--out", str(tmp_path / "E"),
                                 "--images-per-prompt", "2", "--steps", "2"])
    assert r.exit_code == 0, r.output
    # models in rows, as eval's table: the base's class prior is itself by definition
    assert "| model | CLIP-T ↑ |" in r.output
    assert next(x for x in r.output.splitlines() if x.startswith("| base (tiny) |")
                ).endswith("| 100.00 | 100.00 |")
    res = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert res["clip_prompts"] == ["a photo of armchair"]  # the identifier is not CLIP's word
    assert res["models"]["base"]["drift_clip_i"] == pytest.approx(1.0)
    from dsbuild.core.grid import text_layer

    layer = text_layer(tmp_path / "E" / "grid.png")  # its columns and models say themselves
    assert layer["headers"] == ["base, seed 0", "base, seed 1", "tuned, seed 0", "tuned, seed 1"]
    assert layer["title"].startswith(f"base tiny | tuned local:{g.name}")
    seed = GeneratorTrainSettings.model_fields["seed"].default
    assert text_layer(g / "validation" / "step-000003.png")["headers"] == [
        f"seed {seed}", f"seed {seed + 1}"]
    assert "CLIP-T (image vs context prompt)" in (g / "README.md").read_text()


def weights(folder: Path, part: str) -> dict:
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model" if part == "unet" else "model"
    return load_file(str(folder / part / f"{name}.safetensors"))


def test_dreambooth_killed_and_resumed_equals_uninterrupted(tmp_path, cache):
    """Context tuning (captions.jsonl) + class prior + text encoder, full weights: SIGKILL
    after step 3 (checkpoint at 2), resume; every UNet and text-encoder tensor equals an
    uninterrupted run's, and the cached class images are reused, not regenerated."""
    photos = draw_photos(tmp_path / "photos")
    (photos / "captions.jsonl").write_text("".join(
        json.dumps({"file": f"{i}.png", "caption": f"a sks armchair in a {room}"}) + "\n"
        for i, room in enumerate(["den", "hall", "loft"])))
    s = GeneratorTrainSettings(photos=str(photos), method="dreambooth", class_noun="armchair",
                               train_text_encoder=True, max_steps=4, checkpoint_every=2,
                               batch_size=2, learning_rate=1e-3, flip=True, **TINY)
    whole = train_generator(s, tmp_path / "whole")
    assert whole.steps == 4 and whole.class_images == 2
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "dsbuild", "train-generator", str(photos), "--out", str(cut),
           "--mode", "dreambooth", "--class", "armchair", "--train-text-encoder",
           "--max-steps", "4", "--checkpoint-every", "2", "--batch-size", "2",
           "--learning-rate", "0.001", "--flip", "--base", "tiny", "--resolution", "32",
           "--num-class-images", "2", "--class-steps", "2", "--validation-steps", "2"]
    env = {**os.environ, KILL_ENV: "3", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert "class images: 2 reused" in p.stderr
    assert [c.name for c in cut.glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = train_generator(s, cut, resume="latest")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert whole.losses[2:] == resumed.losses
    for part in ("unet", "text_encoder"):
        a, b = weights(tmp_path / "whole", part), weights(cut, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    config = json.loads((cut / "generator_config.json").read_text())
    assert config["prompts"] == [f"a sks armchair in a {r}" for r in ("den", "hall", "loft")]
    again = train_generator(s, cut, resume="latest")  # finished: nothing is redone
    assert again.finished and again.steps == 4 and again.losses == []
    assert (cut / "checkpoint-4").is_dir()  # the last step is checkpointed
    from dsbuild.models import load_sd_pipeline
    from dsbuild.models.sd import tiny_sd_components

    te = load_sd_pipeline(str(cut), quiet=True).text_encoder.state_dict()
    start = tiny_sd_components()["text_encoder"].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in te.items())  # the text encoder trained


def test_bad_input_is_refused_with_what_to_fix(tmp_path, cache, capfd):
    from PIL import Image

    from dsbuild.models.sd import char_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DsbuildError, match="no photos"):
        read_photos(empty, 32, "p")
    bad = draw_photos(tmp_path / "bad")
    (bad / "3.png").write_bytes(b"not a png")
    with pytest.raises(DsbuildError, match=r"3\.png: unreadable image"):
        read_photos(bad, 32, "p")
    small = draw_photos(tmp_path / "small", size=(24, 40))
    with pytest.raises(DsbuildError, match="24×40 is too small for --resolution 32"):
        read_photos(small, 32, "p")
    ok = draw_photos(tmp_path / "ok")
    (ok / "captions.jsonl").write_text(json.dumps({"file": "0.png", "caption": "x"}) + "\n")
    with pytest.raises(DsbuildError, match=r"1\.png: no caption"):
        read_photos(ok, 32, "p")
    # a token that is one common vocabulary entry warns; a rare composition does not
    tok = char_tokenizer()
    assert "common word" in token_warning(tok, "a")
    assert token_warning(tok, "sks") is None
    # a base that is not SD-shaped
    notsd = tmp_path / "notsd"
    (notsd / "unet").mkdir(parents=True)
    (notsd / "unet" / "config.json").write_text("{}")
    with pytest.raises(DsbuildError, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        train_generator(GeneratorTrainSettings(photos=str(draw_photos(tmp_path / "p2")),
                                               **{**TINY, "base": str(notsd)}, max_steps=1),
                        tmp_path / "o")
    # on the command line: one line, exit 2, nothing written
    capfd.readouterr()  # the calls above said what they trained on: only the command's below
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    with pytest.raises(SystemExit) as exc:
        main(["train-generator", str(empty), "--out", str(tmp_path / "o2")])
    assert exc.value.code == 2
    err = capfd.readouterr().err
    assert err.startswith("error: PHOTOS") and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


def test_the_prompt_and_the_prior_are_said_before_training(tmp_path, cache, capfd):
    """Without --class the run says its prompt and that prior preservation is off (and how to
    turn it on); with one, the class prompt and weight; captions count as prompts."""
    from dsbuild.train.generator import prompt_note

    photos = draw_photos(tmp_path / "photos", n=2)
    res = train_generator(GeneratorTrainSettings(photos=str(photos), **TINY, max_steps=1),
                          tmp_path / "G")
    assert res.steps == 1 and res.class_images == 0
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("train-generator:"))
    assert line == ("train-generator: prompt 'a photo of sks'; prior preservation is off "
                    "without --class (add --class NOUN, e.g. --class armchair, to keep the "
                    "class prior)")
    listed = read_photos(photos, 32, "a photo of sks chair")

    def note(**kw):
        return prompt_note(GeneratorTrainSettings(photos=str(photos), **{**TINY, **kw}), listed)

    assert note(class_noun="chair") == ("train-generator: prompt 'a photo of sks chair'; prior "
                                        "preservation on: 2 class images of 'a photo of chair',"
                                        " weight 1.0")
    assert note(class_noun="chair", prior_preservation=False).endswith(
        "prior preservation is off (--no-prior-preservation)")
    assert note(class_noun="chair", prior_loss_weight=0).endswith("(--prior-loss-weight 0)")
    (photos / "captions.jsonl").write_text("".join(
        json.dumps({"file": f"{i}.png", "caption": f"a sks chair, view {i}"}) + "\n"
        for i in range(2)))
    assert prompt_note(GeneratorTrainSettings(photos=str(photos), **TINY),
                       read_photos(photos, 32, "p")).startswith(
        "train-generator: 2 prompts from captions.jsonl; prior preservation is off")
