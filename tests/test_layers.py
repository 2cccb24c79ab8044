"""The house by layer (docs/architecture.md), read from the AST: imports inside functions count.

Rules (a ``"dsbuild.module:attribute"`` string, imported when used, counts as an import):
1. a module never imports a module of a higher layer;
2. no stage package imports another stage package, and the editing packages (train, evaluate,
   localize) import no stage package;
3. no import cycle between sibling packages, at any level;
4. every ``from_pretrained`` and every model built from a config is in the models layer (a
   bench's plain-library baseline may load on purpose).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsbuild"

# lowest first; a module belongs to the longest entry that names it or a package above it
# ("=name": that module only). The top-level package holds only __version__.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("=dsbuild", "dsbuild.core")),
    ("models", ("dsbuild.models",)),
    ("attention", ("dsbuild.attention",)),
    ("llm", ("dsbuild.llm",)),
    ("stages", ("dsbuild.sources", "dsbuild.captions", "dsbuild.generate", "dsbuild.filter", "dsbuild.verify",
                "dsbuild.augment", "dsbuild.diversity", "dsbuild.export")),
    ("editing", ("dsbuild.train", "dsbuild.evaluate", "dsbuild.localize")),
    ("review", ("dsbuild.review",)),
    ("executors", ("dsbuild.executors",)),
    ("cli", ("dsbuild.cli", "dsbuild.bench", "dsbuild.__main__")),
]
STAGES = dict(LAYERS)["stages"]
EDITING = dict(LAYERS)["editing"]
MODEL_CALLS = {"from_pretrained", "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel",
               "Owlv2ForObjectDetection", "OwlViTForObjectDetection",
               "CLIPSegForImageSegmentation", "SamModel", "Dinov2Model", "ViTModel",
               "create_model_and_transforms", "create_model", "CLIPVisionModelWithProjection",
               "CLIPTextModelWithProjection", "load_model", "SentenceTransformer",
               "FluxTransformer2DModel", "T5EncoderModel"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


TARGET = re.compile(r"^dsbuild(\.\w+)+:\w+$")  # a lazy "module:attribute" target


def _resolve(name: str) -> str | None:
    """The dsbuild module an import names (an imported attribute resolves to its module)."""
    while name and name not in MODULES:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def imports_of(mod: str) -> set[str]:
    pkg = mod if MODULES[mod].name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(TREES[mod]):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and TARGET.match(node.value):  # "module:attr", imported when used
            names = [node.value.split(":")[0]]
        for n in names:
            if n.split(".")[0] == "dsbuild" and (t := _resolve(n)) and t != mod:
                out.add(t)
    return out


def layer_of(mod: str) -> int:
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if pre.startswith("="):
                if mod == pre[1:]:
                    return i
                continue
            if (mod == pre or mod.startswith(pre + ".")) and pre.count(".") > depth:
                best, depth = i, pre.count(".")
    assert best is not None, f"{mod} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def package_of(mod: str, prefixes) -> str | None:
    return next((p for p in prefixes if mod == p or mod.startswith(p + ".")), None)


EDGES = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_module_imports_a_higher_layer():
    bad = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
           for a, targets in EDGES.items() for b in targets
           if layer_of(b) > layer_of(a)]
    assert not bad, "imports of a higher layer:\n" + "\n".join(sorted(bad))


def test_no_stage_imports_another_stage_and_editing_imports_none():
    bad = []
    for a, targets in EDGES.items():
        sa, ea = package_of(a, STAGES), package_of(a, EDITING)
        for b in targets:
            sb = package_of(b, STAGES)
            if sb and ((sa and sa != sb) or ea):
                bad.append(f"{a} -> {b}")
    assert not bad, "stage packages import each other:\n" + "\n".join(sorted(bad))


def _unit(mod: str, parent: str) -> str | None:
    if not mod.startswith(parent + "."):
        return None
    return parent + "." + mod[len(parent) + 1:].split(".")[0]


def sibling_cycles() -> list[list[str]]:
    """Cycles among the subpackages of each package (Tarjan's strongly connected parts)."""
    found = []
    for parent in sorted(PACKAGES):
        graph: dict[str, set[str]] = {}
        for a, targets in EDGES.items():
            ua = _unit(a, parent)
            if ua not in PACKAGES:
                continue
            for b in targets:
                ub = _unit(b, parent)
                if ub and ub != ua and ub in PACKAGES:
                    graph.setdefault(ua, set()).add(ub)
        index, low, stack, on = {}, {}, [], set()

        def visit(v, graph=graph, index=index, low=low, stack=stack, on=on):
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in graph.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))

        for v in list(graph):
            if v not in index:
                visit(v)
    return found


def test_no_package_import_cycle():
    cycles = sibling_cycles()
    assert not cycles, "package cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def model_loads(trees) -> list[str]:
    """Model loads and builds outside dsbuild/models (a bench's plain baseline may load)."""
    bad = []
    for m, tree in trees.items():
        if m.startswith("dsbuild.models") or m.startswith("dsbuild.bench"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in MODEL_CALLS:
                    bad.append(f"{m}:{node.lineno}: {name}")
    return bad


def test_models_are_loaded_only_in_the_models_layer():
    bad = model_loads(TREES)
    assert not bad, "models loaded outside dsbuild/models:\n" + "\n".join(bad)
    # the check finds a load where it does not belong
    fake = {"dsbuild.filter.fake": ast.parse("CLIPModel.from_pretrained('x')")}
    assert model_loads(fake) == ["dsbuild.filter.fake:1: from_pretrained"]


@pytest.mark.parametrize("rule", [test_no_module_imports_a_higher_layer,
                                  test_no_stage_imports_another_stage_and_editing_imports_none,
                                  test_no_package_import_cycle])
def test_the_rules_can_fail(rule, monkeypatch):
    """Each rule fails on the import it forbids (so a green run means something)."""
    fake = {"dsbuild.core.build": {"dsbuild.cli.run"},
            "dsbuild.filter.stage": {"dsbuild.generate.settings"},
            "dsbuild.train.model": {"dsbuild.export.dataset"},
            "dsbuild.models": {"dsbuild.core.errors"},
            "dsbuild.core.errors": {"dsbuild.models"}}
    edges = {k: set(v) for k, v in EDGES.items()}
    for a, bs in fake.items():
        edges.setdefault(a, set()).update(bs)
    monkeypatch.setitem(globals(), "EDGES", edges)
    with pytest.raises(AssertionError):
        rule()
