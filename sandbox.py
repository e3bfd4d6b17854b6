"""
Evaluation by execution: run untrusted generated programs against a task's tests and compute pass@k.

Running untrusted code is its own concern, with no torch in it, as s3ckpt.py owns storage: weighted_mtp.py
generates completions and calls score() / summarize() here.

- programs(record, completion): the programs that test one completion. stdin/stdout tasks
  (metadata.tests: [{"input", "output"}]) run the completion once per test; assert tasks (metadata.test, optional
  metadata.entry_point and metadata.code_prefix) run code_prefix + completion + "\\n" + test [+ check(entry_point)].
- run_program: one program in its own process group and fresh temp directory, with a wall-clock timeout, an
  address-space, CPU-time and file-size limit, a cap on captured output and an environment built from scratch
  (no credential of the evaluator's). It passes only when a per-run random marker, printed by the harness after
  the program and its tests returned, ends its stdout: exiting early (sys.exit, os._exit) is a failure.
  When the evaluator is root, programs run as a dedicated unprivileged uid per worker slot, so they cannot
  signal the evaluator (or kill(-1) the machine), read its /proc/<pid>/environ or root-only files.
- score(tasks, samples, limits, workers): every sample's tests, `workers` programs at a time.
- pass@k (Chen et al. 2021, unbiased): per task with n samples of which c pass, 1 - C(n-c, k) / C(n, k),
  averaged over tasks.

Not isolated (see the README): the network, and files outside the temp directory that its uid may read or write.
"""
import concurrent.futures as cf
import dataclasses
import functools
import json
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("weighted_mtp.sandbox")

STDERR_TAIL = 2000          # characters of a program's stderr kept in results
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
UID_BASE = 1 << 24          # sandbox uids: UID_BASE + (evaluator pid mod 2^16) * 256 + slot, far from real users
MAX_WORKERS = 256           # slots per evaluator in that uid range
NPROC = 64                  # processes per sandbox uid (a fork bomb stops there); only set under a sandbox uid

# Runs inside the child (python -I -X utf8 -c WRAPPER fd memory cpu allow_exit nproc): reads the marker from an
# inherited pipe (so it is in no file, argument or environment the program can read), sets the limits, runs
# program.py, then writes the marker with a raw write only if the program returned.
WRAPPER = r"""
import os, resource, sys
def _limit(what, soft, hard):
    cap = resource.getrlimit(what)[1]
    if cap != resource.RLIM_INFINITY:
        soft, hard = min(soft, cap), min(hard, cap)
    resource.setrlimit(what, (soft, hard))
def _wmtp_run(fd, memory, cpu, allow_exit, nproc):
    marker = os.read(fd, 64)
    os.close(fd)
    _limit(resource.RLIMIT_AS, memory, memory)
    _limit(resource.RLIMIT_FSIZE, memory, memory)
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    if nproc:
        _limit(resource.RLIMIT_NPROC, nproc, nproc)
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    try:
        exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
    except SystemExit as e:
        if not (allow_exit and e.code in (None, 0)):
            raise
    sys.stdout.flush()
    os.write(1, marker)
_wmtp_run(*map(int, sys.argv[1:]))
"""


class TaskError(ValueError):
    """Bad task or samples input: a one-line message naming file:line."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per program: wall-clock seconds, address space (MiB, also the largest file it may write), CPU seconds,
    bytes of stdout + stderr captured before it is killed."""
    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int = 10
    max_output_bytes: int = 1 << 20

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"sandbox limit {field.name} must be positive, got {getattr(self, field.name)!r}")


class Program(NamedTuple):
    source: str
    stdin: str = ""
    expected: str | None = None    # stdout wanted (stdin/stdout tests); None: passing means returning
    allow_exit: bool = False       # sys.exit(0) counts as finishing (stdin/stdout programs); asserts must return


class RunResult(NamedTuple):
    status: str                    # passed | failed | timeout | error
    stderr: str                    # its tail
    detail: str = ""               # why the harness stopped it, when it did


# -----------------------------------------------------------------------------
# tasks -> programs

def programs(record, completion):
    """The programs that test `completion` on a task record (see the module docstring); TaskError without tests."""
    where = f"{record.get('_source', 'task')} (task {record.get('task_id', '?')})"
    meta = record.get("metadata") or {}
    if not isinstance(meta, dict):
        raise TaskError(f"{where}: metadata must be an object")
    tests, test = meta.get("tests"), meta.get("test")
    if tests:
        if not isinstance(tests, list) or not all(isinstance(t, dict) and isinstance(t.get("input"), str)
                                                  and isinstance(t.get("output"), str) for t in tests):
            raise TaskError(f"{where}: metadata.tests must be a list of {{\"input\": str, \"output\": str}}")
        return [Program(completion, t["input"], t["output"], allow_exit=True) for t in tests]
    if test:
        entry, prefix = meta.get("entry_point"), meta.get("code_prefix", "")
        if not isinstance(test, str) or not isinstance(prefix, str):
            raise TaskError(f"{where}: metadata.test and metadata.code_prefix must be strings")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise TaskError(f"{where}: metadata.entry_point must be a Python name, got {entry!r}")
        call = f"\ncheck({entry})\n" if entry else "\n"
        return [Program(prefix + completion + "\n" + test + call)]
    raise TaskError(f"{where}: no tests to run (metadata.tests or metadata.test)")


def same_output(got, expected):
    """Equal up to trailing whitespace on each line and at the end."""
    def norm(text):
        return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()
    return norm(got) == norm(expected)


# -----------------------------------------------------------------------------
# one program

def clean_env(workdir):
    """Built from nothing: not one variable of the evaluator's environment (credentials, .env, MLflow) is passed."""
    return {"PATH": SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=None)
def isolation():
    """(interpreter, uid of slot 0 or None). As root: the first interpreter that a sandbox uid can run a program
    with (this Python, else python3 on the system path) and that uid; otherwise programs run as this user."""
    if os.geteuid() != 0:
        log.warning("sandbox: the evaluator is not root, so programs run as this user: they could signal this "
                    "process or read its /proc environment. Run evaluation as root or in a container (README).")
        return sys.executable, None
    uid = UID_BASE + (os.getpid() % 65536) * MAX_WORKERS  # distinct per evaluator: torchrun ranks share a node
    for interpreter in dict.fromkeys([sys.executable, shutil.which("python3", path=SAFE_PATH)]):
        try:
            if interpreter and _run(Program("pass"), Limits(timeout_s=30), interpreter, uid).status == "passed":
                log.info("sandbox: programs run as uid %d + worker slot with %s", uid, interpreter)
            return interpreter, uid
        except PermissionError:
            continue  # e.g. this Python lives under /root (0700)
    log.warning("sandbox: no Python an unprivileged uid can run; programs run as root (not isolated from this "
                "process). Install Python outside /root or run evaluation in a container (README).")
    return sys.executable, None


def run_program(program, limits=Limits(), slot=0):
    """Runs one Program in the sandbox (slot: which worker's uid, 0 <= slot < 256) -> RunResult."""
    interpreter, uid = isolation()
    return _run(program, limits, interpreter, None if uid is None else uid + slot)


def _run(program, limits, interpreter, uid):
    workdir = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    try:
        Path(workdir, "program.py").write_text(program.source, encoding="utf-8")
        Path(workdir, "stdin.txt").write_text(program.stdin, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
        marker = secrets.token_hex(16).encode()
        args = [str(limits.memory_mb << 20), str(limits.cpu_s), str(int(program.allow_exit)), str(NPROC if uid else 0)]
        out, err, state, code = _spawn(interpreter, args, workdir, marker, uid, limits)
        return RunResult(_status(out, marker, program.expected, state, code), err[-STDERR_TAIL:], state)
    finally:
        if uid is not None:
            _kill_all_of(uid, interpreter)  # children that left the process group (setsid) die with their uid
        _remove(workdir)


def _spawn(interpreter, args, workdir, marker, uid, limits):
    """(stdout, stderr, state, returncode) with state "" (it exited), "timeout" or "output over N bytes"."""
    read_end, write_end = os.pipe()
    os.write(write_end, marker)
    os.close(write_end)
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        with open(Path(workdir, "stdin.txt"), "rb") as stdin:
            proc = subprocess.Popen([interpreter, "-I", "-X", "utf8", "-c", WRAPPER, str(read_end), *args],
                                    cwd=workdir, env=clean_env(workdir), stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(read_end,), start_new_session=True, **user)
    finally:
        os.close(read_end)
    with proc:
        out, err, state = _collect(proc, limits)
        _kill_group(proc.pid)
        proc.wait()
    return bytes(out), err.decode("utf-8", "replace"), state, proc.returncode


def _collect(proc, limits):
    """Reads stdout and stderr as they come until both close, the deadline passes or the output cap is crossed."""
    deadline = time.monotonic() + limits.timeout_s
    out, err, total, exited = bytearray(), bytearray(), 0, False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return out, err, "" if exited else "timeout"
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                total += len(chunk)
                key.data.extend(chunk)
                del err[:-4 * STDERR_TAIL]
            if total > limits.max_output_bytes:
                return out, err, f"output over {limits.max_output_bytes} bytes"
            if not exited and _exited(proc.pid):
                # its own children may hold the pipes open: end them; the zombie keeps the group id reserved
                exited = True
                _kill_group(proc.pid)
                deadline = min(deadline, time.monotonic() + 1.0)
    return out, err, ""


def _status(out, marker, expected, state, returncode):
    if state == "timeout" or returncode == -signal.SIGXCPU:
        return "timeout"
    if state or returncode < 0:
        return "error"      # output cap, or killed by a signal (segfault, the hard CPU limit, its own killpg)
    if returncode != 0 or not out.endswith(marker):
        return "failed"     # an exception, a failed assert, or it exited before the harness's marker
    if expected is not None and not same_output(out[:-len(marker)].decode("utf-8", "replace"), expected):
        return "failed"
    return "passed"


def _exited(pid):
    """True once pid has exited, without reaping it (so its process group id cannot be reused meanwhile)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all_of(uid, interpreter):
    """kill(-1, SIGKILL) as the sandbox uid: every process left under that uid, nothing else."""
    kill = shutil.which("kill", path="/usr/bin:/bin")
    command = [kill, "-9", "-1"] if kill else [interpreter, "-I", "-c", "import os; os.kill(-1, 9)"]
    subprocess.run(command, env={}, user=uid, group=uid, extra_groups=[], cwd="/",
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _remove(workdir):
    """Removes the temp directory even when the program took permissions away from its own files."""
    for root, dirs, _ in os.walk(workdir):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(workdir, ignore_errors=True)


# -----------------------------------------------------------------------------
# samples -> results -> pass@k

def score(tasks, samples, limits=Limits(), workers=1):
    """Per sample (in order) {"task_id", "completion", "passed", "status", "tests", "stderr"}: tests are the
    statuses of the tests that ran (they stop at the first that does not pass); passed only when all ran and passed.
    tasks: task_id -> record; samples: [(task_id, completion)]. Bad records fail before anything runs.
    One score() at a time per process: worker slots name the sandbox uids."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"sandbox workers must be in 1..{MAX_WORKERS}, got {workers}")
    plans = []
    for task_id, completion in samples:
        if task_id not in tasks:
            raise TaskError(f"unknown task_id {task_id!r}")
        plans.append(programs(tasks[task_id], completion))
    isolation()  # its probe runs as slot 0's uid and ends by killing that uid's processes: before any worker starts
    slots = queue.SimpleQueue()
    for slot in range(workers):
        slots.put(slot)

    def run_sample(i):
        slot, outcomes = slots.get(), []
        try:
            for program in plans[i]:
                outcomes.append(run_program(program, limits, slot))
                if outcomes[-1].status != "passed":
                    break
        finally:
            slots.put(slot)
        last = outcomes[-1]
        stderr = last.stderr + (f"\n[sandbox: {last.detail}]" if last.detail else "")
        return {"task_id": samples[i][0], "completion": samples[i][1], "passed": last.status == "passed"
                and len(outcomes) == len(plans[i]), "status": last.status, "tests": [o.status for o in outcomes],
                "stderr": stderr}

    with cf.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(run_sample, range(len(samples))))


def pass_at_k(n, c, k):
    """1 - C(n-c, k) / C(n, k), as 1 - prod_{i=n-c+1..n} (1 - k/i) (no huge binomials); 1.0 when n - c < k."""
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def summarize(results, ks=(1,)):
    """{"pass@k" for every k no task has fewer samples than, "n_tasks", "n_samples", "timeouts", "errors"}:
    pass@k is averaged over the tasks that have samples; timeouts and errors count samples."""
    counts = {}
    for r in results:
        n, c = counts.get(r["task_id"], (0, 0))
        counts[r["task_id"]] = (n + 1, c + bool(r["passed"]))
    summary = {}
    for k in sorted(set(ks)):
        if counts and all(n >= k for n, _ in counts.values()):
            summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    summary.update(n_tasks=len(counts), n_samples=len(results),
                   timeouts=sum(r["status"] == "timeout" for r in results),
                   errors=sum(r["status"] == "error" for r in results))
    return summary


def format_summary(summary):
    """The summary as a two-column table."""
    rows = [(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in summary.items()]
    width = max([len("metric")] + [len(key) for key, _ in rows])
    return "\n".join([f"{'metric':<{width}}  value"] + [f"{key:<{width}}  {value}" for key, value in rows])


def read_samples(path, tasks):
    """[(task_id, completion)] from JSONL {"task_id", "completion"}; a bad line or unknown task_id is a TaskError
    naming file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): strings may hold U+2028
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read ({e})")
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise TaskError(f"{path}:{number}: not valid JSON ({getattr(e, 'msg', e)})")
        if not (isinstance(sample, dict) and isinstance(sample.get("task_id"), str)
                and isinstance(sample.get("completion"), str)):
            raise TaskError(f"{path}:{number}: expected {{\"task_id\": str, \"completion\": str}}")
        if sample["task_id"] not in tasks:
            raise TaskError(f"{path}:{number}: unknown task_id {sample['task_id']!r} (not in the evaluated dataset)")
        samples.append((sample["task_id"], sample["completion"]))
    if not samples:
        raise TaskError(f"{path}: no samples")
    return samples


def bench_throughput(workers, n_programs=64, limits=Limits()):
    """Programs per second through score() with `workers` parallel workers (small assert programs)."""
    task = {"task_id": "bench", "metadata": {"test": "def check(f):\n    assert f(2) == 3\n", "entry_point": "f"}}
    samples = [("bench", "def f(x):\n    return x + 1")] * n_programs
    isolation()  # the one-off probe is not part of the throughput
    start = time.perf_counter()
    results = score({"bench": task}, samples, limits, workers)
    elapsed = time.perf_counter() - start
    assert all(r["passed"] for r in results), results[0]["stderr"]
    return n_programs / elapsed
