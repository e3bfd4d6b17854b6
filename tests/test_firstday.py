"""A researcher's first day: where each run started (read back from MLflow), links that open MLflow's
model-training view, a terminal with one line per event (under a real pty), the listings, the README's quickstart."""
import contextlib
import fcntl
import io
import os
from pathlib import Path
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest
from mlflow import MlflowClient

import weighted_mtp as wm
from conftest import ROOT, TINY, new_store, tiny_config

# The local configs' own critic (a separate value model copied from the baseline) instead of TINY's value head.
LOCAL_CRITIC = ["critic.model=copy", "critic.head=mlp", "critic.features=hidden+logprob"]
FINAL, BEST = "checkpoints/checkpoint_final.pt", "checkpoints/checkpoint_best.pt"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, empty_store):
    """The local chain as the README runs it, one pipeline after another in one store: baseline, critic,
    verifiable, rho1, each with its config's own starts (auto). -> (store URI, {pipeline: run id}, tmp dir,
    {pipeline: what it printed})."""
    tmp = tmp_path_factory.mktemp("chain")
    uri = new_store(empty_store, tmp)
    runs, printed = {}, {}
    for pipeline in ("baseline", "critic", "verifiable", "rho1"):
        cfg = tiny_config(pipeline, tmp, *LOCAL_CRITIC, f"mlflow.tracking_uri={uri}", "checkpoint.save_every=0")
        with contextlib.redirect_stdout(io.StringIO()) as out:   # the run's closing summary
            runs[pipeline] = wm.train(cfg, use_micro=True)["run_id"]
        printed[pipeline] = out.getvalue()
    return uri, runs, tmp, printed


def test_the_local_chain_records_where_each_run_started(chain):
    uri, runs, tmp, _ = chain
    client = MlflowClient(uri)
    tags = {p: client.get_run(run_id).data.tags for p, run_id in runs.items()}
    base, critic = runs["baseline"], runs["critic"]
    resolved = {p: {k: v for k, v in t.items() if k.startswith("wmtp.") and k.split(".")[-1] in ("resolved", "run")}
                for p, t in tags.items()}
    assert resolved == {
        "baseline": {"wmtp.init_from.resolved": "random weights"},
        "critic": {"wmtp.init_from.resolved": f"runs:/{base}/{FINAL}", "wmtp.init_from.run": base},
        "verifiable": {"wmtp.init_from.resolved": f"runs:/{base}/{FINAL}", "wmtp.init_from.run": base,
                       "wmtp.critic.resolved": f"runs:/{critic}/{BEST}", "wmtp.critic.run": critic},
        "rho1": {"wmtp.init_from.resolved": "random weights",
                 "wmtp.reference.resolved": f"runs:/{base}/{FINAL}", "wmtp.reference.run": base}}
    assert tags["verifiable"]["wmtp.started_from"] == (
        f"policy from runs:/{base}/{FINAL} (model.init_from=auto); critic from runs:/{critic}/{BEST} "
        "(critic.checkpoint=auto)")
    # the params keep what the config said; the note (the runs list's Description) tells the runs apart
    assert client.get_run(runs["verifiable"]).data.params["critic.checkpoint"] == "auto"
    assert tags["rho1"]["mlflow.note.content"] == (
        f"[micro] Excess-loss top-k MTP (micro model) · policy from random weights · reference from run {base[:8]}")
    assert {t["wmtp.model"] for t in tags.values()} == {"micro"}
    # the first line of each run's log names its starts
    log_path = tmp / "ckpt" / "verifiable-wmtp" / runs["verifiable"] / "training.log"
    first = log_path.read_text().splitlines()[0]
    files = re.fullmatch(rf".* 4 steps; policy from runs:/{base}/{FINAL} \(model.init_from=auto, file (\S+)\); "
                         rf"critic from runs:/{critic}/{BEST} \(critic.checkpoint=auto, file (\S+)\)", first).groups()
    assert [Path(f).read_bytes() for f in files] == [  # the files named are the runs' own checkpoints
        (tmp / "ckpt" / name / run_id / Path(artifact).name).read_bytes()
        for name, run_id, artifact in (("baseline-mtp", base, FINAL), ("critic-pretrain", critic, BEST))]


def test_report_shows_every_run_and_where_it_started_and_links_the_training_view(chain):
    uri, runs, tmp, _ = chain
    r = subprocess.run([sys.executable, "-m", "weighted_mtp", "report", "--all", "--tracking-uri", uri], cwd=tmp,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = {line.split()[1]: line for line in lines[1:] if line.split() and line.split()[1] in runs.values()}
    assert [line.split()[0] for line in lines[1:5]] == ["rho1-wmtp", "verifiable-wmtp", "critic-pretrain",
                                                        "baseline-mtp"]   # newest first
    assert rows[runs["rho1"]].endswith(
        f"policy from random weights; reference from runs:/{runs['baseline']}/{FINAL} (reference.path=auto)")
    assert rows[runs["baseline"]].split()[2:4] == ["FINISHED", "4"]
    assert rows[runs["baseline"]].endswith("s  policy from random weights")
    exp_id = MlflowClient(uri).get_experiment_by_name("weighted-mtp/production").experiment_id
    assert lines[-1] == (f"MLflow UI: http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
                         "   (start it with ./run.sh ui)")


def test_each_continue_hint_names_the_key_the_next_pipeline_reads_and_that_key_takes_it(chain):
    uri, runs, tmp, printed = chain
    hints = {p: next(line for line in out.splitlines() if line.startswith("  continue:")) for p, out in printed.items()}
    assert hints["baseline"] == (
        f"  continue:    --override model.init_from=runs:/{runs['baseline']}/{FINAL}   (a policy or the critic starts "
        "from it; rho1's reference: reference.path; a stopped run: --resume auto)")
    assert hints["critic"] == (
        f"  continue:    --override critic.checkpoint=runs:/{runs['critic']}/{BEST}   (verifiable reads its value "
        "model from it; a stopped run: --resume auto)")
    for p in ("verifiable", "rho1"):
        assert hints[p] == (f"  continue:    --override model.init_from=runs:/{runs[p]}/{FINAL}   (a run starts from "
                            "it; a stopped run: --resume auto)")
    # the baseline's and the critic's hints, given to verifiable as printed, are what it starts from (in an
    # experiment of its own, where `auto` would find nothing: the chain's stays as the other tests read it)
    overrides = [hints["baseline"].split()[2], hints["critic"].split()[2]]
    cfg = tiny_config("verifiable", tmp, *LOCAL_CRITIC, f"mlflow.tracking_uri={uri}", "checkpoint.save_every=0",
                      "training.max_steps=1", "mlflow.experiment=hints", *overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        run_id = wm.train(cfg, use_micro=True)["run_id"]
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["wmtp.started_from"] == (f"policy from runs:/{runs['baseline']}/{FINAL}; "
                                         f"critic from runs:/{runs['critic']}/{BEST}")
    assert (tags["wmtp.init_from.run"], tags["wmtp.critic.run"]) == (runs["baseline"], runs["critic"])


def test_every_printed_link_opens_the_model_training_view():
    from wmtp.tracking import run_url, runs_view_url
    assert runs_view_url("sqlite:///x.db", "3", port=5123) == (
        "http://127.0.0.1:5123/#/experiments/3/runs?workflowType=machine_learning")
    assert run_url("https://mlflow.example/", "3", "abc") == (
        "https://mlflow.example/#/experiments/3/runs/abc?workflowType=machine_learning")


def test_a_resumed_run_records_the_checkpoint_it_resumed_from(tmp_path, tracking):
    cfg = tiny_config("baseline", tmp_path, "training.max_steps=2", "checkpoint.save_every=1")
    first = wm.train(cfg, use_micro=True)["run_id"]
    client = MlflowClient(tracking)
    client.set_terminated(first, "KILLED")   # as a preemption leaves it
    run_dir = tmp_path / "ckpt" / "baseline-mtp" / first
    (run_dir / "checkpoint_final.pt").unlink()
    newest = max(run_dir.glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime).name   # what auto resumes from
    again = wm.train(tiny_config("baseline", tmp_path, "training.max_steps=2", "checkpoint.resume=auto"),
                     use_micro=True)["run_id"]
    assert again == first
    tags = client.get_run(first).data.tags
    assert tags["wmtp.resume.resolved"] == f"runs:/{first}/checkpoints/{newest}"
    assert tags["wmtp.resume.run"] == first and tags["wmtp.init_from.resolved"] == "random weights"
    started = [line for line in (run_dir / "training.log").read_text().splitlines() if " baseline: run " in line]
    assert re.search(rf"; policy from random weights, resumed at step \d from {re.escape(str(run_dir / newest))}$",
                     started[-1]), started[-1]


def run_in_pty(argv, cwd, timeout=300, columns=100):
    """argv under a real pseudo-terminal `columns` wide (stdout and stderr both on it, as in a shell): its exit
    code and everything it wrote, \\r and escape sequences included."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": str(columns), "TERM": "xterm"}
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=30), out.decode(errors="replace")


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")
# MLflow's INFO lines (in MLflow's own format they name their logger) and the uploads' lines: --verbose only
MLFLOW_CHATTER = re.compile(r"INFO (mlflow|alembic)|system metrics|Context impl| INFO uploaded ")


def test_a_terminal_shows_no_mlflow_info_and_no_log_line_inside_a_progress_bar(tmp_path, empty_store):
    overrides = [*TINY, "training.max_steps=12", "checkpoint.save_every=1", "training.eval_interval=6",
                 f"checkpoint.dir={tmp_path}/ckpt", f"mlflow.tracking_uri={new_store(empty_store, tmp_path)}"]
    code, out = run_in_pty([sys.executable, "-m", "weighted_mtp", "train", "--config",
                            str(ROOT / "configs/baseline/baseline_local.yaml"), "--use-micro-model", "--resume", "auto",
                            *(a for o in overrides for a in ("--override", o))], tmp_path)
    assert code == 0, out[-3000:]
    assert "baseline:" in out and "/s]" in out   # a progress bar was drawn (tqdm's rate field)
    segments = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out))
    logged = [s for s in segments if LOG_LINE.search(s)]
    assert logged and all(LOG_LINE.match(s) for s in logged), [s for s in logged if not LOG_LINE.match(s)]
    assert not [s for s in segments if MLFLOW_CHATTER.search(s)]   # in our format or MLflow's own
    assert "Downloading artifacts" not in out
    first = next(s for s in logged if " baseline: run " in s)   # the first line of the run says what it found
    assert first.endswith("; policy from random weights; --resume auto found nothing to resume (no unfinished "
                          "baseline-mtp run of experiment.name 'baseline-local'): a fresh run")
    summary = out[out.index("finished baseline run"):].splitlines()
    assert summary[1].startswith("  this run:    http://127.0.0.1:5000/#/experiments/1/runs/")
    assert summary[1].split()[2].endswith("?workflowType=machine_learning")
    # the critic's `auto` fetches that baseline's checkpoint through MLflow: no download bar, no MLflow line
    code, out = run_in_pty([sys.executable, "-m", "weighted_mtp", "train", "--config",
                            str(ROOT / "configs/critic/critic_local.yaml"), "--use-micro-model",
                            *(a for o in [*overrides, "training.max_steps=2"] for a in ("--override", o))], tmp_path)
    assert code == 0 and "critic: run " in out and "model.init_from=auto" in out, out[-3000:]
    assert "Downloading artifacts" not in out and not MLFLOW_CHATTER.search(out)
    assert "%|" not in out.split("critic: run")[0]
    # --verbose brings them back: MLflow's own INFO lines (its system-metrics monitor) and each upload's line
    code, out = run_in_pty([sys.executable, "-m", "weighted_mtp", "train", "--config",
                            str(ROOT / "configs/critic/critic_local.yaml"), "--use-micro-model", "--verbose",
                            *(a for o in [*overrides, "training.max_steps=2"] for a in ("--override", o))], tmp_path)
    verbose = [s for s in re.split(r"[\r\n]", out) if LOG_LINE.match(s)]
    assert code == 0 and [s for s in verbose if s.endswith(" INFO Started monitoring system metrics.")], out[-3000:]
    assert len([s for s in verbose if " INFO uploaded " in s and "checkpoint_final.pt -> " in s]) == 1


def test_listing_configs_and_bad_compare_rows_and_the_critic_evaluate(tmp_path, capsys):
    assert wm.main(["ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["config", "pipeline", "description"]
    assert "configs/rho1/rho1_local.yaml               rho1        Excess-loss top-k MTP (micro model)" in out
    assert wm.main(["compare", "--pipelines", "baseline,rh01"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: compare: --pipelines: 'rh01' is not a row (did you mean 'rho1'?); choose among baseline, verifiable, "
        "rho1, baseline:filtered, verifiable:shuffled, verifiable:shuffled-critic")
    assert wm.main(["evaluate", "--config", str(ROOT / "configs/critic/critic_local.yaml"), "--use-micro-model"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "critic_local.yaml: the critic has no pass@k (it generates nothing): evaluate "
        "baseline, verifiable or rho1")


def test_the_readme_quickstart_is_commands_the_check_script_runs():
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("check_quickstart", ROOT / "scripts" / "check_quickstart.py")
    check = module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.quickstart_commands((ROOT / "README.md").read_text()) == [
        "./run.sh demo",
        "./run.sh baseline --local --override dataset.train=train.jsonl --override dataset.validation=valid.jsonl",
        "./run.sh evaluate baseline --local",
        "./run.sh compare --seeds 3",
        "./run.sh report --all",
        "./run.sh ui"]


def test_the_compare_plot_has_markers_the_critic_on_its_own_axes_and_a_readable_size(tmp_path, empty_store):
    import struct as st
    from wmtp.report import plot_compare
    client = MlflowClient(new_store(empty_store, tmp_path))
    exp_id = client.create_experiment("plot", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = {}
    for row, points in (("baseline", [(2, 2.5)]), ("critic", [(1, 0.25), (2, 0.2)]), ("verifiable", [(2, 2.4)])):
        run_id = client.create_run(exp_id).info.run_id
        for step, value in points:   # baseline and verifiable: one validation each, the critic two
            client.log_metric(run_id, "val/loss" if row != "critic" else "train/loss", value, step=step)
        runs[row] = run_id
    parent = client.create_run(exp_id).info.run_id
    summary = {row: {"runs": [run_id]} for row, run_id in runs.items()}
    plot_compare(client, parent, summary)
    png = Path(client.download_artifacts(parent, "compare/metrics.png", str(tmp_path)))
    assert st.unpack(">II", png.read_bytes()[16:24]) == (1200, 760)   # width, height from the PNG header
    from wmtp.report import compare_figure
    histories = {runs["baseline"]: {"val/loss": [(2, 2.5)]}, runs["verifiable"]: {"val/loss": [(2, 2.4)]},
                 runs["critic"]: {"train/loss": [(1, 0.25), (2, 0.2)]}}
    fig = compare_figure(summary, histories)
    panels = {ax.get_title(): [(line.get_label(), line.get_marker(), list(line.get_xdata())) for line in ax.lines]
              for ax in fig.axes}
    assert panels == {"policies: train/loss (CE)": [], "policies: val/loss (CE)": [("baseline", "o", [2]),
                                                                                   ("verifiable", "o", [2])],
                      "val/accuracy": [], "val/pass_at_1": [],
                      "critic: train/loss (value MSE)": [("critic", "o", [1, 2])], "critic: val/auc": []}


def test_compare_prints_one_line_per_run_then_the_table_and_the_parent_runs_link(tmp_path, capsys, empty_store):
    uri = new_store(empty_store, tmp_path)
    overrides = [a for o in [*TINY, f"checkpoint.dir={tmp_path}/ckpt", f"mlflow.tracking_uri={uri}"]
                 for a in ("--override", o)]
    assert wm.main(["compare", "--seeds", "1", "--warmup-steps", "2", "--pipelines", "baseline", *overrides]) == 0
    out = capsys.readouterr().out.splitlines()
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("weighted-mtp/production").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp_id])}
    assert sorted(runs) == ["baseline-mtp", "compare-1-seeds", "warmup"]
    assert re.fullmatch(rf"warmup +run {runs['warmup']}  2 steps in +\d+s  val/loss \d\.\d{{4}}", out[0]), out[0]
    assert re.fullmatch(rf"baseline-mtp +run {runs['baseline-mtp']}  4 steps in +\d+s  val/loss \d\.\d{{4}}", out[1])
    assert out[2] == "1 seed(s); a 2-step warm-up baseline, then 4 steps of each pipeline"
    assert out[3].split()[:3] == ["pipeline", "started", "from"] and out[4].startswith("baseline    warm-up")
    assert out[5:] == ["", f"parent run {runs['compare-1-seeds']}: http://127.0.0.1:5000/#/experiments/{exp_id}/runs/"
                           f"{runs['compare-1-seeds']}?workflowType=machine_learning   (start the UI with ./run.sh ui)"]


def test_a_demo_whose_warm_up_answers_nothing_right_says_so_in_one_line(tmp_path, capsys, empty_store):
    """The demo's critic and verifiable train on the warm-up's own graded answers: a warm-up too short to answer
    anything right is told how to go on, not that dataset.max_length left no examples."""
    import json
    from test_sample import NEVER
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(NEVER) + "\n")   # no answer passes: assert f() == 1, f returns 0
    overrides = [*TINY, f"checkpoint.dir={tmp_path}/ckpt", f"mlflow.tracking_uri={new_store(empty_store, tmp_path)}",
                 f"eval.dataset={tasks}", "eval.max_new_tokens=1", "eval.workers=1"]
    argv = ["compare", "--seeds", "1", "--warmup-steps", "2", "--pipelines", "verifiable"]
    assert wm.main([*argv, *(a for o in overrides for a in ("--override", o))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: compare: the warm-up answered none of {tasks}'s train tasks right, and critic and verifiable train "
        "on its right and wrong answers: warm up longer (--warmup-steps) or train them on the written answers (--gold)")
    assert not list((tmp_path / "ckpt").glob("critic-pretrain/*"))   # nothing trained on them


def test_a_micro_model_from_random_weights_validates_on_64_records_and_says_so(tmp_path):
    from weighted_mtp import validation_for_a_random_start
    cfg = tiny_config("baseline", tmp_path, "data_sampling.val_samples=512")
    quick, note = validation_for_a_random_start(cfg, use_micro=True)
    assert quick.data_sampling.val_samples == 64 and note == (
        " (validation on 64 of data_sampling.val_samples=512 records: from random weights)")
    trained = tiny_config("baseline", tmp_path, "data_sampling.val_samples=512",
                          "model.init_from=runs:/x/checkpoints/checkpoint_final.pt")
    for started, micro in ((trained, True), (cfg, False)):   # a trained start; a real model
        assert validation_for_a_random_start(started, micro) == (started, "")


def test_run_sh_lists_the_configs_and_passes_export_through(tmp_path):
    env = {**os.environ, "WMTP_ENV_FILE": str(tmp_path / "no.env")}
    r = subprocess.run([str(ROOT / "run.sh"), "ls"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 + len(list((ROOT / "configs").glob("*/*.yaml")))
    closed = subprocess.run(f"{sys.executable} -m weighted_mtp ls | true; echo $" + "{PIPESTATUS[0]}", shell=True,
                            executable="/bin/bash", cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (closed.stdout, closed.stderr) == ("1\n", "")  # a reader that closed early: exit 1, no traceback
    r = subprocess.run([str(ROOT / "run.sh"), "export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "hf",
                        "--out", str(tmp_path / "hf")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'none.pt'}")
    assert not (tmp_path / "hf").exists()
