"""The guide's tracking stack as a pytest fixture: PostgreSQL + S3 (moto) + MLflow with basic auth,
started by the real `./run.sh server` and stopped the way a user stops it (Ctrl-C = SIGINT).

    from stack import tracking_stack  # noqa: F401  (registers the fixture in a test module)

    def test_x(tracking_stack, monkeypatch):
        for key in stack.ENV_KEYS:
            monkeypatch.setenv(key, tracking_stack[key])

`tracking_stack` (module scope) yields a dict with the seven `.env` lines run.sh printed
(ENV_KEYS: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD,
MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) plus
"pids" ({"postgres"|"s3"|"mlflow": pid}), "dirs" (the throwaway dirs) and "ports"
({"postgres"|"s3"|"mlflow": port}). Teardown stops the stack and asserts that it exited within 20 s,
that no process of it survives (each service and all their descendants) and that its dirs are gone.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
STOP_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone: it runs nothing and holds no port)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def process_tree(roots) -> set[int]:
    """roots and all their descendants, from /proc (PostgreSQL backends are in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stack_env(ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "WMTP_"))}
    env.update(WMTP_PG_PORT=str(ports["postgres"]), WMTP_S3_PORT=str(ports["s3"]),
               WMTP_MLFLOW_PORT=str(ports["mlflow"]))
    return env


def printed_stack(lines):
    """What `./run.sh server` printed: its .env block as {key: value}, plus the pids and dirs it announced."""
    info: dict = {}
    for line in lines[lines.index("# --- .env ---") + 1: lines.index("# --- end ---")]:
        key, _, value = line.partition("=")
        info[key] = shlex.split(value)[0] if value else ""
    info["pids"] = {ln.split()[3]: int(ln.split()[4]) for ln in lines if ln.startswith("# stack: pid ")}
    info["dirs"] = [ln.split(" ", 3)[3] for ln in lines if ln.startswith("# stack: dir ")]
    return info


@contextmanager
def running_stack(stop_signal: int = signal.SIGINT, startup_timeout: float = 180.0):
    """Start `./run.sh server` in its own process group; yield its .env values, pids, dirs, ports."""
    ports = {"postgres": free_port(), "s3": free_port(), "mlflow": free_port()}
    errlog = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([str(ROOT / "run.sh"), "server"], cwd=ROOT, env=_stack_env(ports),
                            stdout=subprocess.PIPE, stderr=errlog, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("# --- end ---"):
                ready.set()
        ready.set()  # EOF: run.sh exited

    threading.Thread(target=read, daemon=True).start()

    def stop(sig: int) -> tuple[int | None, float]:
        start = time.monotonic()
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(STOP_TIMEOUT_S), time.monotonic() - start
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, time.monotonic() - start

    if not ready.wait(startup_timeout) or "# --- end ---" not in lines:
        stop(signal.SIGTERM)
        raise RuntimeError("./run.sh server did not print its .env block\nstdout:\n" + "\n".join(lines)
                           + "\nstderr:\n" + (errlog.seek(0) or errlog.read())[-4000:])

    info = {**printed_stack(lines), "ports": ports}
    try:
        yield info
    finally:
        tree = process_tree(info["pids"].values())
        rc, took = stop(stop_signal)
        deadline = time.monotonic() + 5  # backends exit right after the postmaster
        while any(process_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = sorted(p for p in tree if process_alive(p))
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        errlog.close()
        assert rc is not None, f"./run.sh server did not exit within {STOP_TIMEOUT_S} s of {stop_signal!r}"
        assert rc == 128 + stop_signal, f"./run.sh server exited {rc} after {stop_signal!r}"
        assert not survivors, f"processes of the stack survived its stop: {survivors}"
        assert not [d for d in info["dirs"] if os.path.exists(d)], "throwaway dirs left behind"
        info["stopped_in_s"] = took


@pytest.fixture(scope="module")
def tracking_stack():
    with running_stack() as info:
        yield info
