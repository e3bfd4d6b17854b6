"""The sandbox fails closed and grades by what the kernel says: no bwrap and no opt-in is a one-line refusal
(evaluate, doctor, training's validation) and an opted-in weaker mode is named in every result; a StopIteration
from the candidate cannot end a test's loop; a stdin/stdout task has one deadline however many tests it has; an
exit status is never read as a signal or a timeout; the throwaway-uid evaluator runs from a checkout that only root
can enter."""
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from wmtp import sandbox
from wmtp import sandbox_harness as harness
from wmtp.config import UserError, load_config
from wmtp.evaluation import evaluate
from wmtp.report import pass_at_1_cell
from conftest import tiny_config
from test_sandbox_hostile import (AS_ROOT, SANDBOX_FILES, THROWAWAY_UID, as_root_with_setpriv, listener,  # noqa: F401
                                  run_evaluator)

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


def test_a_program_that_ended_poisons_the_link_with_one_text_whether_the_write_or_the_read_finds_it():
    """Which of EPIPE on the request or EOF on the reply the judge meets first is a race; the verdict's stderr (kept
    in the samples file) must not depend on it."""
    said = []
    for broken in ("request", "reply"):
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        os.close(resp_w)  # the program's end of the reply: gone
        if broken == "request":
            os.close(req_r)  # ... and of the request: the judge's write fails first
        link = harness.Link(req_w, resp_r)
        with pytest.raises(harness.Gone) as e:
            link.bind({}, "check")
        said.append(str(e.value))
        for fd in (req_w, resp_r) + ((req_r,) if broken == "reply" else ()):
            os.close(fd)
    assert said == ["looking up check: the other side closed its pipe"] * 2


def test_a_stop_iteration_from_the_candidate_cannot_end_the_tests_loop():
    """all(map(lambda x: f(x) == ..., xs)) stops early, and passes, when f raises StopIteration inside map: the
    judge gets a RuntimeError instead. A ValueError still arrives as ValueError (tests expect it)."""
    samples = [("double", "def f(x):\n    raise StopIteration"), ("double", "def f(x):\n    return 2 * x"),
               ("raises", "def f(x):\n    raise ValueError('negative')"), ("raises", "def f(x):\n    return x")]
    results = sandbox.score({"double": DOUBLE, "raises": RAISES}, samples, LIMITS, workers=2)
    assert [r["passed"] for r in results] == [False, True, True, False]
    assert "f() raised StopIteration" in results[0]["stderr"]


def test_a_stdin_stdout_task_has_one_deadline_for_all_its_tests():
    """Six tests of 0.7 s each fit a 2 s limit one by one, not together: the task times out at its third test at
    the latest (idle: after two passed), within its deadline and the grace, not after 4.2 s (a per-test deadline)."""
    limits = sandbox.Limits(timeout_s=2.0, memory_mb=256, cpu_s=2)
    task = {"task_id": "slow", "metadata": {"tests": [{"input": f"{i}\n", "output": f"{i + 1}\n"} for i in range(6)]}}
    start = time.monotonic()
    [result] = sandbox.score({"slow": task}, [("slow", "import time\ntime.sleep(0.7)\nprint(int(input()) + 1)")],
                             limits)
    elapsed = time.monotonic() - start
    # three sleeps (2.1 s) overrun the one 2 s deadline; how many passed before it depends on the machine's load
    passed = result["tests"][:-1]
    assert result["status"] == "timeout" and result["tests"][-1] == "timeout", result
    assert passed == ["passed"] * len(passed) and len(passed) <= 2, result
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


def test_without_bwrap_nothing_runs_unless_a_weaker_mode_is_asked_for(no_bwrap, monkeypatch, tmp_path, caplog):
    """isolation(), score(), doctor's line, training's validation and evaluate (first: before it loads a model and
    decodes) refuse with one line naming the fix; an explicit mode (the caller's, or WMTP_SANDBOX through the
    config) runs and says which it is."""
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        sandbox.score({"double": DOUBLE}, [("double", "def f(x):\n    return 2 * x")], LIMITS)
    assert str(refused.value) == ("sandbox bwrap does not work here (bubblewrap (bwrap) is not installed): "
                                  + sandbox.FIX)
    cfg = load_config(BASELINE)
    assert sandbox.check(cfg.eval.sandbox) == (False, f"sandbox: {refused.value}")
    from wmtp.evaluation import Validation
    record = {"task_id": "double", **DOUBLE}
    setup = SimpleNamespace(pipeline=SimpleNamespace(decodes=True), data=SimpleNamespace(
        val=[(None, None, None, record)], checker=None), tok=None, model=None, cfg=cfg, rank=0, world=1, device="cpu")
    with pytest.raises(UserError, match="apt-get install bubblewrap"):
        Validation(setup, None)
    with pytest.raises(UserError, match="apt-get install bubblewrap"):  # before looking for a model to decode with
        evaluate(tiny_config("baseline", tmp_path, f"checkpoint.dir={tmp_path / 'none'}"), use_micro=True,
                 checkpoint=str(tmp_path / "missing.pt"))
    weaker = "uid" if AS_ROOT else "none"
    monkeypatch.setenv("WMTP_SANDBOX", weaker)
    chosen = load_config(BASELINE).eval
    with caplog.at_level(logging.DEBUG, logger=sandbox.log.name):
        assert chosen.sandbox == weaker and sandbox.check(chosen.sandbox)[0] is None  # doctor: a WARN, not a FAIL
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # its own WARN line, not a second
        sandbox.isolation(chosen.sandbox)  # where programs run, the weaker mode is a logged warning
        assert [r.levelname for r in caplog.records if "WEAKER" in r.getMessage()] == ["DEBUG", "WARNING"]
    results = sandbox.score({"double": DOUBLE}, [("double", "def f(x):\n    return 2 * x")], sandbox.Limits.of(chosen))
    assert results[0]["passed"] and f"{weaker} (WEAKER, opted in" in sandbox.describe(sandbox.isolation(weaker))


@pytest.mark.skipif(not AS_ROOT or not shutil.which("unshare"), reason="hiding bwrap needs root (a mount namespace)")
def test_evaluate_on_a_machine_without_bwrap_refuses_in_one_line_or_names_the_mode_asked_for(tmp_path, tracking):
    """The CLI where bwrap is not installed (hidden in a mount namespace of its own): exit 2, one line, no
    traceback, no summary, no run; WMTP_SANDBOX=uid: the summary, the printed line and the run's tag name the mode."""
    from mlflow import MlflowClient
    tasks, samples = tmp_path / "tasks.jsonl", tmp_path / "samples.jsonl"
    tasks.write_text(json.dumps({"instruction": "Write f.", "output": "", **DOUBLE}) + "\n")
    samples.write_text(json.dumps({"task_id": "double", "completion": "def f(x):\n    return 2 * x"}) + "\n")
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind /dev/null "$(command -v bwrap)" && exec "$@"', "sh"]
    command = [*hide, sys.executable, "-m", "weighted_mtp", "evaluate", "--config", str(BASELINE), "--samples",
               str(samples), "--json", str(tmp_path / "out.json"), "--override", f"eval.dataset={tasks}",
               "--override", "eval.workers=1"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: sandbox bwrap does not work here (bubblewrap (bwrap) is not installed): {sandbox.FIX}"]
    client = MlflowClient(tracking)
    assert not (tmp_path / "out.json").exists() and client.get_experiment_by_name("weighted-mtp/production") is None
    ran = subprocess.run(command, cwd=tmp_path, env={**env, "WMTP_SANDBOX": "uid"}, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == {"pass@1": 1.0, "n_tasks": 1, "n_samples": 1,
                                                               "timeouts": 0, "errors": 0, "sandbox": "uid"}
    assert "sandbox: uid (WEAKER" in ran.stdout
    [run] = client.search_runs([client.get_experiment_by_name("weighted-mtp/production").experiment_id])
    assert (run.info.run_name, run.data.tags["sandbox.isolation"]) == ("evaluate", "uid")


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
        for name in SANDBOX_FILES:
            shutil.copy(ROOT / "wmtp" / name, checkout / name)
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


def test_the_choice_is_checked_where_it_is_made(monkeypatch):
    """WMTP_SANDBOX wins over the config file, --override over both; a bad value is one line naming its source."""
    monkeypatch.setenv("WMTP_SANDBOX", "nspawn")
    with pytest.raises(UserError, match=r"^WMTP_SANDBOX must be bwrap, uid, none; got 'nspawn'$"):
        load_config(BASELINE)
    monkeypatch.setenv("WMTP_SANDBOX", "none")
    assert load_config(BASELINE).eval.sandbox == "none"
    assert load_config(BASELINE, ["eval.sandbox=bwrap"]).eval.sandbox == "bwrap"
    with pytest.raises(UserError, match="'eval.sandbox' must be bwrap, uid or none, got 'docker'"):
        load_config(BASELINE, ["eval.sandbox=docker"])
    with pytest.raises(sandbox.SandboxUnavailable, match="must be one of bwrap, uid, none; got 'docker'"):
        sandbox.isolation("docker")


def run_bpf(program, nr, arch, arg0=0):
    """What the kernel does with a classic-BPF seccomp program for a call: the value of the RET it reaches."""
    data = struct.pack("<IIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)  # struct seccomp_data
    code = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, yes, no, k = code[pc]
        if op == 0x06:
            return k
        if op == 0x20:
            acc, pc = struct.unpack_from("<I", data, k)[0], pc + 1
            continue
        taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
        pc += 1 + (yes if taken else no)


THREAD = 0x3D0F00           # glibc's pthread_create: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|*_SETTID
FORK = 0x01200011           # glibc's fork: SIGCHLD|CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID
ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x50001, 0x50026, 0x80000000


@pytest.mark.parametrize("machine, calls", [
    ("x86_64", [(0, 0, ALLOW), (319, 0, EPERM), (250, 0, EPERM), (248, 0, EPERM), (29, 0, EPERM), (57, 0, EPERM),
                (56, THREAD, ALLOW), (56, FORK, EPERM), (56, THREAD | 0x10000000, EPERM), (435, 0, ENOSYS),
                (0x40000000, 0, EPERM), (101, 0, EPERM), (272, 0, EPERM), (425, 0, EPERM)]),
    ("aarch64", [(63, 0, ALLOW), (57, 0, ALLOW), (279, 0, EPERM), (219, 0, EPERM), (194, 0, EPERM),
                 (220, THREAD, ALLOW), (220, FORK, EPERM), (435, 0, ENOSYS), (97, 0, EPERM), (117, 0, EPERM)]),
])
def test_the_seccomp_program_decides_each_call_as_written(machine, calls):
    """The hand-written filter, run by a BPF interpreter: read (x86_64 0, aarch64 63) and close (aarch64 57, fork's
    number on x86_64) pass; memfd_create, keyctl, add_key, shmget, fork, ptrace, unshare, io_uring get EPERM; a
    thread's clone passes, a fork's or one asking for a namespace does not; clone3 is "not implemented" (the C
    library falls back to clone); x32 calls get EPERM and another architecture's calls kill."""
    program = harness.seccomp_program(machine)
    arch = harness.ARCHES[machine][1]
    assert [run_bpf(program, nr, arch, arg0) for nr, arg0, _ in calls] == [want for _, _, want in calls]
    assert run_bpf(program, 0, 0x40000003) == KILL  # i386 on x86_64


COLUMN = harness.ARCHES[os.uname().machine][0]
LEAVER = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
segment = libc.shmget(0, 4096, 0o1600)            # IPC_PRIVATE
ds = ctypes.create_string_buffer(256)
libc.shmctl(segment, 2, ds)                        # IPC_STAT
ds[4:8] = bytes(4)                                 # shm_perm.uid = 0: owned by root now, created by this uid
assert libc.shmctl(segment, 1, ds) == 0            # IPC_SET
print(segment)
for where in ("/tmp", "/dev/shm", "/run/lock"):
    open(f"{where}/wmtp-left-{os.getuid()}", "w").write("x")
os.mkdir(f"/tmp/wmtp-deep-{os.getuid()}")
os.chdir(f"/tmp/wmtp-deep-{os.getuid()}")
for _ in range(1500):  # deeper than the recursion limit
    os.mkdir("d")
    os.chdir("d")
os.chmod(".", 0)
libc.syscall(KEYCTL, 1, None)                      # a session keyring of its own, as the harness gives a program
persistent = libc.syscall(KEYCTL, 22, -1, -3)      # KEYCTL_GET_PERSISTENT, linked there (so it may write to it)
for ring in (-4, -5, persistent):                 # user, user-session, persistent: they outlive the process
    assert libc.syscall(ADD_KEY, b"user", b"wmtp-left", b"x", 1, ring) > 0
""".replace("KEYCTL", str(harness.DENIED["keyctl"][COLUMN])).replace("ADD_KEY", str(harness.DENIED["add_key"][COLUMN]))
KEYS_HELD = """
import ctypes
call = ctypes.CDLL(None).syscall
call(KEYCTL, 1, None)                                     # a session keyring of its own, to link the persistent one
rings = [call(KEYCTL, 22, -1, -3), -4, -5]
print([call(KEYCTL, 11, ring, None, 0) for ring in rings])  # KEYCTL_READ: 4 bytes per key it holds
""".replace("KEYCTL", str(harness.DENIED["keyctl"][COLUMN]))


def as_uid(uid, code):
    """code run by /usr/bin/python3 as uid (outside the sandbox: no filter, no Landlock) -> its stdout."""
    done = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c",
                           code], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def key_owners():
    return {line.split(":")[0].strip() for line in Path("/proc/key-users").read_text().splitlines()}


@pytest.mark.skipif(not AS_ROOT, reason="the uid mode's sweep runs as root")
def test_the_uid_sweep_removes_what_a_slot_uid_left_even_re_owned_or_1500_deep():
    """The second fence behind Landlock and the filter, tested with what they keep out, left by slot 0's uid outside
    the sandbox: a SysV segment its uid made and gave to root, files in /tmp, /dev/shm and /run/lock, a 1500-deep
    tree (a recursive cleanup dies on it), a key in each keyring that outlives a process (user, user-session,
    persistent). One score() in uid mode removes them all. A uid with no keys gets none."""
    iso = sandbox.isolation("uid")._replace(uid=sandbox.UID_BASE + 4321)  # one uid for every run: keyrings stay
    uid = iso.uid  # slot 0's
    sandbox._sweep(uid)  # what an interrupted run left
    sandbox._drop_keys([uid], iso, wait_s=0.1)
    segment = as_uid(uid, LEAVER)
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()
    header = rows[0].split()
    [row] = [r.split() for r in rows[1:] if r.split()[1] == segment]
    assert (row[header.index("uid")], row[header.index("cuid")]) == ("0", str(uid))  # matched on owner: missed
    left = [Path(f"{d}/wmtp-left-{uid}") for d in ("/tmp", "/dev/shm", "/run/lock") if os.path.isdir(d)]
    assert 0 not in json.loads(as_uid(uid, KEYS_HELD))  # a key in each (the user-session keyring may also link @u)
    [result] = sandbox._score({"double": DOUBLE}, [("double", "def f(x):\n    return 2 * x")], LIMITS, 1, iso)
    assert result["passed"]
    assert segment not in [r.split()[1] for r in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    assert not [p for p in left if p.exists()] and not Path(f"/tmp/wmtp-deep-{uid}").exists()
    assert as_uid(uid, KEYS_HELD) == "[0, 0, 0]"
    fresh = sandbox.UID_BASE + 4322 + os.getpid() % 1000   # a uid that never ran anything
    sandbox._drop_keys([fresh], iso, wait_s=0.1)
    assert str(fresh) not in key_owners()  # looking up its keyrings would have made two


def test_no_posix_message_queue_is_made_under_the_programs_rlimits():
    """RLIMIT_MSGQUEUE 0 (the harness's limit()) stops mq_open even where the filter does not run: the same
    call without it makes a queue (then removed)."""
    code = ("import ctypes, os, sys; sys.path.insert(0, {lib!r}); import sandbox_harness as h; "
            "libc = ctypes.CDLL(None, use_errno=True); {limit}"
            "q = libc.mq_open(b'/wmtp-mq-%d' % os.getpid(), 0o102, 0o600, None); "   # O_CREAT | O_RDWR
            "print(q >= 0, ctypes.get_errno()); q >= 0 and libc.mq_unlink(b'/wmtp-mq-%d' % os.getpid())")
    said = [subprocess.run([sys.executable, "-I", "-c", code.format(lib=str(ROOT / "wmtp"), limit=limit)],
                           capture_output=True, text=True, timeout=60).stdout.split()
            for limit in ("", "h.limit(256 << 20, 2, 0); ")]
    assert said == [["True", "0"], ["False", "24"]]  # 24: EMFILE, the queue's bytes over RLIMIT_MSGQUEUE
