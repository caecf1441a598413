"""The import graph runs one way: each module imports only modules of its own layer or below, with no
cycle and no import hidden inside a function; a fresh interpreter importing the modules bottom-up
loads exactly one new project module per import."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from helpers import ROOT

# bottom to top; a module may import modules of its own layer (without a cycle) or of layers below
LAYERS = [
    ("base", ["util.errors", "util.logger", "util.compat", "util.registry", "util.pos_embed", "util.lr_sched",
              "util.lr_decay", "util.lars", "util.crop", "util.layers", "util.masking", "util.visualize",
              "util.optional", "util.recipes", "util.config", "util.flag_checks", "util.rng", "util.tracking"]),
    ("distributed", ["util.distributed"]),
    ("precision", ["util.precision", "util.metrics", "util.perf"]),
    ("sharding", ["util.sharding"]),
    ("checkpoint", ["util.formats", "util.checkpoint", "util.runs", "util.resume", "util.preemption"]),
    ("data", ["util.pixels", "util.transforms", "util.samplers", "util.datasets", "util.hf_datasets", "util.sources", "util.dali_graph", "util.dali",
              "util.loaders"]),
    ("models", ["models_mae", "models_vit"]),
    ("engine loop", ["util.engine_loop", "util.knn", "util.online_probe"]),
    ("engines", ["engine_pretrain", "engine_finetune"]),
    ("runner", ["util.settings", "util.runner", "util.classification", "util.cli", "util.misc", "util.export",
                "util.bench"]),
    ("entry points", ["main_pretrain", "main_finetune", "main_linprobe", "main_knn", "benchmark", "export",
                      "make_shards", "compute_stats"]),
    ("launchers", ["util.submit", "submitit_pretrain", "submitit_finetune", "submitit_linprobe"]),
]
LAYER_OF = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
# imports that stay inside a function on purpose (not to dodge a cycle)
LAZY_OK = {
    ("util.runner", "torch.utils.tensorboard"),  # slow to import, needed only when logging
    ("util.export", "transformers"),  # optional dependency, needed only for --format hf
    # slow to import, needed only when a figure is drawn
    *(("util.visualize", m) for m in ("matplotlib.backends.backend_agg", "matplotlib.figure")),
    # optional dependency (requirements-dali.txt), needed only for --data_loader dali: the DALI loader is
    # imported when one is built, NVIDIA DALI when a pipeline is
    ("util.loaders", "util.dali"),
    # optional dependencies (requirements-data.txt), needed only for shards and Hugging Face datasets
    ("util.sources", "wids"), ("util.hf_datasets", "datasets"), ("util.sources", "braceexpand"), ("make_shards", "webdataset"),
    ("util.pixels", "tifffile"),
    ("util.tracking", "wandb"),  # optional (requirements-wandb.txt), only with --wandb
    *(("util.dali_graph", m) for m in ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.math", "nvidia.dali.types",
                                       "nvidia.dali.auto_aug", "nvidia.dali.auto_aug.core")),
    ("util.dali", "nvidia.dali.plugin.pytorch"),
}


def _project_modules():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "util", "*.py"))
    return {os.path.relpath(f, ROOT)[:-3].replace(os.sep, "."): f for f in files
            if not f.endswith("__init__.py")}


def _imports(path):
    """(top-level project-or-not module names imported, names imported inside functions)."""
    tree = ast.parse(open(path).read())
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        else:
            continue
        top |= names
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    inner |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    inner.add(node.module)
    return top, inner


def _graph():
    mods = _project_modules()
    edges, lazy = {}, {}
    for m, path in mods.items():
        top, inner = _imports(path)
        edges[m] = {n for n in top if n in mods and n != m}
        lazy[m] = inner
    return mods, edges, lazy


def _topological(edges):
    order, state = [], {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(edges[m]):
            visit(n, path + [m])
        state[m] = 2
        order.append(m)

    for m in sorted(edges):
        visit(m, [])
    return order


def test_every_module_has_a_layer():
    assert set(_project_modules()) == set(LAYER_OF)


def test_imports_run_one_way_without_cycles():
    _, edges, _ = _graph()
    _topological(edges)  # raises on a cycle
    upward = [(m, n) for m, targets in edges.items() for n in targets if LAYER_OF[n] > LAYER_OF[m]]
    assert upward == []


def test_no_entry_point_imports_dali_until_a_dali_loader_is_built():
    # util.dali is imported only inside util.loaders, when --data_loader dali builds a loader; NVIDIA DALI only
    # inside util.dali and util.dali_graph, when a pipeline is built
    _, edges, _ = _graph()
    seen, todo = set(), ["main_pretrain", "main_finetune", "main_linprobe", "main_knn", "benchmark", "export",
                         "make_shards", "util.submit"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(n for n in edges[m] if (m, n) not in LAZY_OK)  # the edges of module-level imports
    assert "util.dali" not in seen and "util.loaders" in seen
    assert not any(n.startswith("nvidia") and (m, n) not in LAZY_OK
                   for m in seen for n in _imports(_project_modules()[m])[0])


def test_no_import_inside_a_function_except_the_listed_ones():
    mods, _, lazy = _graph()
    found = {(m, n) for m, names in lazy.items() for n in names}
    assert found == LAZY_OK


def test_the_reference_names_stay_where_they_were():
    import engine_finetune
    import engine_pretrain
    import models_mae
    import util.datasets
    import util.misc as misc

    for name in ("init_distributed_mode", "get_rank", "get_world_size", "is_main_process", "save_on_master",
                 "all_reduce_mean", "SmoothedValue", "MetricLogger", "NativeScalerWithGradNormCount",
                 "get_grad_norm_", "save_model", "load_model", "is_dist_avail_and_initialized"):
        assert callable(getattr(misc, name)), name
    assert callable(util.datasets.build_dataset) and callable(util.datasets.build_transform)
    assert callable(engine_pretrain.train_one_epoch) and callable(engine_finetune.train_one_epoch)
    assert callable(engine_finetune.evaluate) and callable(models_mae.__dict__["mae_vit_large_patch16"])


@pytest.mark.e2e
def test_fresh_interpreter_imports_bottom_up_one_module_at_a_time():
    _, edges, _ = _graph()
    order = _topological(edges)
    script = f"""
import importlib, sys
sys.path.insert(0, {ROOT!r})
project = {sorted(edges)!r}
loaded = lambda: {{m for m in project if m in sys.modules}}
for m in {order!r}:
    before = loaded()
    importlib.import_module(m)
    new = loaded() - before
    assert new == {{m}}, (m, sorted(new))
print("ok", len(project))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(len(order))]
