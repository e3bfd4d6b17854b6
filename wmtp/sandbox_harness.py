"""
The code that runs inside the sandbox (sandbox.py starts it; no torch, standard library only): the untrusted
candidate, which runs code_prefix + completion and then answers the judge, and the judges, which run the tests.

Shipped as bytecode compiled by the sandbox's own interpreter: python -I -S -c BOOT HEX ROLE FD... .
Roles: "run" a program (stdin/stdout tests: the evaluator compares its output); "serve" the same, then answer the
judge's requests on a pair of pipes; "judges" a server per worker slot that forks a fresh judge for each task it
is sent (its fds over a unix socket), so a program costs one process start, not two.
The codec is the same on both sides; only the judge's decoding matters (the candidate may replace its own).
"""
import builtins
import os
import resource
import struct
import sys
# the builtins the candidate's side uses after the program ran, as it found them (a program may patch builtins)
from builtins import (BaseException, Exception, OSError, SystemExit, TypeError, UnicodeDecodeError, bytearray, bytes,
                      callable, complex, dict, float, frozenset, int, isinstance, len, list, memoryview, min, range,
                      set, str, tuple, type)

LIMIT_MESSAGE, LIMIT_DEPTH, LIMIT_ITEMS = 1 << 24, 100, 1 << 22
SEQS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
KINDS = {tag: kind for kind, tag in SEQS.items()}
BASES = (int, float, complex, str, bytes, dict, list, tuple, set, frozenset)


class Gone(BaseException):
    """The other side ended or broke the protocol: the task fails whatever the tests catch (BaseException)."""


class NotPlain(BaseException):
    """A value that is not plain data was to cross the boundary."""


def quit_(code=None):
    """exit() and quit() for the program (python -S skips site, which defines them): SystemExit(code), as site's do."""
    raise SystemExit(code)


def limit(memory, cpu, nproc):
    """rlimits this process and its children keep: no core files, at most NOFILE open files (pipes, sockets and
    in-flight fds are kernel memory no other limit counts), no bytes of POSIX message queues (the filter denies
    mq_open; this also stops a queue made as a file where an mqueue fs is mounted, and outlasts a filter that
    failed); address space and largest file, CPU seconds, processes when > 0 (nproc 0: the evaluator's own uid,
    mode "none", whose other processes would count)."""
    wanted = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, NOFILE, NOFILE), (resource.RLIMIT_MSGQUEUE, 0, 0)]
    for what, soft, hard in ((resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_FSIZE, memory, memory),
                             (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_NPROC, nproc, nproc)):
        if soft > 0:
            wanted.append((what, soft, hard))
    for what, soft, hard in wanted:
        cap = resource.getrlimit(what)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        resource.setrlimit(what, (soft, hard))
    builtins.exit = builtins.quit = quit_  # -S skips site, which defines them; programs use them


# -----------------------------------------------------------------------------
# confinement: a fresh keyring, Landlock (the fallback modes), the seccomp filter (every mode)

NOFILE = 64  # open files per process
# syscall numbers (x86_64, aarch64) the filter denies with EPERM: memory that RLIMIT_AS does not count (memfd, SysV
# and POSIX IPC, io_uring, userfaultfd), the kernel keyring, other processes' memory, new namespaces and mounts
# (a user namespace could mount an unsized tmpfs), and a few kernel interfaces no program needs
DENIED = {"memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
          "semget": (64, 190), "mq_open": (240, 180), "add_key": (248, 217), "request_key": (249, 218),
          "keyctl": (250, 219), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
          "io_uring_register": (427, 427), "userfaultfd": (323, 282), "bpf": (321, 280),
          "perf_event_open": (298, 241), "ptrace": (101, 117), "process_vm_readv": (310, 270),
          "process_vm_writev": (311, 271), "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40),
          "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsmount": (432, 432),
          "fork": (57, None), "vfork": (58, None)}
ARCHES = {"x86_64": (0, 0xC000003E, 56, 435), "aarch64": (1, 0xC00000B7, 220, 435)}  # column, AUDIT_ARCH, clone(3)
CLONE_THREAD, CLONE_NEW = 0x00010000, 0x7E020000  # CLONE_NEW*: ns, cgroup, uts, ipc, user, pid, net
LANDLOCK_CREATE, LANDLOCK_ADD, LANDLOCK_RESTRICT = 444, 445, 446


def seccomp_program(machine):
    """The classic-BPF filter (bytes of struct sock_filter): another architecture's calls are killed; the DENIED
    calls and x32 calls get EPERM; clone3 ENOSYS (its flags sit in memory a filter cannot read: the C library then
    uses clone); clone only for a thread of this process (no fork: one process, so RLIMIT_AS bounds its memory)."""
    column, arch, clone, clone3 = ARCHES[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    code = [(ld, "", "", 4), (jeq, "", "kill", arch), (ld, "", "", 0)]  # seccomp_data: nr at 0, arch at 4
    if machine == "x86_64":
        code.append((jge, "eperm", "", 0x40000000))  # __X32_SYSCALL_BIT
    code += [(jeq, "eperm", "", nrs[column]) for nrs in DENIED.values() if nrs[column] is not None]
    code += [(jeq, "enosys", "", clone3), (jeq, "", "allow", clone), (ld, "", "", 16),  # args[0], low half
             (jset, "eperm", "", CLONE_NEW), (jset, "allow", "eperm", CLONE_THREAD)]
    ends = {"allow": 0x7FFF0000, "eperm": 0x00050000 | 1, "enosys": 0x00050000 | 38, "kill": 0x80000000}
    at = {name: len(code) + i for i, name in enumerate(ends)}
    out = bytearray()
    for i, (op, yes, no, k) in enumerate(code):
        out += struct.pack("HBBI", op, at[yes] - i - 1 if yes else 0, at[no] - i - 1 if no else 0, k)
    for value in ends.values():
        out += struct.pack("HBBI", ret, 0, 0, value)
    return bytes(out)


def confine(rules_fd, seccomp=True):
    """Last step before untrusted code: a new anonymous session keyring where the kernel gives one (the
    evaluator's keys out of reach; where it refuses, say an outer filter or the uid's key quota, the filter below
    still denies every key call), no-new-privs, with rules_fd >= 0 Landlock (files: read-only "r PATH" and
    read-write "w PATH" lines, nothing else; with ABI 4 no TCP, with ABI 6 no signals or abstract sockets beyond
    the sandbox), then the seccomp filter. Any of those three that fails raises: the program does not run."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    machine = os.uname().machine
    if machine not in ARCHES:
        raise OSError("no seccomp filter for %s" % machine)
    keyctl = DENIED["keyctl"][ARCHES[machine][0]]
    libc.syscall(ctypes.c_long(keyctl), ctypes.c_long(1), None)  # KEYCTL_JOIN_SESSION_KEYRING (denied: no keys)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if rules_fd >= 0:
        landlock(libc, read_text(rules_fd))
    if not seccomp:
        return
    code = seccomp_program(machine)
    program = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxQ", len(code) // 8, ctypes.addressof(program))  # struct sock_fprog
    if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def landlock(libc, rules):
    """Restricts this process and its children to the rules ("r PATH" / "w PATH" lines) with every access right
    this kernel's Landlock ABI handles; paths missing here are skipped."""
    import ctypes
    call = lambda nr, *args: libc.syscall(ctypes.c_long(nr), *args)  # noqa: E731
    abi = call(LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available (Linux >= 5.13 with landlock among its LSMs)")
    everything = (1 << (13 if abi == 1 else 14 if abi == 2 else 15 if abi < 5 else 16)) - 1
    attr = struct.pack("QQQ", everything, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)[:8 if abi < 4 else 16 if abi < 6
                                                                                         else 24]
    ruleset = call(LANDLOCK_CREATE, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    file_rights = everything & (1 | 2 | 4 | 1 << 14 | 1 << 15)  # execute, write, read, truncate, ioctl
    for line in rules.splitlines():
        rights = everything if line[0] == "w" else 1 | 4 | 8  # execute, read files, read directories
        try:
            fd = os.open(line[2:], os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # not on this machine
        if os.fstat(fd).st_mode & 0o170000 != 0o040000:  # not a directory
            rights &= file_rights
        beneath = ctypes.c_char_p(struct.pack("<Qi", rights, fd))  # struct landlock_path_beneath_attr
        added = call(LANDLOCK_ADD, ctypes.c_int(ruleset), ctypes.c_int(1), beneath, ctypes.c_uint32(0))
        os.close(fd)
        if added != 0:
            raise OSError(ctypes.get_errno(), "landlock_add_rule %s" % line[2:])
    if call(LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)


def encode(v, out, depth=0):
    """Appends plain data's encoding (a tag byte, then a 4-byte size where needed) to the bytearray out; a
    subclass of a plain type crosses as its base; anything else is NotPlain naming its type."""
    kind = type(v)
    if depth > LIMIT_DEPTH:
        raise NotPlain("a value nested deeper than %d" % LIMIT_DEPTH)
    if v is None or kind is bool:
        out += b"N" if v is None else b"T" if v else b"F"
    elif kind is int or kind is str or kind is bytes:
        data = v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True) if kind is int else \
            v.encode("utf-8", "surrogatepass") if kind is str else v
        out += {int: b"i", str: b"s", bytes: b"b"}[kind] + len(data).to_bytes(4, "big") + data
    elif kind is float or kind is complex:
        out += b"f" + struct.pack(">d", v) if kind is float else b"c" + struct.pack(">dd", v.real, v.imag)
    elif kind in SEQS or kind is dict:
        out += SEQS.get(kind, b"d") + len(v).to_bytes(4, "big")
        for x in v.items() if kind is dict else v:
            for y in x if kind is dict else (x,):
                encode(y, out, depth + 1)
    else:
        for base in BASES:
            if isinstance(v, base):
                plain = {str: str.__str__, int: int.__int__, float: float.__float__}.get(base, base)(v)
                if type(plain) is base:
                    return encode(plain, out, depth)
        raise NotPlain(kind.__name__)


class Reader:
    """The strict decoder: only the tags above, exact types out, sizes checked against the bytes there are,
    at most LIMIT_ITEMS values nested at most LIMIT_DEPTH deep; anything else is Gone."""

    def __init__(self, data):
        self.data, self.pos, self.items = data, 0, LIMIT_ITEMS

    def take(self, n):
        """The next n bytes of the message; Gone when fewer are left (a truncated message)."""
        if n > len(self.data) - self.pos:
            raise Gone("a truncated message")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def size(self):
        """The next 4-byte big-endian length."""
        return int.from_bytes(self.take(4), "big")

    def value(self, depth=0):
        """The next plain value (None, bool, int, float, str, bytes, list, dict), each counted against LIMIT_ITEMS and
        nested at most LIMIT_DEPTH deep; Gone for anything else."""
        self.items -= 1
        if self.items < 0 or depth > LIMIT_DEPTH:
            raise Gone("a value of over %d items or nested over %d deep" % (LIMIT_ITEMS, LIMIT_DEPTH))
        tag = self.take(1)
        try:
            if tag in (b"N", b"T", b"F"):
                return {b"N": None, b"T": True, b"F": False}[tag]
            if tag == b"i":
                return int.from_bytes(self.take(self.size()), "big", signed=True)
            if tag == b"s":
                return self.take(self.size()).decode("utf-8", "surrogatepass")
            if tag == b"b":
                return bytes(self.take(self.size()))
            if tag == b"f":
                return struct.unpack(">d", self.take(8))[0]
            if tag == b"c":
                return complex(*struct.unpack(">dd", self.take(16)))
            if tag in KINDS:
                return KINDS[tag]([self.value(depth + 1) for _ in range(self.size())])
            if tag == b"d":
                return {self.value(depth + 1): self.value(depth + 1) for _ in range(self.size())}
        except (TypeError, UnicodeDecodeError) as e:  # unhashable set items or keys, bad UTF-8
            raise Gone("a malformed value (%s)" % e)
        raise Gone("a malformed value (tag %r)" % tag)


def read_exactly(fd, n):
    """Exactly n bytes from fd, in reads of at most 1 MiB; Gone when the other side closes first."""
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise Gone("the other side closed its pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send(fd, message):
    """One message to fd: its 4-byte length, then its plain-data encoding; NotPlain over LIMIT_MESSAGE bytes or for a
    value that is not plain data."""
    out = bytearray(4)
    encode(message, out)
    if len(out) - 4 > LIMIT_MESSAGE:
        raise NotPlain("a message over %d bytes" % LIMIT_MESSAGE)
    out[:4] = (len(out) - 4).to_bytes(4, "big")
    view = memoryview(out)
    while view:
        view = view[os.write(fd, view):]


def recv(fd):
    """One message: a list of plain data whose first item is a str; Gone when the pipe closes or it is not."""
    size = int.from_bytes(read_exactly(fd, 4), "big")
    if size > LIMIT_MESSAGE:
        raise Gone("a message over %d bytes" % LIMIT_MESSAGE)
    reader = Reader(read_exactly(fd, size))
    message = reader.value()
    if reader.pos != size or type(message) is not list or not message or type(message[0]) is not str:
        raise Gone("a malformed message")
    return message


def read_text(fd):
    """All of fd as text (UTF-8; lone surrogates kept), closing it."""
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", "surrogatepass")


def run(fd, req, resp, allow_exit):
    """Runs program.py's source (from fd; written to the work dir for tracebacks), then with req >= 0 answers
    the judge until it closes req."""
    source = read_text(fd)
    with open("program.py", "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)
    code = compile(source, "program.py", "exec")
    ns = {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins}
    sys.argv = ["program.py"]
    try:
        exec(code, ns)
    except SystemExit as e:
        if not (allow_exit and e.code in (None, 0)):
            sys.stderr.write("SystemExit(%r) before the program finished\n" % (e.code,))
            sys.stderr.flush()
            os._exit(3)
    sys.stdout.flush()
    os.fstat(1)  # a program that closed its stdout did not finish as a program does
    while req >= 0:
        try:
            message = recv(req)
        except Gone:
            break
        send(resp, answer(ns, message))
    sys.stderr.flush()
    os._exit(0)


def answer(ns, message):
    """["get", name] -> ["fn"] | ["mod", name] | ["val", value] | ["none"] | ["bad", type];
    ["call", name, args, kwargs] -> ["ok", value] | ["raise", type, message] | ["bad", type]."""
    name = message[1]
    if message[0] == "get":
        if name not in ns:
            return ["none"]
        value = ns[name]
        if type(value).__name__ == "module":
            return ["mod", value.__name__]
        if callable(value):
            return ["fn"]
    else:
        try:
            value = ns[name](*message[2], **message[3])
        except Exception as e:
            return ["raise", type(e).__name__, str(e)[:500]]
    try:
        encode(value, bytearray())
    except NotPlain as e:
        return ["bad", str(e)]
    return ["val" if message[0] == "get" else "ok", value]


class Link:
    """The judge's end of the pipes: fetches the program's names and calls its functions."""

    def __init__(self, req, resp):
        self.req, self.resp, self.poison, self.unbound = req, resp, None, {}

    def ask(self, message, what):
        """Sends one request and returns (kind, the rest of the reply); a broken pipe or a malformed reply poisons the
        link: every later ask raises the first failure, named by `what`."""
        try:
            send(self.req, message)
            reply = recv(self.resp)
            plain = reply[0] in ("val", "ok")  # a value; the other replies hold names and messages
            if len(reply) != 2 if plain else not all(type(x) is str for x in reply[1:]):
                raise Gone("a malformed reply")
            return reply[0], reply[1:]
        except (Gone, NotPlain, OSError) as e:
            if isinstance(e, BrokenPipeError):  # a program that ended: its EOF or this, whichever comes first, alike
                e = Gone("the other side closed its pipe")
            self.poison = self.poison or "%s: %s" % (what, e if str(e) else type(e).__name__)
            raise Gone(self.poison)

    def bind(self, ns, name):
        """Puts the program's `name` into the judge's namespace: a proxy for a function, a copy of plain data, a
        standard-library module by name; anything else is left unbound with the reason a test that uses it will see."""
        kind, rest = self.ask(["get", name], "looking up %s" % name)
        if kind == "fn":
            ns[name] = self.proxy(name)
        elif kind == "val":
            ns[name] = rest[0]
        elif kind == "mod" and rest and rest[0].split(".")[0] in getattr(sys, "stdlib_module_names", ()):
            ns[name] = __import__(rest[0], fromlist=["*"])
        elif kind == "bad" and rest:
            self.unbound[name] = "%s is a %s, not plain data or a function" % (name, rest[0][:100])
        elif kind != "none":
            self.unbound[name] = "%s is not a function, plain data or a standard module" % name

    def proxy(self, name):
        """A function the tests call in place of the program's `name`: plain-data arguments cross to the program, its
        result or its exception comes back as remote_error makes it."""
        def call(*args, **kwargs):
            try:
                encode([args, kwargs], bytearray())
            except NotPlain as e:
                raise NotPlain("the tests passed a %s to %s(): only plain data crosses to the program" % (e, name))
            kind, rest = self.ask(["call", name, list(args), kwargs], "calling %s()" % name)
            if kind == "ok":
                return rest[0]
            if kind == "raise" and len(rest) == 2:
                raise remote_error(name, *rest)
            self.poison = "%s() returned %s" % (name, "a %s, not plain data" % rest[0][:100]
                                                if kind == "bad" and rest else "a malformed reply")
            raise Gone(self.poison)
        call.__name__ = call.__qualname__ = name
        return call


def remote_error(name, kind, message):
    """The program's exception as a fresh one: the builtin of that name when there is one (tests may expect
    ValueError), else RuntimeError; never StopIteration, which would end the tests' loop (all(map(...))) early."""
    cls, error = getattr(builtins, kind, None), None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                     StopAsyncIteration)):
        try:
            error = cls(message)
        except Exception:
            pass
    error = error or RuntimeError("%s: %s" % (kind, message))
    error.wmtp_origin = "%s() raised %s: %s" % (name, kind, message[:200])
    return error


def why(e, link):
    """A verdict's reason: the exception's type and where in the tests; its message only when the program's."""
    line, tb = None, e.__traceback__
    while tb:
        if tb.tb_frame.f_code.co_filename == "<tests>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = " at line %d of the tests" % line if line else ""
    if link.poison or hasattr(e, "wmtp_origin"):
        return (link.poison or e.wmtp_origin) + where
    if isinstance(e, NameError) and getattr(e, "name", None) in link.unbound:
        return link.unbound[e.name] + where
    detail = ": %s" % e if isinstance(e, (NameError, NotPlain, Gone, SyntaxError)) else ""
    return "%s%s%s" % (type(e).__name__, detail, where)


def names(code):
    """Every name the code objects (nested too) may load: globals the tests may want from the program."""
    found, todo = set(), [code]
    while todo:
        c = todo.pop()
        found.update(c.co_names)
        todo.extend(k for k in c.co_consts if type(k) is type(c))
    return found


def judge(task_fd, req, resp, verdict_fd):
    """Runs the tests (after the prefix's trusted part) against the program behind req/resp; writes
    "passed" or "failed" and a reason to verdict_fd."""
    test, prefix, entry = read_text(task_fd).split("\0")
    link = Link(req, resp)
    try:
        tests, prefix = compile(test, "<tests>", "exec"), compile(prefix, "<code_prefix>", "exec")
        ns = {"__name__": "__main__", "__builtins__": builtins}
        exec(prefix, ns)
        wanted = (names(tests) | names(prefix)) - set(ns) - set(vars(builtins))
        for name in sorted(wanted | ({entry} if entry else set())):
            link.bind(ns, name)
        exec(tests, ns)
        if entry and entry not in ns:
            raise Gone(link.unbound.get(entry) or "the program defines no %s" % entry)
        if entry:
            ns["check"](ns[entry])
        verdict = "failed\n" + link.poison if link.poison else "passed\n"
    except BaseException as e:
        verdict = "failed\n" + why(e, link)[:500]
    os.write(verdict_fd, verdict.replace("\0", " ").encode("utf-8", "replace"))
    os._exit(0)


def serve_judges(sock_fd, memory, cpu):
    """Forks a judge for each task sent on the socket (a byte and the fds TASK REQ RESP VERDICT ERR), waits for
    it, then appends "\\0" and its exit status to its verdict pipe: one judge at a time, each with fresh state.
    Each judge is confined like a candidate (the server's Landlock domain, then its own keyring and filter)."""
    import socket
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 5)
        except OSError:
            os._exit(0)
        if len(fds) != 5:
            os._exit(0)  # the evaluator closed its end
        pid = os.fork()
        if pid == 0:
            sock.close()
            os.dup2(fds[4], 2)
            limit(memory, cpu, 0)
            confine(-1)
            judge(*fds[:4])
        for fd in fds[:3] + fds[4:]:
            os.close(fd)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.write(fds[3], b"\0%d" % status)
        os.close(fds[3])


def drop_keys():
    """Run as a slot uid (role "drop_keys", uid mode): its keyrings that outlive a process (persistent, user,
    user-session) emptied. It joins a session keyring of its own first (not the evaluator's, which it inherits) and
    links the persistent keyring there, so that it possesses it and may clear it."""
    import ctypes
    call = ctypes.CDLL(None).syscall
    keyctl = DENIED["keyctl"][ARCHES[os.uname().machine][0]]
    call(keyctl, 1, None)                               # KEYCTL_JOIN_SESSION_KEYRING, a new anonymous one
    persistent = call(keyctl, 22, -1, -3)               # KEYCTL_GET_PERSISTENT, linked into it
    for ring in (persistent, -4, -5):                   # and the user and user-session keyrings
        if ring != -1:
            call(keyctl, 7, ring)                       # KEYCTL_CLEAR


def main(role, *numbers):
    """ROLE FD REQ RESP RULES MEMORY CPU NPROC ALLOW_EXIT (fds a role does not use: -1; RULES: Landlock's)."""
    if role == "drop_keys":
        drop_keys()
        os._exit(0)
    fd, req, resp, rules, memory, cpu, nproc, allow_exit = [int(n) for n in numbers]
    if role == "judges":
        limit(0, 0, nproc)
        confine(rules, seccomp=False)  # it forks the judges; each applies the filter itself
        serve_judges(fd, memory, cpu)
    limit(memory, cpu, nproc)
    confine(rules)
    run(fd, req, resp, allow_exit)


if __name__ == "__main__":
    main(*sys.argv[2:])  # argv[1]: this module's bytecode (sandbox.BOOT)
