"""Run every command of the README's quickstart, as written, on a fresh clone, with the test suite's tiny settings
appended (tests/conftest.py's TINY; demo and compare: a 4-step warm-up and two tasks it answers both right and
wrong), and say which one failed.

    .venv/bin/python scripts/check_quickstart.py [--keep]

The clone is of the committed HEAD (commit first); it reuses this checkout's .venv (WMTP_VENV), so nothing is
installed. `./run.sh ui` is started, its printed link fetched, its processes counted (MLflow's job runner off),
and stopped. `train.jsonl` and `valid.jsonl`, the quickstart's "your data", are written into the clone first.
Exit code 0 when every command exits 0.
"""
import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands(readme):
    """The command lines of the bash blocks of the README's `## Quickstart` section, in order, comments dropped."""
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()
            if line.split("#", 1)[0].strip()]


def tiny_arguments(command):
    """What is appended to a quickstart command to run it in seconds: the tiny model and data sizes, 4 steps."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY
    overrides = [a for o in TINY for a in ("--override", o)]
    if command.startswith(("./run.sh demo", "./run.sh compare")):   # a 4-step warm-up answers no real task right
        return ["--warmup-steps", "4", *overrides, "--override", "eval.dataset=tasks.jsonl",
                "--override", "eval.max_new_tokens=1"]
    if command.startswith("./run.sh evaluate"):
        return [*overrides, "--override", "eval.max_tasks=4"]
    if re.match(r"\./run\.sh (baseline|critic|verifiable|rho1)\b", command):
        return overrides
    return []


# Two tasks that any one-token answer passes and fails: demo and compare train critic and verifiable on the warm-up's
# own graded answers, which must hold right and wrong ones (tests/test_sample.py's ANYTHING and NEVER).
TASKS = [{"task_id": task_id, "instruction": "say anything", "output": "",
          "metadata": {"test": f"def check(f):\n    assert f() == {value}\n", "entry_point": "f",
                       "code_prefix": "def f():\n    return 0  # "}}
         for task_id, value in (("anything", 0), ("never", 1))]


def write_data(clone):
    """The quickstart's own data: additions, right and wrong, as {instruction, output, is_correct} lines; and the
    tasks demo and compare are run with (TASKS)."""
    (clone / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    for name, numbers in (("train.jsonl", range(0, 90)), ("valid.jsonl", range(90, 110))):
        lines = [{"instruction": f"{a}+{a % 7}", "output": str(a + a % 7 + (0 if ok else 1)), "is_correct": ok}
                 for a in numbers for ok in (True, False)]
        (clone / name).write_text("".join(json.dumps(x) + "\n" for x in lines))


def processes_in_group(pgid):
    """How many processes of process group `pgid` are alive (from /proc/<pid>/stat's 5th field)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            count += int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid
        except (OSError, IndexError, ValueError):   # a process that ended meanwhile
            pass
    return count


UI_PROCESSES = 2   # mlflow ui and its one uvicorn worker; MLflow's job runner, when on, adds about ten


def run_ui(argv, clone, env):
    """./run.sh ui on a free port: its printed link fetched (HTTP 200), the processes it started counted (no more
    than UI_PROCESSES: no job runner), then its process group stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(argv, cwd=clone, env={**env, "PORT": str(port)}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stderr.readline()
        link = re.search(r"open (http://\S+)", line)
        if not link:
            return f"no link printed: {line!r}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(link.group(1).split("#")[0], timeout=5) as r:
                    status = r.status
                break
            except OSError:
                time.sleep(1)
        else:
            return "the UI never answered"
        time.sleep(5)   # MLflow's job runner, when on, starts its workers after the server answers
        processes = processes_in_group(proc.pid)
        print(f"     ./run.sh ui: {processes} processes", flush=True)
        return (f"HTTP {status}" if status != 200 else
                f"{processes} processes (more than {UI_PROCESSES}: MLflow's job runner?)" if processes > UI_PROCESSES
                else None)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main():
    commands = quickstart_commands((ROOT / "README.md").read_text())
    work = Path(tempfile.mkdtemp(prefix="wmtp-quickstart-"))
    clone = work / "weighted-mtp"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    write_data(clone)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(WMTP_VENV=str(ROOT / ".venv"), WMTP_ENV_FILE=str(work / "no.env"), OMP_NUM_THREADS="1")
    failed = 0
    for command in commands:
        argv = ["bash", "-c", command + ' "$@"', "-", *tiny_arguments(command)]
        started = time.monotonic()
        if command == "./run.sh ui":
            error = run_ui(argv, clone, env)
        else:
            r = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
            error = None if r.returncode == 0 else f"exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"
        print(f"{'ok  ' if error is None else 'FAIL'} {time.monotonic() - started:5.0f}s  {command}", flush=True)
        if error:
            print(f"     {error}")
            failed += 1
    if "--keep" not in sys.argv:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
