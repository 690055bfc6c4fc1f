"""The code stays readable in one sitting: no file over 300 lines, no function over 60
lines or with more than 7 parameters; the tools call the scripts or the library and
never import a script or another tool."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"main", "eval_linear", "eval_knn", "eval_clusters", "hubconf"}
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 300, 60, 7


def source_files():
    """The project's Python files, the tests left out."""
    return sorted(p for p in REPO.rglob("*.py")
                  if p.relative_to(REPO).parts[0] not in ("tests", ".venv", "data", "runs"))


def parameters(function):
    """The parameters a caller passes (self and cls are not counted)."""
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_files_and_functions_are_small():
    too_long, too_big = [], []
    for path in source_files():
        text = path.read_text()
        name = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES or len(parameters(node)) > MAX_PARAMETERS:
                    too_big.append(f"{name}:{node.lineno} {node.name}: {lines} lines, "
                                   f"{len(parameters(node))} parameters")
    assert not too_long, too_long
    assert not too_big, too_big


def imported_modules(path):
    """The top-level names of the modules `path` imports (`a.b` -> `a.b`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_tools_import_no_script_and_no_other_tool():
    for path in (REPO / "tools").rglob("*.py"):
        own = ".".join(path.relative_to(REPO).parts[:2]).removesuffix(".py")  # tools.x
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top not in SCRIPTS, f"{path.relative_to(REPO)} imports the script {module}"
            if top == "tools":
                assert module.startswith(own), f"{path.relative_to(REPO)} imports {module}"


def test_the_checker_sees_what_it_checks(tmp_path):
    """The rules above find a long function, a wide one and a tool importing a script."""
    code = "def wide(a, b, c, d, e, f, g, h):\n    pass\n\ndef long():\n" + "    x = 1\n" * 61
    functions = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef)]
    assert [len(parameters(f)) for f in functions] == [8, 0]
    assert functions[1].end_lineno - functions[1].lineno + 1 == 62
    tool = tmp_path / "tool.py"
    tool.write_text("import main\nfrom tools.other import x\n")
    assert {"main", "tools.other", "tools.other.x"} <= imported_modules(tool)


def project_module(path):
    """`src/data/loader.py` -> `src.data.loader` (a package's __init__ -> the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: the project modules it imports} over the project's files."""
    modules = {project_module(p): p for p in source_files()}
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(graph):
    """The import loops of `graph`, each as the path that closes it (empty: none)."""
    found, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert {"main", "src.data.loader", "method"} <= set(graph)
    assert "src.train.loop" in graph["main"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
