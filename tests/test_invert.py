"""Prompt-to-Prompt on real photos through inversion (issue 27 item 4), on the tiny model:
null-text beats plain DDIM inversion, P2P from inverted latents is P2P from those latents,
inversions are cached and reused, and a kill mid-inversion redoes nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from builders import triple_record
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.generate.generators.p2p.generator import PromptToPrompt  # noqa: E402
from dsbuild.generate.generators.p2p.invert import Inverter, psnr  # noqa: E402
from dsbuild.generate.generators.p2p.sampler import P2PGenerator, SourceGroup  # noqa: E402
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.models import load_sd_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
CAPTION = "a red velvet armchair in a bright living room"


def photo(seed: int = 0) -> np.ndarray:
    """A room drawn with PIL: a wall, a floor and an armchair, as a prepared photo reads."""
    im = Image.new("RGB", (SIZE, SIZE), (200 - 20 * seed, 190, 170))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 22, SIZE, SIZE], fill=(120, 90, 60))
    d.rectangle([8 + 2 * seed, 12, 22 + 2 * seed, 26], fill=(170, 30, 40))
    d.ellipse([24, 2, 30, 8], fill=(250, 240, 200))
    return np.asarray(im, dtype=np.float32) / 255.0


def settings(**kw) -> GenerateSettings:
    base = dict(model="tiny", steps=4, height=SIZE, width=SIZE, per_triple=2, batch_size=4,
                mode="replace", blend=True, device="cpu")
    return GenerateSettings(**{**base, **kw})


def triple(output: str, photo_id: str, inp: str = CAPTION) -> dict:
    t = triple_record("r", "chairs", "object", "change", inp, "edit", output)
    return {**t, "photo_id": photo_id, "license": "cc0", "photo_source": "test"}


def generator(s: GenerateSettings, folder: Path | None, photos: dict[str, np.ndarray]):
    gen = PromptToPrompt(s, None, "cpu", "fp32")
    gen.use_photos({k: {"id": k, "image": f"photos/img/{k}.png"} for k in photos},
                   lambda rec: photos[rec["id"]], folder)
    return gen


def test_null_text_reconstructs_closer_than_plain_ddim_inversion():
    """At the same steps and guidance, null-text inversion's reconstruction is closer to the
    photo's VAE round trip than plain DDIM inversion's (the empty caption's embedding at
    every step). The tiny UNet's output is scaled down so its noise prediction is as smooth
    in the latent as a trained model's: on raw random weights DDIM inversion itself fails
    and every method reconstructs at about 13 dB, which tells the methods apart by noise."""
    pipe = load_sd_pipeline("tiny", "fp32", "cpu", quiet=True)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.01)
        pipe.unet.conv_out.bias.mul_(0.01)
    sampler = P2PGenerator(pipe, "euler_ancestral")
    inv = Inverter(sampler, "tiny-smooth", "null-text")
    got = {}
    for method in ("ddim", "null-text", "negative-prompt"):
        r = inv.invert(photo(), CAPTION, 4, 7.5, method=method)
        res = sampler.generate([SourceGroup(CAPTION, 0, 7.5, [], r.latents, r.uncond)], 4,
                               SIZE, SIZE, scheduler="ddim")
        got[method] = psnr(res[0].source, r.round_trip)
    print(f"reconstruction PSNR at 4 steps, guidance 7.5: {got}")
    assert got["null-text"] > got["ddim"], got
    assert got["negative-prompt"] > got["ddim"], got


@pytest.mark.parametrize("method", ["negative-prompt", "null-text"])
def test_p2p_from_inverted_latents_equals_p2p_given_those_latents(method, tmp_path):
    s = settings(inversion=method, sweep="grid", grid_guidance=[7.5], per_triple=1,
                 grid_cross_replace=[0.5], grid_self_replace=[0.5])
    gen = generator(s, tmp_path / "inv", {"p0": photo()})
    t = triple("a blue velvet armchair in a bright living room", "p0")
    plans = gen.plan(t)
    assert {p.params["scheduler"] for p in plans} == {"ddim"}
    assert {p.params["inversion"] for p in plans} == {method}
    made = list(gen.generate(plans))
    assert len(made) == len(plans) == 1 and gen.inverter.computed == 1
    m = made[0]
    assert np.array_equal(m.source, photo())  # the pair's input is the photo itself
    assert m.mask is not None  # local blend ran from the inverted latents too

    direct = Inverter(gen.sampler, s.model, method).invert(photo(), CAPTION, s.steps, 7.5)
    key = plans[0].group_key
    res = gen.sampler.generate([SourceGroup(*key, [plans[0].target()], direct.latents,
                                            direct.uncond)], s.steps, SIZE, SIZE,
                               scheduler="ddim")[0]
    np.testing.assert_allclose(m.target, res.targets[0], atol=1e-6)
    np.testing.assert_allclose(m.images["reconstruction"], res.source, atol=1e-6)
    assert m.record == {"photo_id": "p0",
                        "reconstruction_psnr": psnr(res.source, direct.round_trip)}


def test_variants_and_reruns_reuse_the_cached_inversion(tmp_path):
    folder = tmp_path / "inv"
    s = settings()
    variants = [triple("a blue velvet armchair in a bright living room", "p0"),
                triple("a green velvet armchair in a bright living room", "p0")]
    gen = generator(s, folder, {"p0": photo()})
    plans = [p for t in variants for p in gen.plan(t)]
    first = {m.plan.id: m.target for m in gen.generate(plans)}
    assert len(first) == 4
    assert gen.inverter.computed == 1  # one inversion for 4 pairs of 2 edits
    assert gen.stats()["inversions"] == 1
    assert len(list(folder.glob("*.pt"))) == 1 and not list(folder.glob(".*.tmp"))

    again = generator(s, folder, {"p0": photo()})  # a rerun: a new process's generator
    second = {m.plan.id: m.target for m in again.generate(plans)}
    assert again.inverter.computed == 0 and again.inverter.loaded >= 1
    for pid, im in first.items():
        np.testing.assert_array_equal(second[pid], im)


def test_photo_at_another_size_and_sdxl_are_refused(tmp_path):
    gen = generator(settings(), None, {"p0": photo()[:16]})
    with pytest.raises(DsbuildError, match="not generate.width x height"):
        list(gen.generate(gen.plan(triple("a blue velvet armchair in a bright living room",
                                          "p0"))))
    xl = P2PGenerator(load_sd_pipeline("tiny-sdxl", "fp32", "cpu", quiet=True))
    with pytest.raises(DsbuildError, match="SD 1.x/2.x"):
        Inverter(xl, "tiny-sdxl", "null-text")


CHILD = """
import json, sys
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_invert import generator, photo, settings, triple
gen = generator(settings(inversion="null-text", sweep="grid", grid_guidance=[7.5]),
                __import__("pathlib").Path({folder!r}), {{"p0": photo(0), "p1": photo(1)}})
plans = [p for k in ("p0", "p1") for p in gen.plan(triple("a blue velvet armchair " + k, k,
                                                          "a red velvet armchair " + k))]
done = [m.plan.id for m in gen.generate(plans)]
print(json.dumps({{"computed": gen.inverter.computed, "pairs": len(done)}}))
"""


def test_kill_mid_inversion_then_resume_redoes_nothing_written(tmp_path):
    """A run killed after writing its first photo's inversion (core/pause.py holds it there,
    no race) resumes by inverting only the second photo."""
    folder = tmp_path / "inv"
    paused = tmp_path / "paused.json"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent),
                                                   folder=str(folder))))
    env = dict(os.environ, DSBUILD_PAUSE_AT=f"inv:1:{paused}", DSBUILD_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.2)
    assert paused.exists(), proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(folder.glob("*.pt"))
    assert len(written) == 1 and not list(folder.glob(".*.tmp"))
    before = written[0].stat().st_mtime_ns

    out = subprocess.run([sys.executable, str(script)], env=dict(env, DSBUILD_PAUSE_AT=""),
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"computed": 1, "pairs": 4}  # only the second photo was inverted
    assert written[0].stat().st_mtime_ns == before
    assert len(list(folder.glob("*.pt"))) == 2


def test_the_generate_stage_makes_photo_pairs_through_inversion(tmp_path, mini_recipe):
    """sources -> (triples from its photos) -> generate: the pair's input image is the
    prepared photo, pixel for pixel; the record carries photo_id and the PSNR; a forced rerun
    reuses every inversion."""
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe
    from dsbuild.core.photos import photos_by_id
    from dsbuild.generate.stage import run_generate
    from dsbuild.sources.stage import run_sources

    d = tmp_path / "photos"
    d.mkdir()
    lines = []
    for k in range(2):
        Image.fromarray((photo(k) * 255).round().astype(np.uint8)).save(d / f"p{k}.png")
        lines.append({"image": f"p{k}.png", "caption": f"a red velvet armchair {k}",
                      "license": "cc0-1.0"})
    (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    b = Build.init(tmp_path / "b", load_recipe(mini_recipe), recipe_path=str(mini_recipe),
                   overrides=["generate.model=tiny", "generate.steps=2", "generate.per_triple=1",
                              f"generate.height={SIZE}", f"generate.width={SIZE}",
                              "generate.batch_size=4", f"sources.path={d}"])
    run_sources(b)
    photos = photos_by_id(b)
    assert len(photos) == 2
    tr = [triple(f"a blue velvet armchair {p['caption'][-1]}", pid, p["caption"])
          for pid, p in photos.items()]
    b.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    res = run_generate(b)
    assert res.stats["inversions"] == 2
    pairs = list(b.records("generate"))
    assert len(pairs) == 2
    for p in pairs:
        ph = photos[p["photo_id"]]
        got = np.asarray(Image.open(b.root / p["images"]["input"]))
        np.testing.assert_array_equal(got, np.asarray(Image.open(b.root / ph["image"])))
        assert (b.root / p["images"]["reconstruction"]).is_file()
        assert isinstance(p["reconstruction_psnr"], float)
        assert p["params"]["inversion"] == "negative-prompt"
    again = run_generate(b, force=True)
    assert again.stats["inversions"] == 0 and again.stats["inversions_reused"] == 2
    assert list(b.records("generate")) == pairs

    # export: the input image is the photo (default) or, by setting, its reconstruction
    from builders import write_scores

    from dsbuild.export.dataset import collect_rows

    write_scores(b, pairs, [0.3] * len(pairs))
    by_id = {p["id"]: p["images"] for p in pairs}

    def inputs():
        rows = [r for split in collect_rows(b).splits.values() for r in split]
        assert rows
        return {r["pair_id"]: r["_images"]["input"] for r in rows}

    assert all(by_id[k]["input"] == v for k, v in inputs().items())
    b.config.export.input_image = "reconstruction"
    assert all(by_id[k]["reconstruction"] == v for k, v in inputs().items())


def test_bench_invert_reports_its_ratios_as_json():
    from click.testing import CliRunner

    from dsbuild.bench.invert import bench_invert

    out = CliRunner().invoke(bench_invert, ["--steps", "2", "--resolution", "32",
                                            "--repeats", "1", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert set(res["ratios"]) == {"negative_prompt/synthetic", "null_text/synthetic",
                                  "cached/synthetic"}
    assert set(res["seconds"]) == {"synthetic_pair", "photo_negative_prompt",
                                   "photo_null_text", "photo_cached"}
    assert res["threads"] == 1 and len(res["goals"]) == 2
