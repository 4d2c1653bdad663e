"""The import graph of retrain/ is layered and has no cycle: a module imports only modules of its
own layer or below (imports inside functions count too). A new module gets a line in LAYERS."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retrain"

# Lowest first. Within a layer imports are allowed, as long as there is no cycle.
LAYERS = [
    {"retrain", "errors", "files", "progress", "interrupt"},
    {"config", "images", "runtime", "head", "split", "run", "zoo", "onnx_backbone", "onnx_cut", "store", "store_format"},
    {"augment", "scan", "calibrate", "pipeline", "architectures", "summaries", "quantize", "mislabels",
     "novelty", "charts", "galleries", "findings", "near_duplicates"},
    {"features", "cache", "bottlenecks", "backbone_split", "finetune", "finetune_ddp", "model", "classifier",
     "distributed", "streamfit"},
    {"check", "evaluate", "label", "report", "bench", "embed", "backbones", "fit_data", "final_layer",
     "fit_output"},
    {"export", "compare", "fit", "serve"},
    {"cli", "__main__"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return parts[0] if parts else "retrain"  # a subpackage (retrain/serve/...) is one module here


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "retrain":
            parts = node.module.split(".")
            out.add(parts[1] if len(parts) > 1 else "retrain")
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("retrain.")}
    return out


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for p in PACKAGE.rglob("*.py"):
        m = module_name(p)
        g.setdefault(m, set()).update(imports_of(p) - {m})
    return g


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(LAYER))
    assert not missing, f"add these modules to LAYERS in tests/test_layers.py: {missing}"


def test_imports_go_down_the_layers():
    bad = [f"{m} (layer {LAYER[m]}) imports {d} (layer {LAYER[d]})"
           for m, deps in graph().items() for d in deps if m in LAYER and d in LAYER and LAYER[d] > LAYER[m]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_the_layering_test_sees_a_cycle(tmp_path, monkeypatch):
    """The checker itself: a made-up package where a imports b and b imports a."""
    (tmp_path / "a.py").write_text("from retrain.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from retrain.a import y\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "a -> b -> a" in str(e) or "b -> a -> b" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")
