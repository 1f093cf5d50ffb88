"""The package's structure: imports only downward, masks drawn in one place, exports that leave the model."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_chts
from hf_chts.config import SparseTrainingConfig

# Each module sits at its real layer: one above the highest module it imports (at the top or inside a
# function alike; a package's lazily exported names count as imports), 0 when it imports none. A new module
# goes into the lowest layer above everything it imports; test_each_module_sits_at_its_real_layer says where.
LAYERS: list[set[str]] = [
    {
        "_step_cost",
        "_validation",
        "data.corpus",
        "data.tasks.local.hellaswag_utils",
        "datasets_paper",
        "distributed",
        "masking.buffer",
        "masking.selection",
        "modeling.llama_layout",
        "profiling",
        "rewarmup",
        "sparse_ops",
        "topology._fused",
        "topology.rows",
        "version",
        "weights_io",
    },
    {
        "checkpointing",
        "data.loading",
        "data.tokenizer",
        "finished_run",
        "masking.layers",
        "masking.optim",
        "stats",
        "topology.ch3_l3p",
        "topology.ch_reference",
        "topology.percolation",
        "topology.rng",
        "topology.schedules",
        "topology.scores",
        "topology.stacks",
        "topology.topk",
    },
    {
        "chains",
        "data.packing",
        "masking.compute",
        "masking.masks",
        "topology.csti",
        "topology.link_prediction",
        "topology.sampling",
    },
    {"data", "masking", "topology.init", "topology.regrowth", "topology.removal"},
    {"config", "dense_export", "peft_utils", "topology"},
    {"compact", "initial", "modeling.configuration_sparse_llama", "recipe_utils", "resume"},
    {"auto", "engine", "evaluation", "plotting"},
    {"hub", "sparsify", "update"},
    {"callback", "cli", "modeling.modeling_sparse_llama"},
    {"modeling"},  # the package: its names load lazily from the modules below
    {""},  # the package itself: `import hf_chts` registers the models and re-exports the API
]
# Pairs that must never import each other, directly or through other modules: (importer prefix, what it must
# not reach, why).
FORBIDDEN = [
    ("masking", "engine", "masked layers know nothing of the topology engine"),
    ("topology", "masking", "topology is pure tensor functions"),
    ("topology", "engine", "topology is pure tensor functions; the engine orchestrates it"),
    ("topology", "config", "topology takes values, not the config"),
    ("topology", "callback", "topology is pure tensor functions"),
    ("engine", "masking", "the engine works on tensors, not modules"),
]
# The only modules outside the topology package that topology may import (the bottom layer's helpers).
TOPOLOGY_MAY_IMPORT = {"_validation", "profiling", "modeling.llama_layout"}
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
PACKAGE = Path(hf_chts.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``hf_chts`` module imported anywhere in the file, as a name relative to the package."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "hf_chts":
                module = node.module[len("hf_chts") :].lstrip(".")
            else:
                continue
            targets = [module] if node.module else [f"{module}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [
                a.name[len("hf_chts") :].lstrip(".") for a in node.names if a.name.split(".")[0] == "hf_chts"
            ]
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if names and names[0] in ("_LAZY", "_EXPORTS"):  # name -> submodule, imported on first access
                targets = [
                    ".".join([*package, v.value]) for v in node.value.values if isinstance(v, ast.Constant)
                ]
        for target in targets:
            while target not in RANK and "." in target:  # `from .modeling import x` names module `modeling`
                target = target.rsplit(".", 1)[0]
            found.append((target, node.lineno))
    return found


def test_every_module_has_a_layer():
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    missing = sorted(modules - set(RANK))
    assert not missing, f"modules without a layer: {missing}; add them to LAYERS in {__file__}"


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        for target, line in _imports(path):
            if target not in RANK:
                upward.append(f"{importer}:{line} imports unknown hf_chts module {target!r}")
            elif target != importer and RANK[target] >= RANK.get(importer, -1):
                upward.append(
                    f"{importer}:{line} imports {target!r} (layer {RANK[target]} >= {RANK[importer]})"
                )
    assert not upward, "\n".join(upward)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t, _ in _imports(p) if t != m and t in modules} for m, p in modules.items()}


def test_each_module_sits_at_its_real_layer():
    graph = _import_graph()
    wrong = []
    for module, deps in sorted(graph.items()):
        real = 1 + max((RANK[d] for d in deps if d in RANK), default=-1)
        if module in RANK and RANK[module] != real:
            wrong.append(f"{module!r} is in layer {RANK[module]} but its imports put it in layer {real}")
    assert not wrong, "\n".join(wrong)


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_forbidden_pairs_never_import_each_other():
    graph = _import_graph()
    found = []
    for importer, target, why in FORBIDDEN:
        for module in (m for m in graph if _under(m, importer)):
            reached = sorted(d for d in _reach(graph, module) if _under(d, target))
            if reached:
                found.append(f"{module} reaches {reached} ({why})")
    for module in (m for m in graph if _under(m, "topology")):
        outside = sorted(
            d for d in graph[module] if not _under(d, "topology") and d not in TOPOLOGY_MAY_IMPORT
        )
        if outside:
            found.append(
                f"{module} imports {outside}: topology imports only topology and {TOPOLOGY_MAY_IMPORT}"
            )
    assert not found, "\n".join(found)


def test_no_module_imports_another_modules_private_name():
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hf_chts")):
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                if private:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {private}")
    assert not found, "\n".join(found)


def test_size_limits_and_one_mask_accessor():
    root = PACKAGE.parent
    engine = len((PACKAGE / "engine.py").read_text().splitlines())
    assert engine <= 450, f"engine.py has {engine} lines; the phases belong in topology/, not in the engine"
    files = [*PACKAGE.rglob("*.py"), *(root / "benchmarks").rglob("*.py")]
    big = {str(p.relative_to(root)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"files over 600 lines (split them by job): {big}"
    needle = "._buffers" + "["  # spelled apart so that this file does not match itself
    buffers = [
        str(p.relative_to(root))
        for p in [*files, *(root / "tests").rglob("*.py"), *(root / "recipes").rglob("*.py")]
        if needle in p.read_text() and not _under(_module_name(p) if PACKAGE in p.parents else "", "masking")
    ]
    assert not buffers, f"read masks with hf_chts.masking.layer_mask, not the module buffer dict: {buffers}"


def test_each_option_list_is_spelled_once():
    """The config's allowed values are the topology's own tuples (the objects, not copies)."""
    from hf_chts import config
    from hf_chts.topology import init, link_prediction, regrowth, sampling, schedules, scores

    assert config.CH_VARIANTS is link_prediction.CH_VARIANTS and "CH3_L3p" in config.CH_VARIANTS
    assert config.CH_PRECISIONS is link_prediction.CH_PRECISIONS
    assert config.INIT_METHODS is init.INIT_METHODS
    assert config.SELECTION_MODES is sampling.SELECTION_MODES
    assert config.DENSITY_SCHEDULES is schedules.DENSITY_SCHEDULES
    assert config.ZETA_SCHEDULES is schedules.DROP_FRACTION_KINDS
    assert config.REGROWTH_METHODS[1:] == regrowth.REGROWTH_METHODS
    assert config.REMOVAL_METHODS[1:] == scores.REMOVAL_METHODS


def test_the_check_sees_function_level_imports(tmp_path):
    (tmp_path / "x.py").write_text("def f():\n    from .callback import CHTssCallback\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert _imports(tmp_path / "x.py") == [("callback", 2)]
    finally:
        PACKAGE = saved


# ---------------------------------------------------------------- one place draws masks
def test_callback_sparsify_and_sparse_llama_draw_the_same_masks():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_chts.engine import TopologyEngine
    from hf_chts.masking import get_masks
    from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM
    from hf_chts.sparsify import sparsify_

    arch = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    sparsity = SparseTrainingConfig(method="chtss", density=0.2, density_distribution="erk", seed=5)
    sparse = SparseLlamaForCausalLM(SparseLlamaConfig(**arch, sparsity=sparsity.to_dict()))
    plain = LlamaForCausalLM(LlamaConfig(**arch))
    sparsify_(plain, sparsity)
    shapes = {name: tuple(mask.shape) for name, mask in get_masks(plain).items()}
    engine = TopologyEngine(sparsity, shapes, max_steps=1000).init_masks()
    a, b = get_masks(sparse), get_masks(plain)
    assert a.keys() == b.keys() == engine.keys()
    assert all(torch.equal(a[n], b[n]) and torch.equal(b[n], engine[n]) for n in a)


# ---------------------------------------------------------------- dense export leaves the model as it is
def test_to_dense_model_and_save_dense_leave_the_callers_model_masked(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_chts.compact import save_dense, to_dense_model
    from hf_chts.masking import MaskedConv1D, get_masks
    from hf_chts.sparsify import sparsify_

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    sparsify_(model, SparseTrainingConfig(method="chts", density=0.3))
    model.eval()
    before = {n: m.clone() for n, m in get_masks(model).items()}
    ids = torch.randint(0, 64, (1, 8))
    logits = model(ids).logits
    dense = to_dense_model(model)
    save_dense(model, tmp_path / "dense")
    assert get_masks(dense) == {} and not any(isinstance(m, MaskedConv1D) for m in dense.modules())
    now = get_masks(model)
    assert now.keys() == before.keys() and all(torch.equal(now[n], before[n]) for n in now)
    torch.testing.assert_close(model(ids).logits, logits)  # the masked forward still finds its mask
    torch.testing.assert_close(dense(ids).logits, logits)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(reloaded(ids).logits, logits)


def test_unmask_restores_plain_layers_in_place():
    from hf_chts.masking import MaskedLinear, make_masked_, unmask_

    model = nn.Sequential(nn.Linear(4, 3))
    mask = torch.tensor([[True, False, True, False]] * 3)
    make_masked_(model[0], mask)
    assert isinstance(model[0], MaskedLinear)
    unmask_(model)
    assert type(model[0]) is nn.Linear and "weight_mask" not in model[0]._buffers
    assert torch.all(model[0].weight[~mask] == 0)
    model(torch.ones(2, 4)).sum().backward()  # no gradient hook is left that would read the mask
    assert torch.all(model[0].weight.grad != 0)


@pytest.mark.parametrize("model_factory", [lambda: copy.deepcopy(nn.Linear(2, 2))])
def test_unmask_of_an_unmasked_model_changes_nothing(model_factory):
    from hf_chts.masking import unmask_

    model = model_factory()
    weight = model.weight.detach().clone()
    unmask_(model)
    assert torch.equal(model.weight, weight)


# ---------------------------------------------------------------- the dependency floor
def test_pyproject_lower_bounds_are_the_tested_floor():
    root = PACKAGE.parent
    floor = {}
    for line in (root / ".ci" / "floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            floor[name.lower().replace("-", "_")] = version
    text = (root / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    bounds = {}
    for item in deps.split(","):
        item = item.strip().strip('"')
        if ">=" in item:
            name, version = item.split(">=")
            bounds[name.lower().replace("-", "_")] = version
    for name, version in floor.items():
        if name == "torch":
            # Users' torch range stays open below the only CPU wheel CI can install (see .ci/floor.txt).
            stated = tuple(int(v) for v in bounds[name].split(".")[:2])
            assert stated <= tuple(int(v) for v in version.split(".")[:2]), f"torch>={bounds[name]}"
            continue
        assert bounds.get(name, "").split(".")[:2] == version.split(".")[:2] and (
            bounds[name].count(".") < 2 or bounds[name] == version
        ), f"pyproject.toml says {name}>={bounds.get(name)}, .ci/floor.txt tests {name}=={version}"


def test_docstrings_cite_the_projects_own_method_page():
    method = (PACKAGE.parent / "docs" / "method.md").read_text()
    sections = {line.split(".")[0][3:] for line in method.splitlines() if line.startswith("## ")}
    sections |= {line.split(" ")[1][:-1] for line in method.splitlines() if line.startswith("### ")}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "ALGORITHM.md" not in text, path
        for cited in text.split("docs/method.md section ")[1:]:
            number = cited.split(")")[0].split(",")[0].split(" ")[0].rstrip(".:;")
            assert number in sections, f"{path} cites section {number!r}, which docs/method.md lacks"


# ---------------------------------------------------------------- a thin callback, no stack walking
def test_callback_module_stays_thin():
    lines = len((PACKAGE / "callback.py").read_text().splitlines())
    assert lines < 300, f"callback.py has {lines} lines; move what is not Trainer event handling out of it"


def test_no_module_walks_the_call_stack():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "name", None)
            if name in ("_getframe", "currentframe", "stack") and _is_frame_access(node):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def _is_frame_access(node: ast.AST) -> bool:
    """``sys._getframe`` / ``inspect.currentframe`` / ``inspect.stack``, as attributes or imported names."""
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id in ("sys", "inspect")
    return isinstance(node, ast.alias)
