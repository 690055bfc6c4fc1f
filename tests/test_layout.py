"""The library (src/, method/) never imports a script; the public names stay put."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"main", "eval_knn", "eval_linear", "eval_clusters", "args", "flags", "tools",
           "hubconf"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_library_imports_no_script():
    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "method").glob("*.py"))
    assert len(files) > 30 and REPO / "src" / "train" / "loop.py" in files
    bad = {(str(f.relative_to(REPO)), m) for f in files for m in imported_modules(f)
           if m.split(".")[0] in SCRIPTS}
    assert not bad


def test_method_classes_do_not_read_the_dataset_table():
    """The script decides stem and initialisation and hands the method its encoder."""
    for name in ("base.py", "resa.py"):
        modules = set(imported_modules(REPO / "method" / name))
        assert not {m for m in modules if m == "src.data" or m.startswith("src.data.")}, name


def test_knn_classifier_still_importable_from_the_script():
    import eval_knn
    from src.eval.knn import knn_classifier
    assert eval_knn.knn_classifier is knn_classifier
