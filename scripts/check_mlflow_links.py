"""Open the links the project prints in headless Chromium and say which MLflow view each one lands in.

    .venv/bin/python scripts/check_mlflow_links.py [OUT_DIR]     (needs chromium: apt-get install chromium)

A temporary sqlite store gets one micro-model-like run per pipeline (tags and note as the trainer writes them), an
`mlflow ui` serves it the way `./run.sh ui` does (one worker, MLflow's job runner off), and a fresh browser profile
opens: the experiment's runs view and a run's page as printed (`?workflowType=machine_learning`), and the same two
without it. For each it writes OUT_DIR/<name>.png (a screenshot) and OUT_DIR/<name>.html (the rendered DOM) and
prints one line: the view the sidebar shows (GenAI or model training) and whether the run's name and note show.
Also prints how many processes the UI started. Exit code 0 when both printed links land in the training view.
"""
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
sys.path.insert(0, str(ROOT))


def make_store(tmp):
    """A store with the experiment as the trainer creates it and one run per pipeline, tagged as the trainer tags."""
    from mlflow import MlflowClient
    from wmtp.config import load_config
    from wmtp.pipelines import PIPELINE_TYPES
    from wmtp.tracking import experiment_id
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(ROOT / "configs" / "baseline" / "baseline_local.yaml", [f"mlflow.tracking_uri={uri}"])
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg)
    runs = {}
    for pipeline, run_name in ((p, kind.run_name) for p, kind in PIPELINE_TYPES.items()):
        note = f"[micro] {pipeline} (micro model) · policy from random weights"
        run = client.create_run(exp_id, run_name=run_name, tags={"pipeline": pipeline, "mlflow.note.content": note,
                                                                 "wmtp.model": "micro"})
        client.log_metric(run.info.run_id, "train/loss", 1.0, step=1)
        client.set_terminated(run.info.run_id)
        runs[run_name] = run.info.run_id
    return uri, exp_id, runs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_in_group(pgid):
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid)


def _pgid(proc_dir):
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def browse(url, name, out, profile):
    """Headless Chromium, a fresh profile (MLflow keeps its view toggle in localStorage): a screenshot and the DOM."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    common = [chrome, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
              "--window-size=1400,900", "--virtual-time-budget=20000", "--hide-scrollbars"]
    subprocess.run([*common, f"--screenshot={out / (name + '.png')}", url], capture_output=True, timeout=180)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    (out / f"{name}.html").write_text(dom)
    return dom


def describe(dom, run_name, note):
    """(the sidebar's view, run name shown, note shown): GenAI's sidebar lists "Judges" and "Evaluation runs", the
    model-training one "Model registry"."""
    text = re.sub(r"<[^>]+>", " ", dom)
    genai, training = "Evaluation runs" in text or "Judges" in text, "Model registry" in text
    view = "GenAI" if genai and not training else "model training" if training and not genai else "unclear"
    return view, run_name in text, note in text


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "mlflow-links").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wmtp-links-"))
    uri, exp_id, runs = make_store(tmp)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PORT": str(port)}
    ui = subprocess.Popen([str(ROOT / ".venv" / "bin" / "mlflow"), "ui", "--backend-store-uri", uri, "--host",
                           "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ok = True
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        time.sleep(3)
        print(f"mlflow ui: {processes_in_group(ui.pid)} processes (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)")
        from wmtp.tracking import run_url, runs_view_url
        run_id, name = runs["verifiable-wmtp"], "verifiable-wmtp"
        note = "[micro] verifiable (micro model)"
        links = {"runs-view": runs_view_url(uri, exp_id, port), "run-page": run_url(uri, exp_id, run_id, port),
                 "runs-view-bare": f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs",
                 "run-page-bare": f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{run_id}"}
        for label, url in links.items():
            view, named, noted = describe(browse(url, label, out, tmp / f"profile-{label}"), name, note)
            print(f"{label:<15} {view:<15} run name {'shown' if named else 'absent'}, note "
                  f"{'shown' if noted else 'absent'}  {url}")
            if not label.endswith("bare"):
                ok &= view == "model training"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots and DOMs in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
