"""The suite's tiers and its guards (tests/conftest.py): every name in SLOW exists, the fast tier tests every
module, `--fast` leaves out exactly the slow tier, and the fast tier's budget is worked out as documented."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import ROOT, SLOW, fast_tier_budget, fast_tier_seconds, is_slow
from test_layout import LAYERS, imported_project_modules

TESTS = ROOT / "tests"


def functions_named_test(path):
    return [n.name for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]


def test_every_slow_name_is_a_test_file_or_a_test_in_one():
    for name in SLOW:
        file, _, test = name.partition("::")
        assert (TESTS / file).is_file(), name
        assert not test or test in functions_named_test(TESTS / file), name


def test_the_fast_tier_tests_every_module():
    """Each project module is imported by a file with fast tests (its unit tests run in two minutes); the
    sandbox's harness is not imported but run: by sandbox.py, in every program test_sandbox.py runs."""
    covered = {"sandbox_harness"}
    for path in TESTS.glob("test_*.py"):
        if any(not is_slow(path, t) for t in functions_named_test(path)):
            covered |= imported_project_modules(path)
    assert sorted(set(LAYERS) - covered) == []


def test_fast_leaves_out_the_slow_tier():
    """A real `pytest --fast` of tests/test_bench.py (two slow tests, then two fast ones) collects the fast ones."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "--fast",
                        "tests/test_bench.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert [line for line in r.stdout.splitlines() if "::" in line] == [
        "tests/test_bench.py::test_weights_read_counts_what_a_verify_forward_reads_against_a_plain_step",
        "tests/test_bench.py::test_programs_per_second_scores_every_program_and_counts_them"]
    assert "2/4 tests collected (2 deselected)" in r.stdout


def test_this_run_marks_the_slow_tier_and_runs_the_fast_tier_first(request):
    """In this very session: every item is marked slow exactly when SLOW names it, and no fast item comes after a
    slow one."""
    items = request.session.items
    slow = [item.get_closest_marker("slow") is not None for item in items]
    assert slow == [is_slow(item.path, item.originalname, item.fixturenames) for item in items]
    assert slow == sorted(slow)


def test_the_fast_tiers_time_is_the_wall_alone_or_collection_plus_its_tests():
    only_fast = {"a": (False, 2.0), "b": (False, 3.0)}
    assert fast_tier_seconds(10.0, 14.0, 30.0, only_fast) == 20.0        # --fast: start to end
    both = {**only_fast, "c": (True, 100.0)}
    assert fast_tier_seconds(10.0, 14.0, 130.0, both) == 4.0 + 5.0       # collection + the fast tests' seconds


def test_the_budget_is_enforced_on_ci_or_when_given(monkeypatch):
    monkeypatch.delenv("WMTP_FAST_TIER_BUDGET_S", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert fast_tier_budget() is None
    monkeypatch.setenv("CI", "true")
    assert fast_tier_budget() == conftest.FAST_TIER_BUDGET_S == 120.0
    monkeypatch.setenv("WMTP_FAST_TIER_BUDGET_S", "0")
    assert fast_tier_budget() is None
    monkeypatch.setenv("WMTP_FAST_TIER_BUDGET_S", "90")
    assert fast_tier_budget() == 90.0


def test_a_fast_tier_over_its_budget_fails_the_run_and_names_its_slowest_tests(tmp_path):
    """A run whose tests pass exits 1 when its fast tier is over the budget, naming the tests that took the time."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sleepy.py").write_text("import time\n\n\ndef test_sleeps():\n    time.sleep(0.2)\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "."],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(TESTS), "WMTP_FAST_TIER_BUDGET_S": "0.001"})
    assert r.returncode == 1 and "1 passed" in r.stdout, r.stdout + r.stderr
    assert "fast tier: 1 tests," in r.stdout and "(budget 0 s)" in r.stdout
    assert "FAILED: the fast tier is over its budget" in r.stdout and "test_sleepy.py::test_sleeps" in r.stdout


@pytest.mark.parametrize("name", ["test_x.py", "test_x.py::test_y"])
def test_a_slow_name_marks_a_file_or_one_test(monkeypatch, name):
    monkeypatch.setattr(conftest, "SLOW", {name})
    assert is_slow("tests/test_x.py", "test_y")
    assert is_slow("tests/test_x.py", "test_z") == (name == "test_x.py")
    assert not is_slow("tests/test_w.py", "test_y")
    assert is_slow("tests/test_w.py", "test_y", ["tmp_path", "moto_s3"])   # moto's S3 server: slow anywhere
