"""Rules the test suite keeps about itself (issue 25: the whole suite in ~30 minutes on the 2-core CI machine),
checked statically like tests/test_architecture.py: pure AST over tests/test_*.py, nothing is imported or run.

- Every end-to-end test, one marked ``slow`` or ``vllm`` (on the function, through a module's ``pytestmark``,
  or on one of its ``pytest.param`` cases), says in its docstring what it proves that no cheaper test does:
  such a test costs seconds to minutes of every CI run, so its reason to exist is written next to it.
- The per-file duration table that tests/conftest.py prints at the end of every run is right, and its
  LONGEST_FIRST order names only files that exist.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

from tests.conftest import LONGEST_FIRST, duration_summary

TESTS_DIR = Path(__file__).resolve().parent
E2E_MARKS = ("slow", "vllm")
MIN_DOCSTRING_WORDS = 8  # a sentence, not a label


def _marks_in(node: ast.AST, names: dict[str, ast.AST]) -> set[str]:
    """The e2e marks (``pytest.mark.slow`` / ``mark.vllm``) written anywhere inside ``node``, following
    module-level names it uses (``@pytest.mark.parametrize(..., LAYOUTS)`` with a slow ``pytest.param`` there)."""
    found: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and child.attr in E2E_MARKS and \
                getattr(child.value, "attr", None) == "mark":
            found.add(child.attr)
        elif isinstance(child, ast.Name) and child.id in names and names[child.id] is not node:
            found |= _marks_in(names[child.id], {k: v for k, v in names.items() if k != child.id})
    return found


def e2e_tests(source: str) -> list[tuple[str, int, set[str], str]]:
    """(test name, line, its e2e marks, its docstring or '') for each module-level test function in ``source``
    that carries an e2e mark."""
    tree = ast.parse(source)
    names = {target.id: stmt.value for stmt in tree.body if isinstance(stmt, ast.Assign)
             for target in stmt.targets if isinstance(target, ast.Name)}
    module_marks = _marks_in(names["pytestmark"], {}) if "pytestmark" in names else set()
    out = []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name.startswith("test"):
            marks = module_marks.union(*(_marks_in(d, names) for d in stmt.decorator_list))
            if marks:
                out.append((stmt.name, stmt.lineno, marks, ast.get_docstring(stmt) or ""))
    return out


def undocumented(source: str, label: str) -> list[str]:
    """One line per e2e test of ``source`` whose docstring is missing or shorter than a sentence."""
    return [f"{label}:{line}: {name} (marked {', '.join(sorted(marks))})"
            for name, line, marks, doc in e2e_tests(source) if len(doc.split()) < MIN_DOCSTRING_WORDS]


@lru_cache(maxsize=None)
def _test_files() -> tuple[Path, ...]:
    return tuple(sorted(TESTS_DIR.glob("test_*.py")))


def test_every_end_to_end_test_says_what_it_proves():
    missing = [line for path in _test_files() for line in undocumented(path.read_text(), f"tests/{path.name}")]
    assert not missing, ("end-to-end tests (marked slow or vllm) without a docstring saying what they prove that "
                         f"no cheaper test does (at least {MIN_DOCSTRING_WORDS} words):\n" + "\n".join(missing))


def test_the_docstring_rule_finds_planted_violations():
    """The check can fail: each way of marking a test e2e, without a docstring, is reported; documented and
    unmarked tests are not."""
    source = '''
import pytest
SLOW_CASES = [pytest.param(1, id="a"), pytest.param(2, marks=pytest.mark.slow)]

@pytest.mark.slow
def test_decorated():
    pass

@pytest.mark.parametrize("x", SLOW_CASES)
def test_slow_case(x):
    pass

@pytest.mark.vllm
def test_documented():
    """Starts a real sidecar: the only test of the route that a cheaper double cannot answer."""

def test_unmarked():
    pass
'''
    assert [line.split(": ")[1] for line in undocumented(source, "f")] == [
        "test_decorated (marked slow)", "test_slow_case (marked slow)"]
    module = "import pytest\npytestmark = [pytest.mark.vllm]\n\ndef test_in_marked_module():\n    'Too short.'\n"
    assert undocumented(module, "m") == ["m:4: test_in_marked_module (marked vllm)"]


def test_duration_summary_sorts_files_and_sums_each_worker():
    """The table conftest.py prints at the end of every run: longest file first with its CPU seconds, then one
    total per worker."""
    seconds = {"tests/test_a.py": 12.0, "tests/test_b.py": 300.5, "tests/test_c.py": 40.3}
    cpu = {"tests/test_a.py": 11.5, "tests/test_b.py": 90.25, "tests/test_c.py": 70.0}
    workers = {"tests/test_a.py": "gw0", "tests/test_b.py": "gw1", "tests/test_c.py": "gw0"}
    assert duration_summary(seconds, workers, cpu) == [
        "   300.5 s      90.2 CPU-s   gw1  tests/test_b.py",
        "    40.3 s      70.0 CPU-s   gw0  tests/test_c.py",
        "    12.0 s      11.5 CPU-s   gw0  tests/test_a.py",
        "    52.3 s      81.5 CPU-s   gw0  (sum of 2 files)",
        "   300.5 s      90.2 CPU-s   gw1  (sum of 1 files)",
    ]
    assert duration_summary({"tests/test_a.py": 1.0}, {}, {}) == ["     1.0 s       0.0 CPU-s  main  tests/test_a.py",
                                                                    "     1.0 s       0.0 CPU-s  main  (sum of 1 files)"]


def test_longest_first_names_existing_files():
    """A renamed or split file must be renamed in conftest.LONGEST_FIRST too, else it silently starts last."""
    names = {path.stem for path in _test_files()}
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert not [name for name in LONGEST_FIRST if name not in names]
