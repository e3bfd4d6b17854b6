"""The project's shape, read from the modules' ASTs: one room per concern, imports that go down only, files and
functions that fit on a screen (README, "For the next engineer")."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top: a module may import only modules before it; the floor imports nothing of the project's.
FLOOR = ("weights", "s3ckpt", "sandbox_harness", "sandbox", "config")
LAYERS = (*FLOOR, "model", "pretrained", "data", "parallel", "tracking", "checkpointing", "pipelines", "evaluation",
          "memplan", "report", "weighted_mtp", "bench")
TOP = {"weights", "s3ckpt", "weighted_mtp", "bench"}  # the design card's files (and bench) stay at the top


def source(module):
    """The file of a project module: the card's at the top, every other room in the package wmtp."""
    return ROOT / f"{module}.py" if module in TOP else ROOT / "wmtp" / f"{module}.py"


def imported_project_modules(path):
    """Every project module `path` imports, at the top or inside a function (a deferred import is still an edge)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.removeprefix("wmtp.").split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "wmtp":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.removeprefix("wmtp.").split(".")[0])
    return names & set(LAYERS)


def python_files():
    return sorted([*ROOT.glob("*.py"), *ROOT.glob("wmtp/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")])


def test_every_module_is_in_the_map_and_only_the_cards_files_are_at_the_top():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP | {"setup"}  # setup.py: the configs of `pip install .`
    assert {p.stem for p in ROOT.glob("wmtp/*.py")} == set(LAYERS) - TOP | {"__init__"}


@pytest.mark.parametrize("module", LAYERS)
def test_imports_go_down_only(module):
    below = set(LAYERS[:LAYERS.index(module)])
    edges = imported_project_modules(source(module)) - {module}
    if module in FLOOR:
        assert edges == set(), f"{module}.py is on the floor but imports {sorted(edges)}"
    assert edges <= below, f"{module}.py imports {sorted(edges - below)}, which are above it"


def test_nothing_but_bench_and_tests_imports_the_trainer():
    importers = [p.name for p in [*ROOT.glob("*.py"), *ROOT.glob("wmtp/*.py"), *ROOT.glob("scripts/*.py")]
                 if p.stem != "weighted_mtp" and "weighted_mtp" in imported_project_modules(p)]
    assert importers == ["bench.py"]


@pytest.mark.parametrize("module", [m for m in LAYERS if m != "bench"])
def test_each_module_opens_with_a_docstring_naming_its_job(module):
    doc = ast.get_docstring(ast.parse(source(module).read_text()))
    assert doc and len(doc.split()) >= 8, f"{module}.py: no docstring that says what it is for"


def test_files_functions_and_lines_fit_on_a_screen():
    too_long = []
    for path in python_files():
        text = path.read_text()
        lines = text.splitlines()
        limit = 600 if path.name == "weighted_mtp.py" else 900
        if path.parent in (ROOT, ROOT / "wmtp") and len(lines) > limit:
            too_long.append(f"{path.name}: {len(lines)} lines > {limit}")
        too_long += [f"{path.name}:{i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > 120]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    too_long.append(f"{path.name}:{node.lineno}: {node.name}() is {n} lines")
    run_sh = len((ROOT / "run.sh").read_text().splitlines())
    if run_sh > 300:
        too_long.append(f"run.sh: {run_sh} lines > 300")
    assert too_long == []


def undocumented(path):
    """The public functions, classes and methods of `path` without a docstring; a method that overrides a
    documented method of a base class in the same module has that method's contract and is not counted."""
    tree, missing, documented = ast.parse(path.read_text()), [], {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            documented[node.name] = {n.name for n in node.body
                                     if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") \
                and not ast.get_docstring(node):
            missing.append(f"{path.name}:{node.lineno} {node.name}")
        if isinstance(node, ast.ClassDef):
            inherited = set().union(*(documented.get(getattr(b, "id", ""), set()) for b in node.bases))
            missing += [f"{path.name}:{n.lineno} {node.name}.{n.name}" for n in node.body
                        if isinstance(n, ast.FunctionDef) and not n.name.startswith("_") and not ast.get_docstring(n)
                        and n.name not in inherited]
    return missing


def test_every_public_function_states_its_contract():
    """Issue 33: a docstring on every public function, class and method of every module (weights.py included)."""
    modules = [source(m) for m in LAYERS]
    assert [line for path in modules for line in undocumented(path)] == []


def anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but '-' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_users_guide_of_one_contents_list_and_at_most_400_lines():
    """README.md: at most 400 lines; its Contents list is exactly its sections, in order; every page it links exists
    (the internals and measurements live in docs/)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    sections = [anchor(h) for h in re.findall(r"^## (.+)$", readme, re.M) if h != "Contents"]
    contents = readme.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^- \[[^\]]+\]\(#([^)]+)\)", contents, re.M) == sections
    assert [p for p in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", readme) if not (ROOT / p).exists()] == []


# Words a user cannot place: the project's own issue numbers, goals and stops, the sessions that built it. A bug of
# another project (pytorch#135712, mlflow/issues/24498) and pytest's session fixtures are fine.
PRIVATE_WORDS = re.compile(r"\bissues? #?\d+|(?<![\w/])#\d+\b|\bgoals?\b|\bstop \d+\b|"
                           r"\b(?:first|second|third|next|previous|this|that|other|later|earlier) sessions?\b", re.I)


def test_no_page_a_user_reads_speaks_of_issues_goals_or_sessions():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert [f"{p.name}:{n}: {line}" for p in pages for n, line in enumerate(p.read_text().splitlines(), 1)
            if PRIVATE_WORDS.search(line)] == []
