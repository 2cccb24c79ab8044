"""The editor generator (``generate.generator=editor``): a diffusers editing pipeline applied to
a generated source image. Its edits equal calling the pipeline directly with the same seed and
knobs (tiny InstructPix2Pix, SDXL InstructPix2Pix and FLUX.1 Kontext built from config); the pipeline class is
read from a saved folder's model_index.json; a bad folder is one line naming generate.model;
``dsbuild run`` makes an export whose rows name the generator; ``dsbuild bench editor --json``
reports its ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.generate.generators.editor.drivers import to_pil  # noqa: E402
from dsbuild.generate.generators.editor.generator import InstructionEditor  # noqa: E402
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.models.editor import edit_pipeline_class, load_edit_pipeline  # noqa: E402

SIZE, STEPS = 32, 3
CAPTION = "a red velvet armchair in a bright living room"
TRIPLES = [
    {"id": "t-blue", "input": CAPTION, "edit": "make the armchair blue", "level": "object",
     "output": "a blue velvet armchair in a bright living room"},
    {"id": "t-cushion", "input": CAPTION, "edit": "add a cushion", "level": "object",
     "output": "a red velvet armchair with a cushion in a bright living room"},
]


def editor(model: str, batched: bool = True, **own) -> InstructionEditor:
    s = GenerateSettings(generator="editor", model=model, steps=STEPS, height=SIZE,
                         width=SIZE, per_triple=4, batch_size=8, editor=own)
    return InstructionEditor(s, s.section("editor"), "cpu", "fp32", batched=batched)


def direct(gen: InstructionEditor, made) -> np.ndarray:
    """The same edit by calling the diffusers pipeline itself on the source PNG's pixels."""
    p = made.plan.params
    kw = {"guidance_scale": p["guidance"]}
    if p["image_guidance"] is not None:
        kw["image_guidance_scale"] = p["image_guidance"]
    if p["pipeline"] == "FluxKontextPipeline":  # the generate size, not Kontext's auto-resize
        kw.update(height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False)
    if p["pipeline"] == "StableDiffusionXLInstructPix2PixPipeline":
        kw.update(height=SIZE, width=SIZE)
    with torch.no_grad():
        return gen.pipe(prompt=made.plan.triple["edit"], image=to_pil(made.source),
                        num_inference_steps=STEPS, output_type="np",
                        generator=torch.Generator().manual_seed(made.plan.seed),
                        **kw).images[0]


@pytest.mark.parametrize("model,pipeline", [
    ("tiny-ip2p", "StableDiffusionInstructPix2PixPipeline"),
    ("tiny-sdxl-ip2p", "StableDiffusionXLInstructPix2PixPipeline"),
    ("tiny-kontext", "FluxKontextPipeline"),
])
def test_edits_equal_the_pipeline_called_directly(model, pipeline):
    gen = editor(model)
    plans = [p for t in TRIPLES for p in gen.plan(t)]
    made = list(gen.generate(plans))
    assert sorted(m.plan.id for m in made) == sorted(p.id for p in plans)
    assert {m.plan.params["pipeline"] for m in made} == {pipeline}
    # two seeds for the caption, shared by both triples: four sources' worth of edits
    assert len({m.source_id for m in made}) == 2 == gen.stats()["sources_made"]
    assert len({(m.plan.params["guidance"], m.plan.params["image_guidance"])
                for m in made}) == len(made)  # every variant has its own knobs
    for m in made:
        ref = direct(gen, m)
        assert m.target.shape == ref.shape == (SIZE, SIZE, 3)
        np.testing.assert_allclose(m.target, ref, atol=1e-4)
        # and the source is the plain text-to-image image of the caption and seed (on the
        # PNG's 1/255 grid)
        with torch.no_grad():
            src = gen.source_pipe(CAPTION, num_inference_steps=STEPS, guidance_scale=7.5,
                                  height=SIZE, width=SIZE, output_type="np",
                                  generator=torch.Generator().manual_seed(m.plan.seed)
                                  ).images[0]
        np.testing.assert_allclose(m.source, src, atol=0.5 / 255 + 1e-4)
    # a source is made once, its edits batched: the same images as one pipeline call each
    unbatched = {m.plan.id: m.target for m in editor(model, batched=False).generate(plans)}
    for m in made:
        np.testing.assert_allclose(m.target, unbatched[m.plan.id], atol=1e-4)


def test_grid_sweep_and_knob_errors():
    gen = editor("tiny-ip2p", sweep="grid", grid_guidance=[5.0, 7.5],
                 grid_image_guidance=[1.5])
    plans = gen.plan(TRIPLES[0])
    assert [(p.params["guidance"], p.params["image_guidance"]) for p in plans] == \
        [(5.0, 1.5), (7.5, 1.5)] * 2  # every combination, source after source
    assert len({p.seed for p in plans}) == 2
    with pytest.raises(DsbuildError, match=r"generate\.editor\.image_guidance.*no image"):
        editor("tiny-kontext", image_guidance=(1.0, 2.0))
    with pytest.raises(DsbuildError, match=r"generate\.editor\.guidance.*above 1"):
        editor("tiny-ip2p", guidance=(1.0, 3.0))


def test_pipeline_class_from_model_index_of_a_saved_folder(tmp_path):
    for name, cls in (("tiny-kontext", "FluxKontextPipeline"),
                      ("tiny-sdxl-ip2p", "StableDiffusionXLInstructPix2PixPipeline"),
                      ("tiny-ip2p", "StableDiffusionInstructPix2PixPipeline")):
        folder = tmp_path / name
        built = load_edit_pipeline(name, quiet=True)
        built.save_pretrained(folder)
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls
        assert edit_pipeline_class(str(folder)) == cls
        loaded = load_edit_pipeline(str(folder))  # a real from_pretrained on the folder
        assert type(loaded).__name__ == cls
        net = "transformer" if name == "tiny-kontext" else "unet"
        a, b = getattr(built, net).state_dict(), getattr(loaded, net).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    # bad folders: one line naming generate.model
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DsbuildError, match=r"^generate\.model: .*no model_index\.json") as e:
        edit_pipeline_class(str(empty))
    assert "\n" not in str(e.value)
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(DsbuildError, match=r"^generate\.model: .*StableDiffusionPipeline.*not "
                       r"a diffusers editing pipeline"):
        edit_pipeline_class(str(sd))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((tmp_path / "tiny-kontext" /
                                              "model_index.json").read_text())
    with pytest.raises(DsbuildError, match=r"^generate\.model: cannot load "
                       r"FluxKontextPipeline") as e:
        load_edit_pipeline(str(broken))
    assert "\n" not in str(e.value)


def dsbuild(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSBUILD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DSBUILD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "dsbuild", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_to_an_export_whose_rows_name_the_editor(tmp_path, mini_recipe):
    import pyarrow.parquet as pq

    b = tmp_path / "b"
    r = dsbuild("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1",
                "--set", "generate.generator=editor", "--set", "generate.model=tiny-ip2p")
    assert r.returncode == 0, r.stdout + r.stderr
    pairs = [json.loads(line) for f in sorted((b / "pairs").glob("r*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    assert pairs and {p["generator"] for p in pairs} == {"editor"}
    assert {p["model"] for p in pairs} == {"tiny-ip2p"}
    rows = [row for f in sorted((b / "export" / "data").glob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    edits = [row for row in rows if not row["no_change"]]
    assert edits
    by_pair = {p["id"]: p for p in pairs}
    for row in edits:
        pair = by_pair[row["pair_id"]]
        assert row["generator"] == "editor"
        assert row["editor_pipeline"] == "StableDiffusionInstructPix2PixPipeline"
        assert row["guidance"] == pytest.approx(pair["params"]["guidance"])
        assert row["image_guidance"] == pytest.approx(pair["params"]["image_guidance"])
        assert row["source_model"] == "tiny"
        assert "p2p_mode" not in row  # no P2P columns
    card = (b / "export" / "README.md").read_text()
    assert "editor" in card and "editor_pipeline" in card

    # a model folder that is not an editing pipeline: refused before anything is saved
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    r = dsbuild("run", tmp_path / "c", "--recipe", mini_recipe, "--offline", "--set",
                "generate.generator=editor", "--set", f"generate.model={sd}")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "generate.model" in r.stderr
    assert not (tmp_path / "c").exists()


def test_bench_editor_json_has_the_ratios():
    r = dsbuild("bench", "editor", "--json", "--steps", "2", "--resolution", "32",
                "--per-triple", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert set(res["ratios"]) == {"tiny-ip2p", "tiny-kontext"}
    for name, m in res["models"].items():
        assert res["ratios"][name] == m["ratio"] > 0
        assert m["rows"] == 6 and m["sources"] == 2 and m["batched"] is True
        assert set(m["rows_per_s"]) == {"plain", "dsbuild"}
        assert m["max_abs_diff"] < 0.01  # the same edits both ways
    assert res["threads"] == 1 and res["timer"] == "cpu seconds" and res["goal"] == 1.0


def recipe_examples(text: str) -> list[dict]:
    """The commented ``generate:`` sections of a recipe file, parsed as YAML."""
    import yaml

    blocks, cur = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("#   generate:"):
            cur = [line[4:]]
        elif cur is not None and line.startswith("#     "):
            cur.append(line[4:])
        elif cur is not None:
            blocks.append(yaml.safe_load("\n".join(cur)))
            cur = None
    return blocks


def test_shipped_recipes_load_and_their_generator_examples_validate():
    from pathlib import Path

    from dsbuild.core.config import load_recipe

    files = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert files
    examples = []
    for f in files:
        assert load_recipe(f).name  # every shipped recipe file is a recipe that loads
        examples += recipe_examples(f.read_text())
    made = []
    for ex in examples:
        g = GenerateSettings.model_validate(ex["generate"])
        made += [run.generator for run in g.runs()]
        g.signature_dict()
    # an example of each generator, and of generate.mix
    assert {"p2p", "editor", "api"} <= set(made)
    assert any(ex["generate"].get("mix") for ex in examples)
    api = next(ex["generate"]["api"] for ex in examples if "api" in ex["generate"])
    assert api["n"] > 1
