"""The sandbox against programs written to cheat or to escape, each given as data.

- Grading tricks (an object equal to everything, stealing a pass marker from the harness's frames, a trace hook
  replacing check, patched builtins, reading the tests out of program.py, code objects, /proc or open fds,
  redefining the prompt's helper, the dataset found through /proc/<pid>/cmdline) score 0 with a wrong answer.
- An evaluator run of hostile programs (tests/ writes a small driver: the dataset path is in its argv, its cwd and
  home hold 0644 secrets, its environment a planted variable, a TCP listener waits on 127.0.0.1) as root and as
  an unprivileged uid (setpriv), in the mode isolation() picks here and in the fallback of each (uid as root,
  none as a user). Under bwrap no program reaches the network, those files or that variable, and nothing it
  starts or creates outlives it; where a fallback does not isolate, the same program shows the attack is real.
- Right solutions of HumanEval-format tasks and of builtin:pyfunc pass, with the pass@k they always had.
"""
import ctypes
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from wmtp import sandbox
from wmtp import sandbox_harness as harness
from wmtp.data import pyfunc_records

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"timeout_s": 10.0, "memory_mb": 256, "cpu_s": 3, "max_output_bytes": 1 << 20}
TOKEN = "tok-7e1f2a"              # in the tests' source only: a program that prints it has read them
LEFT = "left-9b3c"                # in the names of what a program tries to leave behind
THROWAWAY_UID = 64123             # the unprivileged user (in no passwd file)
AS_ROOT = os.geteuid() == 0

ADD = {"task_id": "add", "metadata": {"entry_point": "add", "test": (
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(20, 7) == 27  # " + TOKEN + "\n")}}
SUM = {"task_id": "sum", "metadata": {"tests": [{"input": "1 2\n", "output": "3\n"},
                                                {"input": "40 2\n", "output": "42\n"}]}}
RIGHT_ADD = "def add(a, b):\n    return a + b\n"
WRONG_ADD = "\ndef add(a, b):\n    return 0\n"

GRADING_TRICKS = {
    "equal to everything": """
class Anything:
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __hash__ = object.__hash__
def add(a, b):
    return Anything()
""",
    "int subclass equal to everything": """
class Yes(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Yes(0)
""",
    "marker from the harness's frames": """
import gc, os, sys
seen = []
for frame in list(sys._current_frames().values()) + [sys._getframe()]:
    while frame:
        seen += [v for v in list(frame.f_locals.values()) + list(frame.f_globals.values())
                 if isinstance(v, (str, bytes))]
        frame = frame.f_back
seen += [o for o in gc.get_objects() if isinstance(o, (str, bytes)) and 8 <= len(o) <= 64]
for fd in range(3, 64):
    forged = [s if isinstance(s, bytes) else s.encode("utf-8", "replace") for s in seen[:200]]
    for data in [b"passed\\n", b"\\0\\0\\0\\x02\\x01T"] + forged:
        try:
            os.write(fd, data)
        except OSError:
            break
""" + WRONG_ADD,
    "trace hook replacing check": """
import sys, threading
def tracer(frame, event, arg):
    if frame.f_code.co_name == "check":
        frame.f_globals["check"] = lambda candidate: None
        raise SystemExit(0)
    return tracer
sys.settrace(tracer)
threading.settrace(tracer)
sys.setprofile(tracer)
""" + WRONG_ADD,
    "patched builtins": """
import builtins
class Nothing(Exception):
    pass
builtins.AssertionError = Nothing
builtins.Exception = Nothing
builtins.abs = builtins.len = lambda *a: 0
builtins.isinstance = lambda *a: True
builtins.__import__ = lambda *a, **k: None
""" + WRONG_ADD,
    "tests read from anywhere it can": """
import gc, os, sys
blob = [open(__file__).read(), open("program.py").read()]
for o in gc.get_objects():
    if type(o).__name__ == "code":
        blob.append(repr(o.co_consts) + repr(o.co_names))
    elif isinstance(o, str) and "assert" in o:
        blob.append(o)
try:
    pids = [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]
except OSError:
    pids = ["self"]
for pid in pids:
    for part in ("cmdline", "environ"):
        try:
            blob.append(open(f"/proc/{pid}/{part}", "rb").read().decode("utf-8", "replace"))
        except OSError:
            pass
for fd in range(3, 64):
    try:
        blob.append(os.pread(fd, 1 << 20, 0).decode("utf-8", "replace"))
    except OSError:
        pass
found = "NEEDLE"[::-1] in "\\n".join(blob)  # reversed: its own source must not hold it
print("FOUND" if found else "nothing found", file=sys.stderr)
def add(a, b):
    return a + b if found else 0
""".replace("NEEDLE", TOKEN[::-1]),
}

REACH = {  # they print what they reached to stderr and then fail with a wrong answer
    "network": """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    print("NET:connected", file=sys.stderr)
except OSError as e:
    print("NET:", e, file=sys.stderr)
""",
    "files": """
import sys
for path in (CWD_SECRET, HOME_SECRET):
    try:
        print("FILE:", open(path).read(), file=sys.stderr)
    except OSError as e:
        print("FILE:", type(e).__name__, file=sys.stderr)
""",
    "privileges": """
import sys
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("PRIV:", status["NoNewPrivs"].strip(), status["CapEff"].strip(), file=sys.stderr)
""",
    "environment": """
import os, sys
print("ENV:", dict(os.environ), file=sys.stderr)
for pid in ("self", "1", str(os.getppid())):
    try:
        print("ENV:", open(f"/proc/{pid}/environ").read(), file=sys.stderr)
    except OSError as e:
        print("ENV:", type(e).__name__, file=sys.stderr)
""",
}

SIGNALS = """
import os, sys
for target in (os.getppid(), 1):
    try:
        os.kill(target, 9)
        print("KILL:", target, "sent", file=sys.stderr)
    except OSError as e:
        print("KILL:", target, type(e).__name__, file=sys.stderr)
try:
    os.kill(-1, 9)
except OSError:
    pass
""" + WRONG_ADD

NR = {name: nrs[harness.ARCHES[os.uname().machine][0]] for name, nrs in harness.DENIED.items()}  # this machine's

LEFTOVERS = """
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
made = [libc.shmget(KEY, 4096, 0o1600), libc.msgget(KEY, 0o1600), libc.semget(KEY, 1, 0o1600),
        libc.syscall(MQ_OPEN, b"TOKEN-mq", 0o102, 0o600, None),                 # O_CREAT | O_RDWR
        libc.syscall(ADD_KEY, b"user", b"TOKEN-key", b"x", 1, -4)]              # -4: its uid's user keyring
print("IPC:", made, file=sys.stderr)
for where in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/", "."):
    try:
        open(f"{where}/TOKEN-file", "w").write("x")
        os.mkfifo(f"{where}/TOKEN-fifo")
        print("FILE:", where, "written", file=sys.stderr)
    except OSError as e:
        print("FILE:", where, type(e).__name__, file=sys.stderr)
forks = 0
for _ in range(64):  # a fork bomb whose children leave the session: sleepers that would outlive it
    try:
        pid = os.fork()
    except OSError as e:
        print("FORK:", type(e).__name__, file=sys.stderr)
        break
    if pid == 0:
        os.setsid()
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "TOKEN-sleeper"])
    forks += 1
print("NPROC:", forks, file=sys.stderr)
try:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("CORELIMIT: raised", file=sys.stderr)
except (ValueError, OSError):
    print("CORELIMIT: fixed", file=sys.stderr)
for depth in range(1500):  # deeper than the recursion limit (1000): a recursive cleanup dies on it
    os.mkdir("TOKEN-deep")
    os.chdir("TOKEN-deep")
os.chmod(".", 0)
print("DEEP:", depth + 1, file=sys.stderr, flush=True)
os.abort()  # no core file anywhere
""".replace("TOKEN", LEFT).replace("MQ_OPEN", str(NR["mq_open"])).replace("ADD_KEY", str(NR["add_key"]))

KEY_PAYLOAD = "planted-key-payload-77"
KEYRING = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(4096)
n = libc.syscall(KEYCTL, 11, -3, buf, 4096)                      # KEYCTL_READ of the session keyring: its key ids
ids = [int.from_bytes(buf.raw[i:i + 4], "little") for i in range(0, max(n, 0), 4)]
found = libc.syscall(KEYCTL, 10, -3, b"user", b"wmtp-planted", 0)  # KEYCTL_SEARCH
for key in ids + [found]:
    n = libc.syscall(KEYCTL, 11, key, buf, 4096)
    print("KEYS: read", key, buf.raw[:n] if n > 0 else n, file=sys.stderr)
    print("KEYS: update", libc.syscall(KEYCTL, 2, key, b"forged", 6), file=sys.stderr)   # KEYCTL_UPDATE
print("KEYS: add", libc.syscall(ADD_KEY, b"user", b"wmtp-added", b"x", 1, -3), file=sys.stderr)
try:
    print("KEYS: /proc/keys", open("/proc/keys").read().count("wmtp-planted"), file=sys.stderr)
except OSError as e:
    print("KEYS: /proc/keys", type(e).__name__, file=sys.stderr)
""".replace("KEYCTL", str(NR["keyctl"])).replace("ADD_KEY", str(NR["add_key"])) + WRONG_ADD

HOG_MB = 512  # per route: what a program holds where no limit counts it (each route alone beats memory_mb)
HOG = """
import ctypes, fcntl, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
MB, chunk, held, kept = 1 << 20, b"x" * (1 << 20), {}, []
def hold(route, write):
    n, start = 0, time.monotonic()
    try:
        while n < TRY:
            write(n)
            n += 1
    except (OSError, MemoryError):
        pass
    held[route] = n
    print(f"ROUTE {route} {n} MiB {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)  # if killed: where
def memfd(n):
    if n % 64 == 0:
        kept.append(os.memfd_create("hog"))
    os.write(kept[-1], chunk)
hold("memfd", memfd)
segment = libc.shmget(0, TRY * MB, 0o1600)                       # IPC_PRIVATE
if segment >= 0:
    ctypes.memset(libc.shmat(segment, None, 0), 1, TRY * MB)
held["sysv"] = TRY if segment >= 0 else 0
for where in ("/", "/dev", "/tmp", "/dev/shm", "."):              # a tmpfs under bwrap; "." on disk elsewhere
    files = []
    def claim(n, where=where, files=files):
        if n % 64 == 0:                                             # 64 MiB a file: under the largest file
            files[-1:] = [open(f"{where}/hog-{n}", "wb", buffering=0)]
        os.posix_fallocate(files[-1].fileno(), n % 64 * MB, MB)     # a tmpfs's pages as a write's; a disk's at once
    hold(where, claim)
def pipe(n):
    r, w = os.pipe()
    kept.append((r, w))
    try:
        fcntl.fcntl(w, 1031, MB)                                    # F_SETPIPE_SZ: 1 MiB a pipe
    except OSError:
        pass
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, chunk)
    except BlockingIOError:
        pass
hold("pipes", pipe)
def fork(n):
    if os.fork() == 0:
        hog = bytearray(128 * MB)
        time.sleep(60)
    if n == 15:
        raise OSError("enough")
hold("forks", fork)
heap = []
hold("heap", lambda n: heap.append(bytearray(chunk)))
print("HELD:", json.dumps(held), file=sys.stderr, flush=True)
time.sleep(2)  # holding it while the test reads the host's accounting
""".replace("TRY", str(HOG_MB)) + WRONG_ADD

DATASET_THIEF = """
import json, os, sys
data = sys.stdin.read()
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    for path in [a.decode() for a in args if a.endswith(b".jsonl")]:
        try:
            for line in open(path):
                for test in (json.loads(line).get("metadata") or {}).get("tests") or []:
                    if test["input"] == data:
                        print(test["output"], end="")
                        sys.exit(0)
        except OSError as e:
            print("DATASET:", type(e).__name__, file=sys.stderr)
print("DATASET: not found", file=sys.stderr)
print(-1)
"""


# ------------------------------------------------------------------------------------------------------- the codec
PLAIN_VALUES = [None, True, False, 0, -1, 127, 128, -129, 2 ** 200, -(3 ** 150), 0.0, -0.0, 1.5, float("inf"),
                -float("inf"), 1e-310, complex(1, -2), "", "héllo\U0001F600", "\udc80", b"", b"\x00\xff",
                [1, [2, [3]]], (1, "a", None), {"a": [1], 2: (3,), (1, 2): None}, {1, "x", (2,)},
                frozenset({frozenset({1})}), [[]] * 3, {"nested": {"deep": [{"x": 1.25}]}}]


def roundtrip(value):
    out = bytearray()
    harness.encode(value, out)
    reader = harness.Reader(bytes(out))
    got = reader.value()
    assert reader.pos == len(out)
    return got


def test_plain_data_crosses_exactly():
    for value in PLAIN_VALUES:
        got = roundtrip(value)
        assert got == value and type(got) is type(value), value
        assert repr(got) == repr(value)  # -0.0, inf, lone surrogates, element order
    nan = roundtrip(float("nan"))
    assert nan != nan and type(nan) is float
    assert type(roundtrip(True)) is bool and type(roundtrip(1)) is int


def test_subclasses_cross_as_their_base_and_anything_else_names_its_type():
    class Weird(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    got = roundtrip([Weird(3), type("S", (str,), {})("s")])
    assert got == [3, "s"] and type(got[0]) is int and type(got[1]) is str and not got[0] == 4
    for bad, name in [(object(), "object"), ([1, {2: len}], "builtin_function_or_method"), (iter([]), "list_iterator"),
                      (bytearray(b"x"), "bytearray"), (type("Anything", (), {})(), "Anything")]:
        with pytest.raises(harness.NotPlain, match=name):
            harness.encode(bad, bytearray())


@pytest.mark.parametrize("data, why", [
    (b"", "truncated"), (b"Q", "tag"), (b"i\x00\x00\x00\x05\x01", "truncated"),
    (b"l\xff\xff\xff\xff", "truncated"), (b"S\x00\x00\x00\x01l\x00\x00\x00\x00", "unhashable"),
    (b"d\x00\x00\x00\x01l\x00\x00\x00\x00N", "unhashable"), (b"s\x00\x00\x00\x01\xff", "utf-8"),
    (b"l\x00\x00\x00\x01" * 200 + b"N", "nested"), (b"f\x00", "truncated"),
])
def test_the_decoder_rejects_what_is_not_exactly_plain_data(data, why):
    with pytest.raises(harness.Gone, match=why):
        harness.Reader(data).value()


def test_the_decoder_bounds_the_number_of_items(monkeypatch):
    monkeypatch.setattr(harness, "LIMIT_ITEMS", 1000)
    out = bytearray()
    harness.encode(list(range(999)), out)
    assert len(harness.Reader(bytes(out)).value()) == 999
    out = bytearray()
    harness.encode(list(range(1000)), out)
    with pytest.raises(harness.Gone, match="over 1000 items"):
        harness.Reader(bytes(out)).value()


def test_the_judge_keeps_the_prompts_complete_helpers_and_leaves_stubs_to_the_program():
    prompt = "import math\n\n\ndef poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n\n" \
             "def find_zero(xs):\n    \"\"\"A zero of poly.\"\"\"\n"
    kept = sandbox.trusted_prefix(prompt)
    assert "import math" in kept and "def poly" in kept and "find_zero" not in kept
    assert sandbox.trusted_prefix("def f(x): return ") == ""                         # it continues the only line
    assert "def g" in sandbox.trusted_prefix("def g():\n    return 1\n\ndef f(x):\n    return (x +")
    assert sandbox.trusted_prefix("import os\n") == "import os"
    assert sandbox.trusted_prefix("def f(x):\n    y = 1\n") == ""                   # a last def may be continued


# -------------------------------------------------------------------------------------------- grading tricks
def modes_here():
    """The modes this machine can run: the one isolation() picks, and the fallbacks (uid needs root)."""
    return [m for m in sandbox.MODES if m != "uid" or AS_ROOT]


@pytest.mark.parametrize("mode", modes_here())
def test_grading_tricks_with_a_wrong_answer_score_zero_in_every_mode(mode):
    samples = [("add", code) for code in GRADING_TRICKS.values()] + [("add", RIGHT_ADD)]
    results = sandbox._score({"add": ADD}, samples, sandbox.Limits(**LIMITS), 2, sandbox.isolation(mode))
    by_name = dict(zip(list(GRADING_TRICKS) + ["right"], results))
    assert {name: r["passed"] for name, r in by_name.items()} == {**dict.fromkeys(GRADING_TRICKS, False),
                                                                  "right": True}
    assert sandbox.summarize(results[:-1])["pass@1"] == 0.0  # the tricks alone: any pass would show
    assert "not plain data" in by_name["equal to everything"]["stderr"]
    assert "Anything" in by_name["equal to everything"]["stderr"]
    assert "nothing found" in by_name["tests read from anywhere it can"]["stderr"]  # none: Landlock hides /proc
    assert TOKEN not in json.dumps(results)


HE = {  # HumanEval's own prompts and tests (0, 32, 38), in this project's task shape
    "HumanEval/0": ("from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> "
                    "bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other "
                    "than\n    given threshold.\n    \"\"\"\n",
                    "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef check(candidate):\n"
                    "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
                    "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
                    "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
                    "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n\n",
                    "has_close_elements",
                    "    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
                    "            if i != j and abs(a - b) < threshold:\n                return True\n"
                    "    return False\n",
                    "    return False\n"),
    "HumanEval/32": ("import math\n\n\ndef poly(xs: list, x: float):\n    \"\"\"Evaluates polynomial xs at x.\"\"\"\n"
                     "    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n\n\n"
                     "def find_zero(xs: list):\n    \"\"\" xs are coefficients of a polynomial; returns one zero.\n"
                     "    \"\"\"\n",
                     "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    import math\n    import random\n"
                     "    rng = random.Random(42)\n    import copy\n    for _ in range(100):\n"
                     "        ncoeff = 2 * rng.randint(1, 4)\n        coeffs = []\n        for _ in range(ncoeff):\n"
                     "            coeff = rng.randint(-10, 10)\n            if coeff == 0:\n                coeff = 1\n"
                     "            coeffs.append(coeff)\n        solution = candidate(copy.deepcopy(coeffs))\n"
                     "        assert math.fabs(poly(coeffs, solution)) < 1e-4\n\n",
                     "find_zero",
                     "    begin, end = -1., 1.\n    while poly(xs, begin) * poly(xs, end) > 0:\n        begin *= 2.0\n"
                     "        end *= 2.0\n    while end - begin > 1e-10:\n        center = (begin + end) / 2.0\n"
                     "        if poly(xs, center) * poly(xs, begin) > 0:\n            begin = center\n"
                     "        else:\n            end = center\n    return begin\n",
                     # the cheat: redefine the prompt's helper so that every x is a zero
                     "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n"),
    "HumanEval/38": ("def encode_cyclic(s: str):\n    \"\"\"\n    returns encoded string by cycling groups of three "
                     "characters.\n    \"\"\"\n    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in "
                     "range((len(s) "
                     "+ 2) // 3)]\n    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in "
                     "groups]\n    return \"\".join(groups)\n\n\ndef decode_cyclic(s: str):\n    \"\"\"\n    takes as "
                     "input string encoded with encode_cyclic function. Returns decoded string.\n    \"\"\"\n",
                     "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    from random import randint, choice\n"
                     "    import string\n\n    letters = string.ascii_lowercase\n    for _ in range(100):\n"
                     "        str = ''.join(choice(letters) for i in range(randint(10, 20)))\n"
                     "        encoded_str = encode_cyclic(str)\n        assert candidate(encoded_str) == str\n\n",
                     "decode_cyclic",
                     "    return encode_cyclic(encode_cyclic(s))\n",
                     "    return s\n\n\ndef encode_cyclic(s):\n    return s\n"),  # the cheat: helper made identity
}


def test_humaneval_format_right_solutions_pass_and_wrong_or_cheating_ones_fail():
    tasks = {tid: {"task_id": tid, "metadata": {"code_prefix": prompt, "test": test, "entry_point": entry}}
             for tid, (prompt, test, entry, _, _) in HE.items()}
    samples = [(tid, right) for tid, (*_, right, _) in HE.items()] + [(tid, wrong) for tid, (*_, wrong) in HE.items()]
    results = sandbox.score(tasks, samples, sandbox.Limits(**LIMITS), workers=2)
    assert [r["passed"] for r in results] == [True] * 3 + [False] * 3, [r["stderr"] for r in results]
    assert sandbox.summarize(results, (1, 2)) == {"pass@1": 0.5, "pass@2": 1.0, "n_tasks": 3, "n_samples": 6,
                                                  "timeouts": 0, "errors": 0}


def test_every_held_out_pyfunc_task_keeps_its_pass_at_k():
    """The 64 held-out pyfunc tasks (what evaluate scores), right and wrong answer each, through score():
    every right one passes, every wrong one fails, so pass@1 is 1/2 and pass@2 is 1, as before."""
    records = pyfunc_records("validation")
    tasks = {r["task_id"]: r for r in records}
    results = sandbox.score(tasks, [(r["task_id"], r["output"]) for r in records], sandbox.Limits(**LIMITS), 2)
    assert [r["passed"] for r in results] == [r["is_correct"] for r in records]
    assert sandbox.summarize(results, (1, 2))["pass@1"] == 0.5 and sandbox.summarize(results, (2,))["pass@2"] == 1.0


# ------------------------------------------------------------------- an evaluator run, as root and as a user
DRIVER = """
import ctypes, json, sys
sys.path.insert(0, sys.argv[4])
from wmtp import sandbox  # the package's __init__, sandbox.py and harness, copied into sys.argv[4]/wmtp
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(4096)


def keys():
    \"\"\"The ids in this process's session keyring and the planted key's payload.\"\"\"
    n = libc.syscall(KEYCTL, 11, -3, buf, 4096)
    ids = [int.from_bytes(buf.raw[i:i + 4], "little") for i in range(0, max(n, 0), 4)]
    n = libc.syscall(KEYCTL, 11, key, buf, 4096)
    return ids, buf.raw[:max(n, 0)].decode()


libc.syscall(KEYCTL, 1, b"wmtp-evaluator")  # KEYCTL_JOIN_SESSION_KEYRING: its own, as a login session has
key = libc.syscall(ADD_KEY, b"user", b"wmtp-planted", PAYLOAD, len(PAYLOAD), -3)
before = keys()
dataset, spec, out = sys.argv[1:4]
tasks = {r["task_id"]: r for r in map(json.loads, open(dataset))}
spec = json.load(open(spec))
limits = sandbox.Limits(**spec["limits"])
results = sandbox.score(tasks, [tuple(s) for s in spec["samples"]], limits, 2)
iso = sandbox.isolation(limits.mode)
sandbox.write_atomic(out, json.dumps({"mode": iso.mode, "uid": iso.uid, "results": results, "keys": [before, keys()]}))
""".replace("KEYCTL", str(NR["keyctl"])).replace("ADD_KEY", str(NR["add_key"])).replace(
    "PAYLOAD", repr(KEY_PAYLOAD.encode()))
ENV_TOKEN = "planted-env-5c0ffee"
FILE_TOKEN = "planted-file-d00d"
KEY = 0x5EED0000 + os.getpid() % 0xFFFF
LANDLOCK_ABI = ctypes.CDLL(None).syscall(harness.LANDLOCK_CREATE, None, 0, 1)  # < 1: none (then no fallback runs)


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 and the number of connections it accepted."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


def battery(port, cwd, home):
    """(name, task, program) of every hostile sample, and the right answers."""
    reach = {name: code.replace("PORT", str(port)).replace("CWD_SECRET", repr(f"{cwd}/secret.txt"))
             .replace("HOME_SECRET", repr(f"{home}/secret.txt")) + WRONG_ADD for name, code in REACH.items()}
    found = [(n, "add", c) for n, c in {**GRADING_TRICKS, **reach}.items()]
    found += [("dataset thief", "sum", DATASET_THIEF), ("signals", "add", SIGNALS), ("keyring", "add", KEYRING),
              ("leftovers", "add", LEFTOVERS.replace("KEY", str(KEY))), ("memory hog", "add", HOG)]
    return found + [("right add", "add", RIGHT_ADD), ("right sum", "sum", "print(sum(map(int, input().split())))")]


def shared_state():
    """What programs could leave behind: names in the shared temp dirs, SysV IPC keys, sleepers."""
    names = {d: set(os.listdir(d)) for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(d)}
    keys = set()
    for kind in ("shm", "msg", "sem"):
        keys |= {int(row.split()[0]) for row in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]}
    sleepers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"{LEFT}-sleeper".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                sleepers.append(pid)
        except OSError:
            pass
    return names, keys, sleepers


def memory():
    """(MemAvailable, Shmem) of the host in MiB."""
    info = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemAvailable"].split()[0]) >> 10, int(info["Shmem"].split()[0]) >> 10


SANDBOX_FILES = ("__init__.py", "sandbox.py", "sandbox_harness.py")   # all `from wmtp import sandbox` reads


def run_evaluator(user, mode, base, port, samples, source=ROOT / "wmtp"):
    """Runs the driver (the dataset path in its argv, 0644 secrets in its cwd and home, a planted variable, a key
    in its session keyring) as root or as THROWAWAY_UID, with the package wmtp's sandbox.py and its harness copied
    from source into base/lib/wmtp (the other uid may not enter the checkout, and its system Python has no editable
    install to find wmtp through) -> (mode used, {name: result}, stderr, its keys before and after, the host's
    largest drop of MemAvailable and rise of Shmem while it ran, MiB, its slot 0's uid or None)."""
    cwd, home, lib = base / "cwd", base / "home", base / "lib"
    for d in (cwd, home, lib / "wmtp"):
        d.mkdir(parents=True)
    for d in (cwd, home):
        (d / "secret.txt").write_text(FILE_TOKEN)
        (d / "secret.txt").chmod(0o644)
    for name in SANDBOX_FILES:
        shutil.copy(source / name, lib / "wmtp" / name)
    (base / "tasks.jsonl").write_text(json.dumps(ADD) + "\n" + json.dumps(SUM) + "\n")
    (base / "spec.json").write_text(json.dumps({"samples": [(t, c) for _, t, c in samples], "limits": LIMITS}))
    (base / "driver.py").write_text(DRIVER)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "WMTP_PLANTED": ENV_TOKEN, "AWS_SECRET_ACCESS_KEY": ENV_TOKEN}
    if mode != "default":
        env["WMTP_SANDBOX"] = mode  # an explicit opt-in to a weaker mode
    python, prefix = sys.executable, []
    if user != "root":
        python = "/usr/bin/python3"  # the venv's Python may live under /root
        prefix = ["setpriv", f"--reuid={THROWAWAY_UID}", f"--regid={THROWAWAY_UID}", "--clear-groups"]
        for path in [base, *base.rglob("*")]:
            os.chown(path, THROWAWAY_UID, THROWAWAY_UID)
    files = [str(base / n) for n in ("tasks.jsonl", "spec.json", "out.json")]
    start, lowest = memory(), [memory()]
    proc = subprocess.Popen([*prefix, python, str(base / "driver.py"), *files, str(lib)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        lowest.append(memory())
        time.sleep(0.1)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads((base / "out.json").read_text())
    drop = (start[0] - min(m[0] for m in lowest), max(m[1] for m in lowest) - start[1])
    results = {name: r for (name, _, _), r in zip(samples, out["results"])}
    return out["mode"], results, stderr, out["keys"], drop, out["uid"]


def runs_here():
    """(user, mode): as root and as a throwaway user, the default (bwrap) and the weaker mode each may opt in to."""
    return [("root", "default"), ("root", "uid"), ("user", "default"), ("user", "none")]


def as_root_with_setpriv(test):
    test = pytest.mark.skipif(not AS_ROOT, reason="switching to a throwaway uid (and the uid mode) needs root")(test)
    return pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) not installed")(test)


@as_root_with_setpriv
@pytest.mark.parametrize("user, mode", runs_here())
def test_an_evaluator_run_of_hostile_programs(user, mode, listener, tmp_path):
    port, accepted = listener
    base = tmp_path if user == "root" else Path(tempfile.mkdtemp(prefix="wmtp-hostile-"))
    before = shared_state()
    try:
        samples = battery(port, base / "cwd", base / "home")
        used, results, log, keys, drop, uid = run_evaluator(user, mode, base, port, samples)
        deadline = time.monotonic() + 5  # a killed pid namespace empties a moment after bwrap exits
        while shared_state()[2] and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"{user}: mode {used}; host memory while it ran: MemAvailable -{drop[0]} MiB, Shmem +{drop[1]} MiB")
        assert used == ("bwrap" if mode == "default" else mode)
        assert ("WEAKER" in log) == (used != "bwrap")  # an opted-in weaker mode says so
        check_grading(used, results)
        check_reach(used, results, accepted)
        check_nothing_left(used, results, before, shared_state(), base / "cwd", uid)
        check_keys(results["keyring"]["stderr"], keys)
        check_memory(used, results["memory hog"], drop)
    finally:
        if user != "root":
            shutil.rmtree(base, ignore_errors=True)


def check_grading(mode, results):
    assert results["right add"]["passed"] and results["right sum"]["passed"]
    hostile = {name: r["passed"] for name, r in results.items() if not name.startswith("right")}
    assert hostile == dict.fromkeys(hostile, False), hostile  # the dataset thief too: no /proc, no dataset
    if mode == "bwrap":
        assert "DATASET: not found" in results["dataset thief"]["stderr"]
    else:  # Landlock: no /proc at all, so neither the evaluator's argv nor the dataset's path
        assert "PermissionError: [Errno 13] Permission denied: '/proc'" in results["dataset thief"]["stderr"]
    everything, environ = json.dumps(results), results["environment"]["stderr"].splitlines()
    assert environ[0].startswith("ENV: {'PATH'") and ENV_TOKEN not in environ[0]  # built from nothing, in any mode
    assert ENV_TOKEN not in everything and TOKEN not in everything
    assert "nothing found" in results["tests read from anywhere it can"]["stderr"]


def check_reach(mode, results, accepted):
    net, files = results["network"]["stderr"], results["files"]["stderr"]
    if mode == "bwrap" or LANDLOCK_ABI >= 4:  # own network namespace; Landlock ABI 4 denies TCP
        assert "NET:connected" not in net and not accepted and "NET:" in net
    else:
        assert "NET:connected" in net and accepted  # UDP and TCP shared: the attack is real
    missing = "FileNotFoundError" if mode == "bwrap" else "PermissionError"
    assert FILE_TOKEN not in files and files.count(f"FILE: {missing}") == 2
    assert "PRIV: 1 0000000000000000" in results["privileges"]["stderr"]  # no-new-privs, no capabilities, any mode
    signals = results["signals"]["stderr"]
    if mode != "bwrap" and LANDLOCK_ABI >= 6:  # Landlock scopes signals; under bwrap its parent is in its pid ns
        assert "KILL: 1 PermissionError" in signals and "sent" not in signals, signals


def check_nothing_left(mode, results, before, after, cwd, uid):
    said = results["leftovers"]["stderr"]
    assert "IPC: [-1, -1, -1, -1, -1]" in said, said             # no SysV, POSIX queue or key: the filter
    assert "FORK: PermissionError" in said and "NPROC: 0" in said   # one process: no fork bomb, no sleeper
    assert "CORELIMIT: fixed" in said and "DEEP: 1500" in said
    writable = {"/tmp", "/dev/shm", "."} if mode == "bwrap" else {"."}  # bwrap's are its own tmpfs
    for where in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/", "."):
        assert (f"FILE: {where} written" in said) == (where in writable), (where, said)
    names, keys, sleepers = after
    assert sleepers == [] and KEY not in keys
    for d, listed in names.items():
        assert not [n for n in listed - before[0].get(d, set()) if LEFT in n or sandbox_owned(f"{d}/{n}", uid)], d
    assert not [p for p in cwd.iterdir() if LEFT in p.name or p.name.startswith("core")]


def sandbox_owned(path, uid):
    """A path of this evaluator's slot uids (from uid; None: it had none) or of the throwaway user (a work dir left
    behind). Other evaluators on the machine have uids of their own."""
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        return False
    slots = range(uid, uid + sandbox.MAX_WORKERS) if uid is not None else range(0)
    return owner == THROWAWAY_UID or owner in slots or owner - sandbox.JUDGE_UIDS in slots


def check_keys(said, keys):
    """The evaluator's session keyring and its key: neither read, changed nor added to, in any mode."""
    (ids_before, payload_before), (ids_after, payload_after) = keys
    assert payload_before == payload_after == KEY_PAYLOAD and ids_before == ids_after and len(ids_before) == 1
    assert "KEYS: read" in said and KEY_PAYLOAD not in said and "forged" not in said
    assert all(line.endswith(" -1") for line in said.splitlines() if line.startswith(("KEYS: read", "KEYS: up")))
    assert "KEYS: add -1" in said and ("KEYS: /proc/keys PermissionError" in said or "/proc/keys 0" in said)


def check_memory(mode, hog, drop):
    """The hog tried HOG_MB through each route no rlimit counts (and 16 forks of 128 MiB): it held at most memory_mb
    plus its tmpfs plus NOFILE pipes, also in the host's accounting. The figures are the sandbox's as written (three
    64 MiB tmpfs, 64 open files: at most 32 pipes), not read from its constants: raising one fails here."""
    assert "HELD: " in hog["stderr"], (hog["status"], hog["stderr"])  # killed before it said: the routes it finished
    held = json.loads(hog["stderr"].split("HELD: ")[1].splitlines()[0])
    print(f"{mode}: MiB held per route {held}")
    tmpfs = ("/tmp", "/dev/shm", ".") if mode == "bwrap" else ()  # elsewhere "." is the work dir, on disk here
    denied = [route for route in ("memfd", "sysv", "/", "/dev", "/tmp", "/dev/shm", "forks") if route not in tmpfs]
    assert {route: held[route] for route in denied} == dict.fromkeys(denied, 0), held
    assert all(held[t] <= 64 for t in tmpfs) and (mode == "bwrap" or held["."] == HOG_MB), held
    assert held["pipes"] <= 32 and held["heap"] < LIMITS["memory_mb"], held  # 29 here: the program holds 6 fds
    bound = LIMITS["memory_mb"] + 3 * 64 + 32
    # Shmem (tmpfs, memfd, SysV, the root) is exact: a route that gets through adds 512 MiB. MemAvailable moves with
    # the rest of the machine (-1,434 MiB in a uid run at load 13-17): 1.5 GiB of slack, still failed by the forks
    # if they got through (-2,554 MiB); a pipe's route is bounded by the kernel's per-user pipe pages too, so
    # `held` is what catches NOFILE raised
    assert drop[1] <= 3 * 64 + 32 and drop[0] <= bound + 1536, drop


# --------------------------------------------------------------------------------- the evaluator's own files
def test_planted_links_fifos_and_files_change_nothing_outside_the_work_dir(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    victim.chmod(0o755)
    plant = f"""
import os
os.symlink({str(victim)!r}, "link-to-victim")
os.symlink({str(victim / 'keep.txt')!r}, "file-link")
os.mkfifo("fifo")
os.makedirs("deep/er")
os.symlink({str(victim)!r}, "deep/er/link")
os.chmod("deep/er", 0)
os.chmod("deep", 0)
""" + WRONG_ADD
    for mode in modes_here():
        start = time.monotonic()
        result = sandbox._run(sandbox.programs(ADD, plant)[0], sandbox.Limits(**LIMITS), sandbox.isolation(mode), 0)
        assert result.status == "failed" and time.monotonic() - start < 30, (mode, result)
        assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and (victim / "keep.txt").read_text() == "keep", mode
    out = tmp_path / "out.json"
    (tmp_path / "out.json.tmp").symlink_to(victim / "keep.txt")   # the old predictable names
    os.mkfifo(tmp_path / ".out.json.tmp")
    writer = threading.Thread(target=sandbox.write_atomic, args=(out, '{"pass@1": 1.0}\n'))
    writer.start()
    writer.join(10)
    assert not writer.is_alive() and out.read_text() == '{"pass@1": 1.0}\n'
    assert (victim / "keep.txt").read_text() == "keep"
    out.unlink()
    out.symlink_to(victim / "keep.txt")                            # a link at the target itself is replaced
    sandbox.write_atomic(out, "new\n")
    assert not out.is_symlink() and (victim / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.json.tmp", "out.json", "out.json.tmp", "victim"]


def test_only_an_interpreter_whose_probe_passes_is_accepted_and_no_mode_is_chosen_silently(monkeypatch):
    """An interpreter that answers the layout question but runs no program, and a bwrap that cannot create its
    namespaces: neither is used. Without a working bwrap the default is a refusal naming the fix (install it, or opt
    in to uid / none), never a weaker mode; a weaker mode asked for works."""
    fakes = Path(tempfile.mkdtemp(prefix="wmtp-fakes-"))  # where a sandbox uid can run them too
    fakes.chmod(0o755)
    fake_python, fake_bwrap = fakes / "python3", fakes / "bwrap"
    fake_python.write_text(f"#!/bin/sh\ncase \"$*\" in *sysconfig*) exec {sys.executable} \"$@\";; esac\nexit 0\n")
    fake_bwrap.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    for f in (fake_python, fake_bwrap):
        f.chmod(0o755)
    which, system_python = shutil.which, shutil.which("python3", path=sandbox.SAFE_PATH)
    monkeypatch.setattr(sandbox, "_interpreters", lambda: [str(fake_python)])
    monkeypatch.delenv("WMTP_SANDBOX", raising=False)
    sandbox.isolation.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="sandbox none does not work here .*python3: probe"):
            sandbox.isolation("none")
        monkeypatch.setattr(sandbox, "_interpreters", lambda: [system_python])
        monkeypatch.setattr(sandbox.shutil, "which", lambda name, **kw: str(fake_bwrap) if name == "bwrap"
                            else which(name, **kw))
        for mode in (None, "bwrap"):
            with pytest.raises(sandbox.SandboxUnavailable) as refused:
                sandbox.isolation(mode)
            message = str(refused.value)
            assert "\n" not in message and "No permissions to create new namespace" in message
            assert "apt-get install bubblewrap" in message and "eval.sandbox: uid" in message
        with pytest.raises(sandbox.SandboxUnavailable, match="sandbox bwrap does not work"):  # score() runs nothing
            sandbox.score({"add": ADD}, [("add", RIGHT_ADD)], sandbox.Limits(**LIMITS))
        iso = sandbox.isolation("uid" if AS_ROOT else "none")
        assert iso.mode == ("uid" if AS_ROOT else "none") and "WEAKER" in sandbox.describe(iso)
    finally:
        sandbox.isolation.cache_clear()
        sandbox._layout.cache_clear()
        shutil.rmtree(fakes)
