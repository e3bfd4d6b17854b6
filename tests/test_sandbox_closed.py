"""The sandbox fails closed and grades by what the kernel says: no bwrap and no opt-in is a one-line refusal
(evaluate, doctor, training's validation) and an opted-in weaker mode is named in every result; a StopIteration
from the candidate cannot end a test's loop; a stdin/stdout task has one deadline however many tests it has; an
exit status is never read as a signal or a timeout; the throwaway-uid evaluator runs from a checkout that only root
can enter."""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import sandbox
from config import UserError, load_config
from report import pass_at_1_cell
from test_sandbox_hostile import AS_ROOT, THROWAWAY_UID, as_root_with_setpriv, listener, run_evaluator  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "configs" / "baseline" / "baseline_local.yaml"
LIMITS = sandbox.Limits(timeout_s=5.0, memory_mb=256, cpu_s=2)
MODES = [m for m in sandbox.MODES if m != "uid" or AS_ROOT]
DOUBLE = {"task_id": "double", "metadata": {"entry_point": "f", "test": (
    "def check(f):\n    assert all(map(lambda x: f(x) == 2 * x, [1, 2, 3]))\n")}}
RAISES = {"task_id": "raises", "metadata": {"entry_point": "f", "test": (  # a test that wants the builtin back
    "def check(f):\n    try:\n        f(-1)\n    except ValueError:\n        return\n    assert False\n")}}


@pytest.fixture
def no_bwrap(monkeypatch):
    """This process on a machine without bubblewrap (and without WMTP_SANDBOX)."""
    which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, **kw: None if name == "bwrap" else which(name, **kw))
    monkeypatch.delenv("WMTP_SANDBOX", raising=False)
    sandbox.isolation.cache_clear()
    yield
    sandbox.isolation.cache_clear()


def test_a_stop_iteration_from_the_candidate_cannot_end_the_tests_loop():
    """all(map(lambda x: f(x) == ..., xs)) stops early, and passes, when f raises StopIteration inside map: the
    judge gets a RuntimeError instead. A ValueError still arrives as ValueError (tests expect it)."""
    samples = [("double", "def f(x):\n    raise StopIteration"), ("double", "def f(x):\n    return 2 * x"),
               ("raises", "def f(x):\n    raise ValueError('negative')"), ("raises", "def f(x):\n    return x")]
    results = sandbox.score({"double": DOUBLE, "raises": RAISES}, samples, LIMITS, workers=2)
    assert [r["passed"] for r in results] == [False, True, True, False]
    assert "f() raised StopIteration" in results[0]["stderr"]


def test_a_stdin_stdout_task_has_one_deadline_for_all_its_tests():
    """Six tests of 0.7 s each fit a 2 s limit one by one, not together: the task times out within its deadline
    and the grace, not after 4.2 s (the deadline was per test)."""
    limits = sandbox.Limits(timeout_s=2.0, memory_mb=256, cpu_s=2)
    task = {"task_id": "slow", "metadata": {"tests": [{"input": f"{i}\n", "output": f"{i + 1}\n"} for i in range(6)]}}
    start = time.monotonic()
    [result] = sandbox.score({"slow": task}, [("slow", "import time\ntime.sleep(0.7)\nprint(int(input()) + 1)")],
                             limits)
    elapsed = time.monotonic() - start
    assert result["status"] == "timeout" and result["tests"] == ["passed", "passed", "timeout"], result
    assert elapsed < limits.timeout_s + sandbox.GRACE_S + 1.0, elapsed


@pytest.mark.parametrize("mode", MODES)
def test_an_exit_status_is_not_read_as_a_signal_or_a_timeout(mode):
    """bwrap exits 128 + N for a program killed by signal N, and a program may exit with 152 (128 + SIGXCPU) or
    137 itself: such statuses fail like any other. A timeout is the kernel's CPU count or the wall clock."""
    task = {"task_id": "echo", "metadata": {"tests": [{"input": "", "output": "ok"}]}}
    samples = [("echo", f"import os\nprint('ok', flush=True)\nos._exit({code})") for code in (152, 137, 139)]
    samples += [("echo", "while True:\n    pass"), ("echo", "print('ok')"),
                ("add", "import os\nos._exit(152)\ndef add(a, b):\n    return a + b")]
    add = {"task_id": "add", "metadata": {"entry_point": "add", "test": "def check(f):\n    assert f(1, 2) == 3\n"}}
    limits = sandbox.Limits(timeout_s=5.0, memory_mb=256, cpu_s=1)
    results = sandbox._score({"echo": task, "add": add}, samples, limits, 2, sandbox.isolation(mode))
    assert [r["status"] for r in results] == ["failed", "failed", "failed", "timeout", "passed", "failed"], results


def test_without_bwrap_nothing_runs_unless_a_weaker_mode_is_asked_for(no_bwrap, monkeypatch):
    """isolation(), score(), doctor's line and training's validation refuse with one line naming the fix; an
    explicit mode (the caller's, or WMTP_SANDBOX through the config) runs and says which it is."""
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        sandbox.score({"double": DOUBLE}, [("double", "def f(x):\n    return 2 * x")], LIMITS)
    assert str(refused.value) == ("sandbox bwrap does not work here (bubblewrap (bwrap) is not installed): "
                                  + sandbox.FIX)
    from tracking import sandbox_check
    cfg = load_config(BASELINE)
    assert sandbox_check(cfg.eval) == (False, f"sandbox: {refused.value}")
    from evaluation import Validation
    record = {"task_id": "double", **DOUBLE}
    setup = SimpleNamespace(pipeline=SimpleNamespace(decodes=True), data=SimpleNamespace(
        val=[(None, None, None, record)], checker=None), tok=None, cfg=cfg, rank=0, world=1, device="cpu")
    with pytest.raises(UserError, match="apt-get install bubblewrap"):
        Validation(setup, None)
    weaker = "uid" if AS_ROOT else "none"
    monkeypatch.setenv("WMTP_SANDBOX", weaker)
    chosen = load_config(BASELINE).eval
    assert chosen.sandbox == weaker and sandbox_check(chosen)[0] is None  # doctor: a WARN, not a FAIL
    results = sandbox.score({"double": DOUBLE}, [("double", "def f(x):\n    return 2 * x")], sandbox.Limits.of(chosen))
    assert results[0]["passed"] and sandbox.isolation(weaker).why == "chosen by the caller"


@pytest.mark.skipif(not AS_ROOT or not shutil.which("unshare"), reason="hiding bwrap needs root (a mount namespace)")
def test_evaluate_on_a_machine_without_bwrap_refuses_in_one_line_or_names_the_mode_asked_for(tmp_path):
    """The CLI where bwrap is not installed (hidden in a mount namespace of its own): exit 2, one line, no
    traceback, no summary; WMTP_SANDBOX=uid: the summary and the printed line name the mode."""
    tasks, samples = tmp_path / "tasks.jsonl", tmp_path / "samples.jsonl"
    tasks.write_text(json.dumps({"instruction": "Write f.", "output": "", **DOUBLE}) + "\n")
    samples.write_text(json.dumps({"task_id": "double", "completion": "def f(x):\n    return 2 * x"}) + "\n")
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind /dev/null "$(command -v bwrap)" && exec "$@"', "sh"]
    command = [*hide, sys.executable, "-m", "weighted_mtp", "evaluate", "--config", str(BASELINE), "--samples",
               str(samples), "--json", str(tmp_path / "out.json"), "--override", f"eval.dataset={tasks}",
               "--override", "mlflow.enable_logging=false", "--override", "eval.workers=1"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: sandbox bwrap does not work here (bubblewrap (bwrap) is not installed): {sandbox.FIX}"]
    assert not (tmp_path / "out.json").exists()
    ran = subprocess.run(command, cwd=tmp_path, env={**env, "WMTP_SANDBOX": "uid"}, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == {"pass@1": 1.0, "n_tasks": 1, "n_samples": 1,
                                                               "timeouts": 0, "errors": 0, "sandbox": "uid"}
    assert "sandbox: uid (WEAKER" in ran.stdout


def test_report_marks_a_score_from_a_weaker_sandbox():
    evaluated, validated = {"eval/pass_at_1": 0.5}, {"val/pass_at_1": 0.25}
    assert pass_at_1_cell(evaluated, {"sandbox.isolation": "bwrap"}, {}) == "0.500"
    assert pass_at_1_cell(evaluated, {"sandbox.isolation": "uid"}, {"eval.sandbox": "bwrap"}) == "0.500!"
    assert pass_at_1_cell(validated, {}, {"eval.sandbox": "none"}) == "0.250 val!"
    assert pass_at_1_cell(validated, {}, {"eval.sandbox": "bwrap"}) == "0.250 val"
    assert pass_at_1_cell({**evaluated, **validated}, {}, {}) == "0.500"  # runs from before the key: unmarked
    assert pass_at_1_cell({}, {"sandbox.isolation": "none"}, {}) == "-"


@as_root_with_setpriv
@pytest.mark.parametrize("mode", ["default", "none"])
def test_the_throwaway_uid_evaluator_runs_from_a_checkout_only_root_can_enter(mode, listener, tmp_path):  # noqa: F811
    """A checkout inside a 0700 directory (as `mktemp -d` makes, as /root is): the uid-switching test brings the
    evaluator's files to a place that uid can read, and the right answers pass."""
    hidden = Path(tempfile.mkdtemp(prefix="wmtp-0700-"))
    try:
        checkout = hidden / "checkout"
        checkout.mkdir()
        for name in ("sandbox.py", "sandbox_harness.py"):
            shutil.copy(ROOT / name, checkout / name)
        assert oct(hidden.stat().st_mode & 0o777) == "0o700"
        probe = subprocess.run(["setpriv", f"--reuid={THROWAWAY_UID}", f"--regid={THROWAWAY_UID}", "--clear-groups",
                                "/usr/bin/python3", "-c", f"open({str(checkout / 'sandbox.py')!r})"],
                               capture_output=True, text=True)
        assert "PermissionError" in probe.stderr  # what failed before: the other uid cannot read the checkout
        base = Path(tempfile.mkdtemp(prefix="wmtp-hostile-"))
        samples = [("right add", "add", "def add(a, b):\n    return a + b\n"),
                   ("right sum", "sum", "print(sum(map(int, input().split())))")]
        used, results, *_ = run_evaluator("user", mode, base, listener[0], samples, source=checkout)
        assert used == ("bwrap" if mode == "default" else mode)
        assert [r["passed"] for r in results.values()] == [True, True]
    finally:
        shutil.rmtree(hidden)
        shutil.rmtree(base, ignore_errors=True)
