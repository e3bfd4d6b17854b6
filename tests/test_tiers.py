"""The suite's tiers and its guards (tests/conftest.py): every name in SLOW exists, the fast tier tests every
module, `--fast` leaves out exactly the slow tier, the fast tier's budget is worked out as documented, and a
parallel run hands out a file's run of tests whole and gives an ALONE test the machine to itself."""
import ast
import os
import subprocess
import sys
import threading
import time

import pytest

import conftest
from conftest import ALONE, ROOT, SLOW, fast_tier_budget, fast_tier_seconds, is_slow, machine_share, runs_of_one_file
from test_layout import LAYERS, imported_project_modules

TESTS = ROOT / "tests"


def functions_named_test(path):
    return [n.name for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]


def test_every_slow_name_is_a_test_file_or_a_test_in_one():
    for name in SLOW | ALONE:
        file, _, test = name.partition("::")
        assert (TESTS / file).is_file(), name
        assert not test or test in functions_named_test(TESTS / file), name
    assert all(is_slow(*name.split("::")) for name in ALONE)   # they run last: after the fast tier


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


def test_a_parallel_runs_units_are_the_runs_of_one_files_tests_in_order():
    """The fast tier's tests of a file are one unit, its slow ones another (a worker builds a module fixture once for
    each, as a plain run does), however many files come between."""
    order = ["a.py::f1", "a.py::f2", "b.py::f3", "a.py::s1", "a.py::s2[x]", "b.py::s3", "a.py::alone"]
    assert runs_of_one_file(order) == {"a.py::f1": "1:a.py", "a.py::f2": "1:a.py", "b.py::f3": "2:b.py",
                                       "a.py::s1": "3:a.py", "a.py::s2[x]": "3:a.py", "b.py::s3": "4:b.py",
                                       "a.py::alone": "5:a.py"}


def hold(directory, alone, entered, release):
    """machine_share held in a thread until `release` is set; `entered` is set once it is held."""
    def run():
        with machine_share(directory, alone):
            entered.set()
            release.wait(10)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_tests_share_the_machine_and_an_alone_one_waits_for_them_and_keeps_them_waiting(tmp_path):
    """Two shared holders at once; an ALONE test waits for both to end, and a test asked for after it waits for it
    (flock(2) locks of separate opens conflict within one process as between workers)."""
    events = {name: (threading.Event(), threading.Event()) for name in ("a", "b", "alone", "later")}
    threads = [hold(tmp_path, False, *events["a"]), hold(tmp_path, False, *events["b"])]
    assert events["a"][0].wait(5) and events["b"][0].wait(5)        # both hold it together
    threads.append(hold(tmp_path, True, *events["alone"]))
    time.sleep(0.3)
    threads.append(hold(tmp_path, False, *events["later"]))
    time.sleep(0.3)
    assert not events["alone"][0].is_set() and not events["later"][0].is_set()
    events["a"][1].set()
    time.sleep(0.3)
    assert not events["alone"][0].is_set()                          # b still holds its share
    events["b"][1].set()
    assert events["alone"][0].wait(5)
    time.sleep(0.3)
    assert not events["later"][0].is_set()                          # the turnstile: not before the alone test ends
    events["alone"][1].set()
    assert events["later"][0].wait(5)
    events["later"][1].set()
    for thread in threads:
        thread.join(5)


TIMED = """import os, time


def timed(name):
    start = time.monotonic()
    time.sleep(0.5)
    worker, threads = os.environ["PYTEST_XDIST_WORKER"], os.environ["OMP_NUM_THREADS"]
    with open(os.environ["LOG"], "a") as log:
        log.write(f"{name} {worker} {threads} {start} {time.monotonic()}\\n")
"""


def test_a_parallel_run_keeps_a_files_run_on_one_worker_and_an_alone_test_by_itself(tmp_path):
    """A real `pytest -n 2` with this conftest: test_weights.py's (fast) tests on one worker, while the other runs
    test_fsdp.py's (slow), then the ALONE test (named as in ALONE), which waits for the first worker's test and
    overlaps none; each worker with one core's threads."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "timed.py").write_text(TIMED)
    for file, names in {"test_weights.py": ["w1", "w2", "w3", "w4", "w5", "w6"], "test_fsdp.py": ["f1", "f2"],
                        "test_sandbox_hostile.py": ["an_evaluator_run_of_hostile_programs"]}.items():
        (tmp_path / file).write_text("from timed import timed\n" + "".join(
            f"\n\ndef test_{name}():\n    timed('{name}')\n" for name in names))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "-n", "2",
                        "."], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": f"{TESTS}:{tmp_path}", "LOG": str(tmp_path / "log")})
    assert r.returncode == 0 and "9 passed" in r.stdout, r.stdout + r.stderr
    assert "fast tier: 6 tests," in r.stdout   # the controller counts the workers' reports: test_weights.py's six
    ran = {name: (worker, threads, float(start), float(end)) for name, worker, threads, start, end
           in (line.split() for line in (tmp_path / "log").read_text().splitlines())}
    assert len({ran[f"w{i}"][0] for i in range(1, 7)}) == 1 and {ran["f1"][0], ran["f2"][0]} != {ran["w1"][0]}
    assert {threads for _, threads, _, _ in ran.values()} == {str(max(1, os.cpu_count() // 2))}
    _, _, start, end = ran.pop("an_evaluator_run_of_hostile_programs")
    assert all(their_end <= start or their_start >= end for _, _, their_start, their_end in ran.values()), ran
