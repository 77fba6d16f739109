"""The package's structure: layers that only point down, no import cycle, one error root that
the command line turns into one line, and backbone registry entries that are complete.

The layer table below is the package's data flow (docs/architecture.md, "Package layout"); a module may import its
own layer and the layers below it, never above, and the two peers of layer 4 (training,
evaluation) never import each other: what combines them lives in ``experiments``.
"""

from __future__ import annotations

import ast
import graphlib
import json
from pathlib import Path

import pytest
import torch

import imagegen as g
from kneeosteo.errors import ConfigError, KneeosteoError
from kneeosteo.interfaces.cli import main
from kneeosteo.models import BACKBONES, HybridModel, get_backbone_spec
from kneeosteo.run import RunDir

PKG = Path(__file__).resolve().parent.parent / "kneeosteo"

LAYERS = {  # module prefix -> layer
    "kneeosteo": 0,
    "kneeosteo.errors": 0,
    "kneeosteo.paths": 0,
    "kneeosteo.utils": 0,
    "kneeosteo.data": 1,
    "kneeosteo.models": 2,
    "kneeosteo.tasks": 2,
    "kneeosteo.config": 3,
    "kneeosteo.run": 3,
    "kneeosteo.features": 3,
    "kneeosteo.trust": 3,
    "kneeosteo.training": 4,
    "kneeosteo.evaluation": 4,
    "kneeosteo.experiments": 5,
    "kneeosteo.inference": 6,
    "kneeosteo.reporting": 7,
    "kneeosteo.interfaces": 8,
    "kneeosteo.__main__": 8,
}
PEERS = {frozenset({"kneeosteo.training", "kneeosteo.evaluation"})}


def _layer_key(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    raise KeyError(module)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every kneeosteo module ``module`` imports, at module level or inside a function."""
    found = set()
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from kneeosteo.models import build_model` -> kneeosteo.models
                name = name.rpartition(".")[0]
            if name.startswith("kneeosteo") and name != module:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        _layer_key(module)  # KeyError names a module the table forgot


def test_no_module_imports_a_layer_above_it(graph):
    upward = []
    for module, targets in graph.items():
        src = _layer_key(module)
        for target in targets:
            dst = _layer_key(target)
            if target == "kneeosteo" or src == dst:
                continue
            if LAYERS[dst] > LAYERS[src] or frozenset({src, dst}) in PEERS:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up (or across the training/evaluation peers):\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle(graph):
    # package __init__ files re-export their own modules; the edge package -> its submodule is
    # the re-export, not a dependency, so it is left out of the cycle check
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    graphlib.TopologicalSorter(edges).prepare()  # raises CycleError naming the cycle


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule is not vacuous: a data module importing inference is flagged."""
    fake = tmp_path / "kneeosteo" / "data" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from kneeosteo.inference.predictor import Predictor\n")
    targets = _imports("kneeosteo.data.bad", fake, set(_modules()))
    assert "kneeosteo.inference.predictor" in targets
    assert LAYERS[_layer_key("kneeosteo.inference.predictor")] > LAYERS[_layer_key("kneeosteo.data.bad")]


def test_every_error_class_has_the_one_root():
    import kneeosteo.errors as errors

    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, KneeosteoError) for c in classes)
    assert ConfigError.exit_code == 2 and errors.DataError.exit_code == 1
    assert issubclass(errors.OutputError, OSError)  # callers that catch OSError keep working


# ------------------------------------------------------------------------------ CLI errors


@pytest.fixture(scope="module")
def bad_cli_world(tmp_path_factory):
    """A tiny data set, an image, and a run folder whose config.json was edited."""
    root = tmp_path_factory.mktemp("clierr")
    g.make_dataset(root / "data", n_per_class=4)
    data = root / "data"
    image = g.png_grey8(root / "knee.png")
    (root / "bad.toml").write_text("[train]\nno_such_setting = 1\n")
    (root / "notes.txt").write_text("not an image\n")
    tampered = root / "tampered"
    bundled = RunDir.bundled()
    tampered.mkdir()
    for f in ("config.json", "model.safetensors"):
        (tampered / f).write_bytes((bundled.path / f).read_bytes())
    doc = json.loads((tampered / "config.json").read_text())
    doc["identity"]["threshold"] = 0.1
    (tampered / "config.json").write_text(json.dumps(doc))
    return {"DATA": str(data), "IMG": str(image), "ROOT": str(root), "TAMPERED": str(tampered)}


BAD_INVOCATIONS = [  # (arguments, exit code, words the one line must contain)
    ("train {DATA} --precision fp16", 2, "fp16"),
    ("train {DATA} --preprocess foo", 2, "foo"),
    ("train {DATA} --augment sometimes", 2, "sometimes"),
    ("train {DATA} --backbone resnet5", 2, "resnet5"),
    ("train {DATA} --epochs 0 --out {ROOT}/r", 2, "epochs"),
    ("train {DATA} --batch-size 1 --out {ROOT}/r", 2, "batch_size"),
    ("train {DATA} --lr -1 --out {ROOT}/r", 2, "lr"),
    ("train {DATA} --zoom 1.2,0.9 --out {ROOT}/r", 2, "zoom"),
    ("train {DATA} --zoom 1,x --out {ROOT}/r", 2, "LOW,HIGH"),
    ("train {DATA} --config {ROOT}/bad.toml --out {ROOT}/r", 2, "no_such_setting"),
    ("train {DATA} --config {ROOT}/missing.toml --out {ROOT}/r", 2, "missing.toml"),
    ("train {DATA} --device cuda --out {ROOT}/r", 2, "cuda"),
    ("train {ROOT}/no_such_data --out {ROOT}/r", 1, "no_such_data"),
    ("train {DATA} --backbone densenet169 --epochs 1 --out {ROOT}/dn", 1, "densenet169"),
    ("train --resume {ROOT}/not_a_run", 1, "not_a_run"),
    ("train {DATA} --no-attention --no-backbone --out {ROOT}/r", 2, "attention"),
    ("train {DATA} --trainable-stages 2 --out {ROOT}/r", 2, "needs model.finetune"),
    ("train {DATA} --source-augment --out {ROOT}/r", 2, "augment.mode = online"),
    ("split {DATA} --protocol kfolds --out {ROOT}/s.json", 2, "kfolds"),
    ("audit {ROOT}/no_such_data --out {ROOT}/a", 1, "no_such_data"),
    ("evaluate {ROOT}/not_a_run", 1, "not_a_run"),
    ("predict {ROOT}/no_such.png", 1, "no image could be read"),
    ("predict {IMG} --out {ROOT}/p.txt", 2, "p.txt"),
    ("predict {IMG} --engine tensorrt", 2, "--engine"),
    ("predict {IMG} --threshold 2", 2, "threshold"),
    ("predict {IMG} --run {ROOT}/not_a_run", 1, "not_a_run"),
    ("predict {IMG} --run {TAMPERED}", 1, "config.json"),
    ("predict {ROOT}/notes.txt", 1, "no image could be read"),
    ("explain {IMG} --out {ROOT}/e --target both", 2, "both"),
    ("export --format torchscript --out {ROOT}/m.pt", 2, "torchscript"),
    ("export --run {ROOT}/not_a_run --out {ROOT}/m.onnx", 1, "not_a_run"),
    ("serve --run {ROOT}/not_a_run", 1, "not_a_run"),
    ("reproduce {DATA} --protocol loo --out {ROOT}/rep", 2, "loo"),
    ("report {ROOT}/not_a_run --out {ROOT}/r.html", 1, "not_a_run"),
    ("report {TAMPERED} --out {ROOT}/r.html", 1, "config.json"),
    ("report {TAMPERED} --out {ROOT}/r.html --data {ROOT}/no_such_data", 1, "no_such_data"),
    ("predict {IMG} --dicom-out {ROOT}/d --workers 2", 2, "--dicom-out"),
    ("pacs http://user:pw@127.0.0.1:9/dicom-web", 2, "not in the URL"),
    ("pacs ftp://127.0.0.1/dicom-web", 2, "http(s)"),
    ("pacs http://127.0.0.1:9/dicom-web --since yesterday", 2, "YYYYMMDD"),
    ("pacs http://127.0.0.1:9/dicom-web --run {ROOT}/not_a_run", 1, "not_a_run"),
    ("no-such-command", 2, "no-such-command"),
]


@pytest.mark.parametrize("args,code,words", BAD_INVOCATIONS, ids=[a for a, _, _ in BAD_INVOCATIONS])
def test_a_bad_invocation_is_one_line_and_an_exit_code(args, code, words, bad_cli_world, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KNEEOSTEO_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no DenseNet169 weights anywhere
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(args.format(**bad_cli_world).split())
    argv = args.format(**bad_cli_world).split()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    errors = [line for line in lines if line.startswith("error:")]
    assert exc.value.code == code, err
    assert "Traceback" not in err
    assert len(errors) == 1 and words in errors[0], err
    # besides the one error line, only per-file reports naming an input the user gave (predict)
    assert all(line in errors or any(line.startswith(a + ":") for a in argv) for line in lines), err


# ------------------------------------------------------------------------------ the registry


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_is_complete(name):
    """Like timm testing every registered model: an entry alone is enough to build the hybrid,
    size its head, explain it with Grad-CAM and say where its weights come from."""
    spec = get_backbone_spec(name)
    assert spec.title and spec.weight_sources
    assert len(spec.mean) == 3 and len(spec.std) == 3 and all(s > 0 for s in spec.std)
    with torch.device("meta"):
        backbone = spec.builder()
        feats = backbone(torch.empty(2, 3, spec.input_size, spec.input_size))
        assert feats.shape == (2, spec.feature_dim)  # the derived size is what the network gives
        model = HybridModel(name, backbone, spec.feature_dim)
        assert model.head.config()["in_features"] == spec.feature_dim + 128
        if spec.gradcam_layer is not None:
            maps = {}
            layer = backbone.get_submodule(spec.gradcam_layer)
            layer.register_forward_hook(lambda m, i, o: maps.setdefault("out", o))
            backbone(torch.empty(1, 3, 224, 224))
            assert maps["out"].dim() == 4, f"{spec.gradcam_layer} is not a spatial feature map"


def test_an_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="choose one of"):
        get_backbone_spec("resnet5")


def test_adding_a_backbone_is_one_registry_entry(monkeypatch):
    """The recipe in docs/architecture.md ("Extending"): register a spec, and the config, the model factory and the Grad-CAM
    layer lookup accept it without any other change."""
    from torch import nn

    from kneeosteo.config import TrainConfig
    from kneeosteo.inference.explain import gradcam_layer
    from kneeosteo.models import BackboneSpec, build_model, register_backbone, registry

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    register_backbone(
        BackboneSpec(
            name="tiny_cnn",
            title="a test backbone",
            input_size=32,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            builder=tiny,
            weight_sources="none (test)",
            gradcam_layer="0",
        )
    )
    assert TrainConfig.from_dict(dict(backbone="tiny_cnn", backbone_weights="none")).model.backbone == "tiny_cnn"
    model, info = build_model("tiny_cnn", weights="none")
    assert model.feature_dim == 8 and not info.pretrained
    assert model(images=torch.randn(2, 3, 32, 32)).shape == (2,)
    assert gradcam_layer(model)[0] == "backbone.0"


def test_the_readme_lists_exactly_the_run_folder_files():
    """One table of what a run folder holds (``kneeosteo.run.RUN_FILES``); docs/cli.md (`train`) shows it."""
    from kneeosteo.run import RUN_FILES

    docs = (PKG.parent / "docs" / "cli.md").read_text()
    table = docs[docs.index("RUN holds:") :].split("\n\n")[1]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert rows == RUN_FILES


# ------------------------------------------------------------------------------ the task is an object

TASK_NAME_MODULES = {  # where a task's name may be compared: where a run is read or created, and the tasks
    "kneeosteo.tasks",
    "kneeosteo.run",
    "kneeosteo.config",
    "kneeosteo.choices",
}


def _task_name_comparisons(source: str) -> list[int]:
    """Line numbers where a task name ("binary", "multiclass", "regression") is an operand of a
    comparison (==, !=, in, not in; in a tuple, list or set too)."""
    from kneeosteo.choices import TASK_NAMES

    def names(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in TASK_NAMES
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names(e) for e in node.elts)
        return False

    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Compare) and any(names(n) for n in (node.left, *node.comparators))
    ]


def test_task_names_are_compared_only_where_a_run_is_read_or_created():
    """Everything else asks the run's task object (kneeosteo/tasks) instead of comparing its name."""
    found = {}
    for module, path in _modules().items():
        if _layer_key(module) in TASK_NAME_MODULES or module in TASK_NAME_MODULES:
            continue
        lines = _task_name_comparisons(path.read_text())
        if lines:
            found[module] = lines
    assert not found, "task names compared as strings (ask kneeosteo.tasks.task_for(cfg) instead):\n" + "\n".join(
        f"{m}: lines {sorted(ls)}" for m, ls in sorted(found.items())
    )


def test_the_task_name_checker_catches_a_comparison():
    src = 'def f(cfg, m):\n    a = cfg.task == "binary"\n    b = m["task"] in ("multiclass", "regression")\n    c = {"task": "binary"}\n'
    assert _task_name_comparisons(src) == [2, 3]  # a comparison, a membership test; a dict value is not one


TASK_CLASSES = {"Binary", "Multiclass", "Regression"}
TASK_ISINSTANCE_ALLOWED: dict[str, int] = {}  # module -> type checks of a task it may still hold: none left


def _task_type_checks(source: str) -> list[int]:
    """Line numbers of ``isinstance(x, Binary|Multiclass|Regression)`` (a tuple of them too, or
    ``tasks.Binary``): a branch on the task's class instead of asking the task."""

    def task_class(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(task_class(e) for e in node.elts)
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        return name in TASK_CLASSES

    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and task_class(node.args[1])
    ]


def test_no_module_branches_on_the_tasks_class():
    """What differs between tasks is the task's (its methods, ``scoring``, its capability flags):
    outside kneeosteo/tasks no module asks which class a task is (issue 29)."""
    found = {}
    for module, path in _modules().items():
        if _layer_key(module) == "kneeosteo.tasks":
            continue
        lines = _task_type_checks(path.read_text())
        if len(lines) > TASK_ISINSTANCE_ALLOWED.get(module, 0):
            found[module] = lines
    assert not found, "isinstance on a task class (ask the task: a method or a capability flag):\n" + "\n".join(
        f"{m}: lines {ls}" for m, ls in sorted(found.items())
    )
    for module, allowed in TASK_ISINSTANCE_ALLOWED.items():  # an entry that has shrunk must be shrunk here too
        assert len(_task_type_checks(_modules()[module].read_text())) == allowed, module


def test_the_task_type_checker_catches_a_branch():
    src = (
        "def f(task, t):\n    if isinstance(task, Binary):\n        pass\n"
        "    a = isinstance(t, (tasks.Multiclass, int))\n    b = isinstance(task, Task)\n    c = type(task) is type(t)\n"
    )
    assert _task_type_checks(src) == [2, 4]  # a class, a tuple with one; the base class and type() are not
