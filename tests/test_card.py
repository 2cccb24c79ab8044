"""The dataset card a Hub visitor reads: valid Hub metadata with `language: en`, the works it
used cited with links (and only those), every stage in one line, licences, limitations, review
rejects counted as they are, the repo id once pushed (against the Hub stand-in of
test_push.py); and the trained model's card naming a reusable dataset."""

from __future__ import annotations

import json

import pytest
import yaml
from builders import make_build

from dsbuild.augment.stage import run_augment
from dsbuild.core.decisions import add_decisions, make_decision
from dsbuild.export.writer import export_build

hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("datasets")

TINY_VERIFY = ["verify.detector=tiny", "verify.clip_model=tiny", "verify.clip_pretrained=none",
               "verify.dino_model=tiny"]
LINKS = {  # work -> the link the card must carry
    "InstructPix2Pix": "https://arxiv.org/abs/2211.09800",
    "Prompt-to-Prompt": "https://arxiv.org/abs/2208.01626",
    "CLIP": "https://arxiv.org/abs/2103.00020",
    "DINOv2": "https://arxiv.org/abs/2304.07193",
    "MTLD": "https://doi.org/10.3758/BRM.42.2.381",
    "OWLv2": "https://arxiv.org/abs/2306.09683",
}


def card(res) -> tuple[dict, str]:
    text = (res.path / "README.md").read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---")[1]), text


@pytest.fixture
def plain(mini_build):
    """Filter and augment only: no verify, no diversity report."""
    mini_build.update(["augment.ratio=0.3", "export.test_ratio=0.25"])
    make_build(mini_build, samples=2, keep_every=2)
    run_augment(mini_build)
    return mini_build


def test_card_metadata_is_valid_hub_metadata_with_language(plain):
    res = export_build(plain)
    meta, text = card(res)
    assert "\nlanguage: en\n" in text and meta["language"] == "en"
    assert meta["task_categories"] == ["image-to-image"] and meta["size_categories"] == ["n<1K"]
    assert meta["pretty_name"] == "mini" and "synthetic" in meta["tags"]
    # huggingface_hub reads it back as dataset card data, every key one it knows
    parsed = hub.DatasetCard(text).data
    assert isinstance(parsed, hub.DatasetCardData) and parsed.language == "en"
    known = set(hub.DatasetCardData().to_dict()) | {
        "language", "license", "task_categories", "size_categories", "pretty_name", "tags",
        "configs"}
    assert set(meta) <= known, set(meta) - known
    assert hub.DatasetCardData(**meta).to_dict() == parsed.to_dict()


def test_card_cites_only_what_the_build_ran(plain):
    from dsbuild.diversity.stage import run_diversity

    _, text = card(export_build(plain))
    for work in ("InstructPix2Pix", "Prompt-to-Prompt", "CLIP"):
        assert LINKS[work] in text, work
    # no verify, no DINO, no diversity report: those works are not cited
    for work in ("OWLv2", "DINOv2", "MTLD"):
        assert LINKS[work] not in text, work
    assert "```bibtex" in text and "@inproceedings{brooks2023instructpix2pix" in text
    assert "LangDesign" in text and "no public reference for LangDesign" in text
    assert "**verify** (not run)" in text and "Verify did not run on this build" in text
    from dsbuild.verify.stage import run_verify

    run_verify(plain, overrides=TINY_VERIFY, quiet=True, report=False)
    run_diversity(plain)
    _, text = card(export_build(plain))
    for work, link in LINKS.items():
        assert f"**{work}**" in text and link in text, work
    assert "@article{mccarthy2010mtld" in text and "doi     = {10.3758/BRM.42.2.381}" in text


def test_every_stage_in_one_line_with_its_counts(plain):
    res = export_build(plain)
    _, text = card(res)
    line = next(s for s in text.splitlines() if s.startswith("Stages: "))
    names = ["captions", "generate", "filter", "verify", "augment", "diversity", "export"]
    at = [line.index(f"**{n}**") for n in names]
    assert at == sorted(at)
    st = res.stats
    assert "**captions** (6 triples, template)" in line
    assert "**generate** (12 pairs, p2p on `tiny`)" in line
    assert f"**filter** ({st['kept']} of 12 pairs kept" in line
    nc = st["no_change_available"]
    assert f"**augment** ({nc} no-change samples, {nc - st['no_change_dropped']} exported)" \
        in line
    assert (f"train {res.counts['train']['rows']}, test {res.counts['test']['rows']} rows"
            in line)


def test_tiny_builds_say_so_and_licences_are_explained(plain):
    from dsbuild.export.card_notes import license_section
    from dsbuild.export.dataset import collect_rows

    _, text = card(export_build(plain))
    assert "> **Placeholder images.**" in text and "(generate; an offline demo" in text
    assert "**Placeholder data.** generate ran dsbuild's tiny random models" in text
    assert "## Intended use and limitations" in text
    assert "**What the CLIP filter catches**" in text and "**What it cannot**" in text
    assert "no trained weights and no model licence" in text
    assert "Source photos: this build records none" in text
    # SD 1.5 images: what its licence means for them, beyond the YAML tag
    sd = "\n".join(license_section(plain, collect_rows(plain),
                                   ["stable-diffusion-v1-5/stable-diffusion-v1-5"]))
    assert "[CreativeML OpenRAIL-M](https://huggingface.co/spaces/CompVis/stable-diffusion-" \
           "license)" in sd
    assert "claims no rights in the images" in sd and "use-based restrictions" in sd
    assert "The `cc-by-4.0` tag above covers what this dataset adds" in sd
    unknown = "\n".join(license_section(plain, collect_rows(plain), ["someone/their-model"]))
    assert "dsbuild does not know it" in unknown


def test_review_rejects_are_counted_as_they_are(plain):
    """Two edit pairs and one no-change sample rejected: three reject verdicts, the no-change
    one said apart from samples left out because their source pair is gone."""
    kept = [s["pair_id"] for s in plain.records("filter") if s["keep"]]
    dropped = [s["pair_id"] for s in plain.records("filter") if not s["keep"]]
    samples = list(plain.records("augment"))
    assert len(samples) >= 2
    sample, orphan = samples[0], samples[1]  # reject the first; reject the second's source
    other = next(p for p in kept if p not in (sample["source_pair_id"],
                                              orphan["source_pair_id"]))
    rejected = {orphan["source_pair_id"], other}
    add_decisions(plain, [
        make_decision(orphan["source_pair_id"], "reject", tool="fiftyone", reason="bad edit"),
        make_decision(other, "reject", tool="fiftyone", reason="bad edit"),
        make_decision(sample["id"], "reject", tool="labelstudio", reason="it shows the rug"),
        make_decision(dropped[0], "reject", tool="fiftyone"),  # the filter left it out already
        make_decision(sample["source_pair_id"], "accept", tool="labelstudio"),
    ])
    res = export_build(plain)
    st = res.stats
    assert st["review_rejects"] == 4 and st["review_accepts"] == 1
    assert st["rejected_by_review"] == 2 and st["no_change_rejected_by_review"] == 1
    source_gone = sum(s["source_pair_id"] in rejected for s in samples)
    assert source_gone >= 1
    assert st["no_change_source_dropped"] == source_gone
    assert st["no_change_dropped"] == source_gone + 1
    _, text = card(res)
    assert ("4 reject verdicts in force: 2 edit pairs and 1 no-change samples left out, 1 on "
            "pairs or samples already left out") in text
    assert (f"{len(samples)} no-change samples made, {len(samples) - source_gone - 1} exported, "
            f"{source_gone + 1} left out: {source_gone} because their source pair is not in "
            "the export") in text and "1 rejected in review." in text


def test_a_local_export_names_its_folder(plain, tmp_path):
    _, text = card(export_build(plain))
    assert 'ds = load_dataset("build/export")  # this export\'s folder' in text
    assert "<this repo id" not in text
    _, other = card(export_build(plain, tmp_path / "elsewhere"))
    assert 'load_dataset("elsewhere")' in other


def closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One small build exported; a push to an unreachable Hub, then one to the Hub stand-in
    as me/interiors (branch v1), through the CLI."""
    from conftest import MINI_RECIPE
    from test_push import FakeHub, push

    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    root = tmp_path_factory.mktemp("card-push")
    (root / "mini.yaml").write_text(MINI_RECIPE)
    build = Build.init(root / "build", load_recipe(root / "mini.yaml"),
                       overrides=["export.grid_pairs=2", "augment.ratio=0.3",
                                  "export.test_ratio=0.25"])
    make_build(build, samples=2, keep_every=1)
    run_augment(build)
    export_build(build)
    readme = build.root / "export" / "README.md"
    before = readme.read_text()
    failed = push(build, "me/interiors", endpoint=f"http://127.0.0.1:{closed_port()}")
    after_failed = readme.read_text()
    with FakeHub() as hub_:
        r = push(build, "me/interiors", "--revision", "v1", endpoint=hub_.url)
    assert r.returncode == 0, r.stderr
    return {"build": build, "hub": hub_, "push": r, "failed": failed, "before": before,
            "after_failed": after_failed}


@pytest.mark.server
def test_push_puts_the_repo_id_in_the_card(pushed):
    build, r = pushed["build"], pushed["push"]
    assert "load_dataset('me/interiors', revision='v1')" in r.stdout
    uploaded = pushed["hub"].uploaded["README.md"].decode()
    want = 'ds = load_dataset("me/interiors", revision="v1")'
    assert want in uploaded and "not pushed" not in uploaded
    assert pushed["hub"].metadata["language"] == "en"  # the Hub's YAML check saw it
    local = (build.root / "export" / "README.md").read_text()
    assert want in local
    info = json.loads((build.root / "export" / "export_info.json").read_text())
    assert [(p["repo_id"], p["revision"]) for p in info["pushes"]] == [("me/interiors", "v1")]
    # a re-export of the pushed folder still names the repo it lives in
    again = export_build(build, force=True)
    assert want in (again.path / "README.md").read_text()
    assert json.loads((again.path / "export_info.json").read_text())["pushes"] == \
        info["pushes"]


@pytest.mark.server
def test_a_failed_push_leaves_the_card_as_it_was(pushed):
    """The card names the repo only once the upload went through."""
    failed = pushed["failed"]
    assert failed.returncode == 2 and "cannot reach the Hub" in failed.stderr
    assert pushed["after_failed"] == pushed["before"]
    assert 'load_dataset("build/export")' in pushed["before"]


def model_card(data: str) -> tuple[dict, str]:
    from dsbuild.train.card import card_text
    from dsbuild.train.settings import TrainSettings

    s = TrainSettings(data=data, base="tiny")
    text = card_text({"settings": s.model_dump(mode="json"), "base_kind": "tiny", "steps": 3,
                      "rows": 10})
    return yaml.safe_load(text.split("---")[1]), text


def test_model_card_names_a_reusable_dataset(plain, tmp_path):
    from dsbuild.export.push import PushResult, record_push

    res = export_build(plain)
    meta, text = model_card(str(res.path))
    assert "datasets" not in meta  # a local folder is not a Hub id
    assert f"the local export `{res.path.resolve()}` (not pushed to the Hub)" in text
    record_push(res.path, PushResult("me/interiors", "url", "main", "a" * 40, []))
    meta, text = model_card(str(res.path))
    assert meta["datasets"] == ["me/interiors"]
    assert "the Hub dataset **me/interiors** (pushed from the local export" in text
    meta, text = model_card("someone/edits")
    assert meta["datasets"] == ["someone/edits"] and "the Hub dataset **someone/edits**" in text


@pytest.mark.server
def test_train_on_a_pushed_export_names_its_repo(pushed, tmp_path, one_torch_thread):
    from click.testing import CliRunner

    from dsbuild.cli import cli

    build = pushed["build"]
    out = tmp_path / "m"
    r = CliRunner().invoke(cli, ["train", str(build.root / "export"), "--base", "tiny",
                                 "--out", str(out), "--max-steps", "1", "--resolution", "32",
                                 "--batch-size", "2", "--validate-every", "0"])
    assert r.exit_code == 0, r.output
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["datasets"] == ["me/interiors"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["dataset"]["hub_id"] == "me/interiors"
