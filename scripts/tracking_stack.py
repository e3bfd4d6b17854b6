"""`./run.sh server`: PostgreSQL + S3 + an MLflow tracking server with basic auth, in the foreground until Ctrl-C.

run.sh bootstraps the venv with the test extras (moto, psycopg2, mlflow[auth]) and execs this file with the venv's
Python. It reads the environment only, not .env (that is the client's file; it may point at a previous server):

    WMTP_PG_PORT, WMTP_S3_PORT, WMTP_MLFLOW_PORT  ports (default: free ones)
    WMTP_MLFLOW_HOST                              MLflow's bind address (default 127.0.0.1)
    WMTP_PG_DATA                                  persistent PostgreSQL data dir (default: a throwaway one)
    MLFLOW_AUTH_ADMIN_PASSWORD                    the admin's password (default: generated, kept in WMTP_PG_DATA)
    MLFLOW_S3_ENDPOINT_URL + AWS_* keys           an existing S3 (bucket wmtp) instead of a local moto server
    AWS_DEFAULT_REGION                            default us-east-1

stdout: `# stack: dir|pid ...` lines (the tests read them), then the client's .env lines between `# --- .env ---`
and `# --- end ---`. SIGINT (Ctrl-C) or SIGTERM stops the services newest first (PostgreSQL with SIGINT, its fast
shutdown), each as a whole process group, and removes the throwaway dirs: exit 130 or 143. A service that exits
on its own is an error: everything stops, exit 1.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import psycopg2

BIN = Path(sys.executable).parent  # the venv's bin: moto_server, mlflow
STOP_WAIT_S = 15                   # per service, before SIGKILL


def note(msg: str) -> None:
    print(f"run.sh: {msg}", file=sys.stderr, flush=True)


def die(msg: str):
    note(msg)
    raise SystemExit(1)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def tail(path: Path, n: int) -> str:
    try:
        return " ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def env_line(key: str, value: str) -> str:
    """KEY=value as a line that a shell (and run.sh's `set -a; . ./.env`) reads back unchanged."""
    if re.fullmatch(r"[A-Za-z0-9_./:@%+=,-]*", value):
        return f"{key}={value}"
    return f"{key}='" + value.replace("'", "'\\''") + "'"


def find_pg_bin() -> Path | None:
    """The directory of initdb/postgres: from PATH, else the newest /usr/lib/postgresql/<version>/bin (Debian)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = glob.glob("/usr/lib/postgresql/*/bin")
    for d in sorted(dirs, key=lambda d: [int(x) for x in re.findall(r"\d+", d)], reverse=True):
        if os.access(f"{d}/initdb", os.X_OK):
            return Path(d)
    return None


def pg_account() -> pwd.struct_passwd | None:
    """The unprivileged account for initdb and postgres when we are root (both refuse to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    die("running as root and neither a 'postgres' nor a 'nobody' account exists for PostgreSQL")


def as_account(account: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run the child as account (with its own groups), or as ourselves."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid,
            "extra_groups": os.getgrouplist(account.pw_name, account.pw_gid)}


def wait_http(url: str, seconds: float, proc: subprocess.Popen) -> bool:
    """True once url answers 200; False when proc exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return True
        except Exception:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def stop_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal proc's process group, SIGKILL it after STOP_WAIT_S, reap proc."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already
    try:
        proc.wait(STOP_WAIT_S)
        return
    except subprocess.TimeoutExpired:
        note(f"{proc.pid} did not stop after {signal.Signals(sig).name[3:]}, killing it")
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Stack:
    """The services started so far (newest last) and the dirs to remove; stop() undoes both."""

    def __init__(self):
        self.services: list[tuple[str, subprocess.Popen]] = []
        self.dirs: list[Path] = []

    def tempdir(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix))  # mode 0700
        self.dirs.append(path)
        return path

    def spawn(self, name: str, log: Path, cmd: list, env=None, account=None) -> subprocess.Popen:
        """Start cmd in a session (so a process group) of its own, output to log."""
        with open(log, "w") as out:
            proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    **as_account(account))
        self.services.append((name, proc))
        return proc

    def stop(self) -> None:
        for name, proc in reversed(self.services):
            stop_group(proc, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def start_postgres(stack: Stack, pgbin: Path, state: Path, pgroot: Path, port: str, account) -> Path:
    """postgres on 127.0.0.1:port with the databases mlflow and mlflow_auth (user wmtp, trust); its data dir."""
    persistent = bool(os.environ.get("WMTP_PG_DATA"))
    data = Path(os.environ["WMTP_PG_DATA"]) if persistent else pgroot / "data"
    if persistent:
        data.mkdir(parents=True, exist_ok=True)
        if account and not (data / "PG_VERSION").exists():
            os.chown(data, account.pw_uid, account.pw_gid)
        data.chmod(0o700)
    if not (data / "PG_VERSION").exists():
        log = state / "initdb.log"
        cmd = [pgbin / "initdb", "-D", data, "--auth=trust", "-U", "wmtp"] + ([] if persistent else ["--no-sync"])
        with open(log, "w") as out:
            done = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, **as_account(account))
        if done.returncode != 0:
            die(f"initdb failed ({tail(log, 3)})")
    flags = ["-D", data, "-h", "127.0.0.1", "-p", port, "-k", pgroot / "sock"]
    if not persistent:  # throwaway data: durability buys nothing
        flags += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    log = state / "postgres.log"
    proc = stack.spawn("postgres", log, [pgbin / "postgres", *flags], account=account)
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="wmtp", dbname="postgres", connect_timeout=2)
            break
        except psycopg2.OperationalError:
            if proc.poll() is not None:
                die(f"postgres exited: {tail(log, 5)}")
            if time.monotonic() > deadline:
                die(f"postgres not ready after 30 s (log: {log})")
            time.sleep(0.1)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with conn.cursor() as cur:
        for db in ("mlflow", "mlflow_auth"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {db}")
    conn.close()
    print(f"# stack: pid postgres {proc.pid}")
    return data


def start_s3(stack: Stack, state: Path) -> dict[str, str]:
    """MLFLOW_S3_ENDPOINT_URL with its keys when set, else a local moto server with bucket wmtp; the client's keys."""
    region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        url = os.environ["MLFLOW_S3_ENDPOINT_URL"]
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if not key or not secret:
            die("MLFLOW_S3_ENDPOINT_URL is set, so the server needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for it")
        note(f"using the S3 endpoint {url} (bucket wmtp must exist)")
        return {"MLFLOW_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": region}
    url = f"http://127.0.0.1:{os.environ.get('WMTP_S3_PORT') or free_port()}"
    key = os.environ.get("AWS_ACCESS_KEY_ID") or "wmtp-local"
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or new_secret()
    log = state / "s3.log"
    proc = stack.spawn("s3", log, [BIN / "moto_server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]])
    if not wait_http(f"{url}/", 30, proc):
        die(f"moto_server did not start: {tail(log, 5)}")
    where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        boto3.client("s3", endpoint_url=url, region_name=region, aws_access_key_id=key,
                     aws_secret_access_key=secret).create_bucket(Bucket="wmtp", **where)
    except Exception:
        die(f"could not create bucket wmtp on {url}")
    print(f"# stack: pid s3 {proc.pid}")
    return {"MLFLOW_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": region}


def admin_password(pwfile: Path | None) -> str:
    """MLFLOW_AUTH_ADMIN_PASSWORD, else the one remembered in pwfile, else a new one (remembered there)."""
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if pwfile and not password and pwfile.exists():
        password = pwfile.read_text().rstrip("\n")  # the auth db keeps the first admin password it saw
    password = password or new_secret()
    if len(password) < 12:
        die("MLFLOW_AUTH_ADMIN_PASSWORD must be at least 12 characters")
    if pwfile:
        with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(password + "\n")
    return password


def start_mlflow(stack: Stack, state: Path, pg_port: str, s3: dict, password: str) -> str:
    """mlflow server --app-name basic-auth on PostgreSQL, artifacts straight to s3://wmtp; its URL for clients."""
    host, port = os.environ.get("WMTP_MLFLOW_HOST") or "127.0.0.1", os.environ.get("WMTP_MLFLOW_PORT") or free_port()
    (state / "auth.ini").write_text(f"""[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://wmtp@127.0.0.1:{pg_port}/mlflow_auth
admin_username = wmtp_admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
""")
    env = {**os.environ, **s3, "MLFLOW_AUTH_CONFIG_PATH": str(state / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": new_secret(),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [BIN / "mlflow", "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"postgresql+psycopg2://wmtp@127.0.0.1:{pg_port}/mlflow",
           "--default-artifact-root", "s3://wmtp/mlflow-artifacts", "--no-serve-artifacts",
           "--host", host, "--port", port, "--workers", "1"]
    log = state / "mlflow.log"
    proc = stack.spawn("mlflow", log, cmd, env=env)
    if not wait_http(f"http://127.0.0.1:{port}/health", 120, proc):
        die(f"mlflow server did not start: {tail(log, 8)}")
    print(f"# stack: pid mlflow {proc.pid}")
    return f"http://127.0.0.1:{port}" if host == "127.0.0.1" else f"http://{socket.getfqdn()}:{port}"


def serve(stack: Stack) -> None:
    pgbin = find_pg_bin() or die("PostgreSQL not found (initdb): apt-get install -y postgresql")
    account = pg_account()
    pg_port = os.environ.get("WMTP_PG_PORT") or free_port()
    state = stack.tempdir("wmtp-server.")   # ours only: auth.ini, logs
    pgroot = stack.tempdir("wmtp-pg.")      # the PostgreSQL account's: its socket, throwaway data
    (pgroot / "sock").mkdir()
    if account:
        for path in (pgroot, pgroot / "sock"):
            os.chown(path, account.pw_uid, account.pw_gid)
    print(f"# stack: dir {state}")
    print(f"# stack: dir {pgroot}")
    data = start_postgres(stack, pgbin, state, pgroot, pg_port, account)
    s3 = start_s3(stack, state)
    password = admin_password(data / "wmtp-admin-password" if os.environ.get("WMTP_PG_DATA") else None)
    url = start_mlflow(stack, state, pg_port, s3, password)
    print("# --- .env ---")
    for key, value in {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "wmtp_admin",
                       "MLFLOW_TRACKING_PASSWORD": password, **s3}.items():
        print(env_line(key, value))
    print("# --- end ---")
    note(f"tracking server ready at {url} (logs in {state}); Ctrl-C stops it")
    # Returns when a service exits, which is an error (a signal raises SystemExit out of it). WNOWAIT: Popen reaps.
    os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
    logs = " ".join(f"==> {log.name} <== {tail(log, 5)}" for log in sorted(state.glob("*.log")))
    die(f"a service of the stack exited unexpectedly (logs in {state}, removed on exit): {logs}")


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # the caller reads the .env block through a pipe
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack, rc = Stack(), 0
    try:
        serve(stack)
    except SystemExit as e:
        rc = e.code
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    if rc not in (0, 130, 143):
        note(f"server stopped (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
