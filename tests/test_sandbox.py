"""The sandbox: both test styles, hostile programs that fail only their own task, pass@k worked by hand,
samples-file errors, and the built-in pyfunc tasks checked by execution."""
import json
import os
import time
from fractions import Fraction

import pytest

from wmtp import sandbox
from wmtp.config import UserError
from wmtp.data import BUILTIN, pyfunc_records
from wmtp.evaluation import read_samples

SECRET = "wJalrXUtnFEMI-planted-secret-K7MDENG"
LIMITS = sandbox.Limits(timeout_s=5.0, memory_mb=256, cpu_s=2, max_output_bytes=1 << 20)
ISOLATED = sandbox.isolation()[1] is not None   # root: programs run as their own uid

ADD = {"task_id": "add", "_source": "tasks.jsonl:1", "metadata": {
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add"}}
AREA = {"task_id": "area", "_source": "tasks.jsonl:2", "metadata": {   # code_prefix, no entry point
    "code_prefix": "import math\n", "test": "assert abs(area(1) - 3.14159) < 1e-4\nassert area(0) == 0\n"}}
SUM = {"task_id": "sum", "_source": "tasks.jsonl:3", "metadata": {"tests": [
    {"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]}}
TASKS = {"add": ADD, "area": AREA, "sum": SUM}
RIGHT_ADD = "def add(a, b):\n    return a + b"
RIGHT = [("add", RIGHT_ADD), ("area", "def area(r):\n    return math.pi * r * r"),
         ("sum", "a, b = map(int, input().split())\nprint(a + b, end='  \\n\\n')"),       # trailing whitespace
         ("sum", "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\nsys.exit(0)")]
WRONG = [("add", "def add(a, b):\n    return a - b"), ("area", "def area(r):\n    return 3 * r * r"),
         ("sum", "a, b = map(int, input().split())\nprint(a * b)")]


def test_right_solutions_pass_and_wrong_ones_fail_in_both_styles():
    heard = []
    results = sandbox.score(TASKS, RIGHT + WRONG, LIMITS, workers=1, scored=heard.append)
    assert heard == [4, 3]  # every 4 x workers samples, then the rest: evaluate's progress line
    assert [r["passed"] for r in results] == [True] * 4 + [False] * 3
    assert [r["tests"] for r in results] == [["passed"], ["passed"], ["passed", "passed"], ["passed", "passed"],
                                             ["failed"], ["failed"], ["failed"]]   # 1*2 = 2 != 3: stops there
    assert "AssertionError" in results[4]["stderr"] and results[4]["completion"] == WRONG[0][1]


def test_without_a_sandbox_uid_the_same_programs_give_the_same_verdicts():
    none = sandbox.isolation("none")  # this user's uid, no namespaces
    verdicts = [sandbox._run(p, LIMITS, none, 0).status
                for task_id, completion in RIGHT[:2] + WRONG[:2] for p in sandbox.programs(TASKS[task_id], completion)]
    assert verdicts == ["passed", "passed", "failed", "failed"]


HOSTILE = {
    "loop": ("while True:\n    pass", "timeout"),
    "memory hog": ("hog = []\nwhile True:\n    hog.append(bytearray(10**6))", "failed"),       # MemoryError
    "100 MB": ("for _ in range(100):\n    print('x' * 1_000_000)", "error"),                      # output cap
    "close stdout": ("import os\nos.close(1)\n" + RIGHT_ADD, "failed"),
    "sys.exit(0)": ("import sys\nsys.exit(0)\n" + RIGHT_ADD, "failed"),
    "os._exit(0)": ("import os\nos._exit(0)\n" + RIGHT_ADD, "failed"),
    "environ": ("import os, sys\nprint(dict(os.environ), file=sys.stderr)\n"
                "assert 'AWS_SECRET_ACCESS_KEY' in os.environ\n" + RIGHT_ADD, "failed"),
}


def test_hostile_programs_fail_their_own_task_and_nothing_else(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    samples = [("add", code) for code, _ in HOSTILE.values()] + RIGHT
    results = sandbox.score(TASKS, samples, LIMITS, workers=4)
    assert {name: r["status"] for name, r in zip(HOSTILE, results)} == {n: s for n, (_, s) in HOSTILE.items()}
    assert all(r["passed"] for r in results[len(HOSTILE):])         # the others in the same call still pass
    printed_env = results[list(HOSTILE).index("environ")]["stderr"].splitlines()[0]
    assert printed_env.startswith("{'PATH': ") and "AWS_" not in printed_env and "MLFLOW" not in printed_env
    assert SECRET not in json.dumps(results)
    assert "output over 1048576 bytes" in results[list(HOSTILE).index("100 MB")]["stderr"]
    summary = sandbox.summarize(results)
    assert (summary["timeouts"], summary["errors"], summary["n_samples"]) == (1, 1, len(samples))


@pytest.mark.skipif(not ISOLATED, reason="needs root: only a dedicated uid keeps programs from the evaluator")
def test_as_root_programs_cannot_reach_the_evaluator_or_other_programs(monkeypatch, tmp_path):
    """The uid fallback (what runs where bwrap cannot): a dedicated uid per worker. bwrap's own namespaces get the
    same attacks, and more, in test_sandbox_hostile.py."""
    real = sandbox.isolation
    monkeypatch.setattr(sandbox, "isolation", lambda mode=None: real(mode or "uid"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"AWS_SECRET_ACCESS_KEY={SECRET}\n")
    dotenv.chmod(0o600)
    attacks = [
        "import os\nos.kill(os.getppid(), 9)",
        "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
        "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        f"print(open({str(dotenv)!r}).read())",
        "import os\nassert os.getuid() != 0 and os.geteuid() != 0\nos.kill(-1, 9)\nraise SystemExit(1)",
    ]
    escapee = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
               "start_new_session=True)\n" + RIGHT_ADD)
    samples = [("add", a) for a in attacks + [escapee]] + RIGHT * 2
    results = sandbox.score(TASKS, samples, LIMITS, workers=4)
    assert [r["status"] for r in results[:len(attacks) + 1]] == ["failed"] * (len(attacks) + 1)
    assert all("PermissionError" in r["stderr"] for r in results[:4])
    assert "PermissionError: [Errno 1] Operation not permitted" in results[len(attacks)]["stderr"]  # no fork
    assert all(r["passed"] for r in results[len(attacks) + 1:])
    assert SECRET not in json.dumps(results)
    assert sandbox_processes(real("uid").uid) == []


def sandbox_processes(first_uid):
    """Live processes of this evaluator's slot uids (other evaluators on the machine have their own range)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        uid, state = int(status.split("\nUid:")[1].split()[0]), status.split("\nState:")[1].split()[0]
        if first_uid <= uid < first_uid + sandbox.MAX_WORKERS and state not in "ZX":   # dead, not yet reaped: fine
            found.append(pid)
    return found


def test_one_deadline_covers_the_whole_task_the_program_and_its_tests():
    """Calls that each fit in timeout_s but together do not, and tests that never end (dataset code is trusted,
    not bug-free): both time out, each within timeout_s and the grace. Sleeping spends no CPU: the wall clock ends
    them, not RLIMIT_CPU."""
    limits = sandbox.Limits(timeout_s=2.0, memory_mb=256, cpu_s=2, max_output_bytes=1 << 20)
    slow = "import time\ndef add(a, b):\n    time.sleep(1.2)\n    return a + b"   # ADD calls it twice: 2.4 s
    hang = {"task_id": "hang", "metadata": {"test": "import time\ndef check(candidate):\n    time.sleep(60)\n",
                                            "entry_point": "add"}}
    start = time.monotonic()
    results = sandbox.score({"add": ADD, "hang": hang}, [("add", slow), ("hang", RIGHT_ADD)], limits, workers=2)
    assert [r["status"] for r in results] == ["timeout", "timeout"], [r["stderr"] for r in results]
    assert time.monotonic() - start < 2 * (limits.timeout_s + sandbox.GRACE_S) + 3


def test_pass_at_k_worked_by_hand():
    # n = 5: c = 1 -> 1 - C(4, k)/C(5, k): k=1 1 - 4/5, k=2 1 - 6/10, k=5 (C(4,5) = 0) 1
    cases = {(0, 1): Fraction(0), (0, 2): Fraction(0), (0, 5): Fraction(0),
             (1, 1): Fraction(1, 5), (1, 2): Fraction(2, 5), (1, 5): Fraction(1),
             (5, 1): Fraction(1), (5, 2): Fraction(1), (5, 5): Fraction(1)}
    for (c, k), want in cases.items():
        assert sandbox.pass_at_k(5, c, k) == pytest.approx(float(want), abs=1e-12), (c, k)


def test_summary_averages_over_tasks_and_keeps_k_up_to_n():
    results = ([{"task_id": "a", "passed": i == 0, "status": "passed" if i == 0 else "failed"} for i in range(5)]
               + [{"task_id": "b", "passed": True, "status": "passed"} for _ in range(5)])
    results[1]["status"], results[2]["status"] = "timeout", "error"
    summary = sandbox.summarize(results, ks=(1, 2, 5, 10))
    assert summary == {"pass@1": pytest.approx(3 / 5), "pass@2": pytest.approx(7 / 10), "pass@5": 1.0,
                       "n_tasks": 2, "n_samples": 10, "timeouts": 1, "errors": 1}   # no pass@10: n = 5
    table = sandbox.format_summary(summary).splitlines()
    assert table[0].split() == ["metric", "value"] and table[1].split() == ["pass@1", "0.6000"]
    assert table[-3].split() == ["n_samples", "10"]


def test_read_samples_and_its_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"task_id": "add", "completion": RIGHT_ADD}) + "\n\n"
                    + json.dumps({"task_id": "sum", "completion": "print(3)"}) + "\n")
    assert read_samples(good, TASKS) == [("add", RIGHT_ADD), ("sum", "print(3)")]
    bad = {"malformed.jsonl": ('{"task_id": "add", "completion": "x"}\n{"task_id": "add",\n',
                               r"malformed.jsonl:2: not valid JSON"),
           "shape.jsonl": ('{"task_id": "add"}\n', r"shape.jsonl:1: expected \{\"task_id\": str, \"completion\""),
           "array.jsonl": ('["add", "x"]\n', r"array.jsonl:1: expected a JSON object"),
           "unknown.jsonl": ('\n{"task_id": "add", "completion": ""}\n{"task_id": "nope", "completion": ""}\n',
                             r"unknown.jsonl:3: unknown task_id 'nope'"),
           "empty.jsonl": ("\n", r"empty.jsonl: no samples")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_samples(tmp_path / name, TASKS)


def test_task_errors_name_the_record():
    with pytest.raises(sandbox.TaskError, match=r"^data.jsonl:7 \(task t7\): no tests to run"):
        sandbox.score({"t7": {"task_id": "t7", "_source": "data.jsonl:7", "metadata": {}}}, [("t7", "print(1)")])
    with pytest.raises(sandbox.TaskError, match="entry_point must be a Python name"):
        sandbox.programs({"metadata": {"test": "pass", "entry_point": "f); import os; (g"}}, "")
    with pytest.raises(sandbox.TaskError, match="unknown task_id 'zzz'"):
        sandbox.score(TASKS, [("zzz", "")])
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        sandbox.Limits(timeout_s=0)


def test_pyfunc_split_is_fixed_and_disjoint():
    train, validation = pyfunc_records("train"), pyfunc_records("validation")
    assert train == pyfunc_records("train")
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in validation}
    assert len({r["task_id"] for r in validation}) == 64 and len({r["task_id"] for r in train}) == 872 - 64
    for records in (train, validation):   # every task once right, once wrong
        assert [r["is_correct"] for r in records] == [True, False] * (len(records) // 2)
    assert max(len(r["output"]) for r in train) <= 26 and max(len(r["instruction"]) for r in train) <= 46


CHECK_ALL = """
import json, sys
cases = json.loads(sys.stdin.read())
wrong = []
for code, correct, task_id in cases:
    try:
        exec(code, {})
        passed = True
    except Exception:
        passed = False
    if passed != correct:
        wrong.append(task_id)
assert not wrong, wrong
print(len(cases))
"""


def test_every_pyfunc_right_solution_passes_and_every_wrong_one_fails_by_execution():
    records = pyfunc_records("train") + pyfunc_records("validation")
    # all of them in one sandboxed program (a subprocess each would take a minute on two cores) ...
    cases = [(r["metadata"]["code_prefix"] + r["output"] + "\n" + r["metadata"]["test"] + "\ncheck(f)\n",
              r["is_correct"], r["task_id"])
             for r in records]
    result = sandbox.run_program(sandbox.Program(CHECK_ALL, json.dumps(cases), f"{len(cases)}\n"), LIMITS)
    assert result.status == "passed", result.stderr
    # ... and a few through score() and the trainer's checker, each its own program
    picked = records[:6]
    tasks = {r["task_id"]: r for r in picked}
    results = sandbox.score(tasks, [(r["task_id"], r["output"]) for r in picked], LIMITS, workers=2)
    assert [r["passed"] for r in results] == [r["is_correct"] for r in picked] == [True, False] * 3
    assert BUILTIN["pyfunc"][1](picked[0], picked[0]["output"]) is True
    assert BUILTIN["pyfunc"][1](picked[0], picked[1]["output"]) is False


@pytest.mark.skipif(not ISOLATED, reason="the uid probe runs only as root")
def test_the_isolation_probe_runs_once_before_any_program(monkeypatch):
    """isolation() probes slot 0's uid with a program and then kills everything of that uid: two workers probing
    at once took slot 0's first program with them (status "error", seen under load). score() probes first."""
    events, run = [], sandbox._run

    def recorded(program, *args):
        probe = program in sandbox.PROBES
        events.append(("start", probe))
        try:
            return run(program, *args)
        finally:
            events.append(("end", probe))

    monkeypatch.setattr(sandbox, "_run", recorded)
    sandbox.isolation.cache_clear()
    try:
        assert [r["status"] for r in sandbox.score(TASKS, RIGHT, LIMITS, workers=2)] == ["passed"] * 4
    finally:
        sandbox.isolation.cache_clear()
    first_program = events.index(("start", False))
    assert ("start", True) in events and all(not probe for _, probe in events[first_program:])  # probes all first
