"""What a new user hits first: settings that would be ignored, the record of a run (every key, no secret,
the commit), `report`, the UI's URL, the closing summary, start-up time, checkpoints stored once, export, data."""
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
from urllib.parse import urlparse

import pytest
import torch
import yaml
from mlflow import MlflowClient

import weighted_mtp as wm
from wmtp.config import DEFAULTS, UserError, dotted_keys, flatten, is_secret
from wmtp.pipelines import PIPELINE_TYPES
from s3ckpt import CheckpointError, MlflowStore, save_checkpoint
from conftest import ROOT, main_in_process, new_store, tiny_config, train_keeping_setup

SECRET = "s3cr3t-value-that-cannot-occur-by-chance"


def run_module(*args, cwd=ROOT, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "weighted_mtp", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_the_micro_model_refuses_a_model_path_it_would_ignore(tmp_path):
    r = main_in_process("train", "--config", "configs/baseline/baseline_local.yaml", "--use-micro-model",
                        "--override", "model.path=/nope/7B", "--dry-run", cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: model.path=/nope/7B would be ignored: --use-micro-model (./run.sh --local) trains the micro model; "
        "drop --local/--use-micro-model to train that model, or drop the setting"]
    with pytest.raises(UserError, match=r"^model.tokenizer=t.model would be ignored"):
        wm.train(tiny_config("baseline", tmp_path, "model.tokenizer=t.model"), use_micro=True)


def test_secrets_are_known_by_name_not_by_substring():
    for key in ("n_future_tokens", "tokenizer", "max_new_tokens", "tokens_per_sec", "secretary_count"):
        assert not is_secret(key), key
    for key in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "aws_session_token", "db_password", "api_key",
                "hf_token", "password"):
        assert is_secret(key), key
    flat = flatten({"mlflow": {"tracking_uri": "https://alice:pw@mlflow.example:443/x"}})
    assert flat == {"mlflow.tracking_uri": "https://mlflow.example:443/x"}


def test_every_key_is_recorded_no_secret_anywhere_and_the_commit_is_tagged(tracking, tmp_path, monkeypatch, capsys):
    for var in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    cfg = tiny_config("baseline", tmp_path, f"mlflow.tags={{team: wmtp, api_token: {SECRET}}}")
    run_id = wm.train(cfg, use_micro=True)["run_id"]
    client = MlflowClient(tracking)
    run = client.get_run(run_id)
    out = capsys.readouterr().out.splitlines()   # the closing summary: where everything is, how to go on
    summary = out[next(i for i, line in enumerate(out) if line.startswith(f"finished baseline run {run_id}: 4 steps")):]
    run_dir = tmp_path / "ckpt" / "baseline-mtp" / run_id
    exp_id = run.info.experiment_id
    assert summary[1:] == [
        f"  this run:    http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}"
        "?workflowType=machine_learning   (start the UI with ./run.sh ui)",
        f"  all runs:    http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning",
        f"  best:        {run_dir}/checkpoint_best.pt and runs:/{run_id}/checkpoints/checkpoint_best.pt",
        f"  final:       {run_dir}/checkpoint_final.pt and runs:/{run_id}/checkpoints/checkpoint_final.pt",
        f"  continue:    --override model.init_from=runs:/{run_id}/checkpoints/checkpoint_final.pt   "
        "(a policy or the critic starts from it; rho1's reference: reference.path; a stopped run: --resume auto)"]
    stored = Path(urlparse(run.info.artifact_uri).path) / "checkpoints" / "checkpoint_final.pt"
    assert os.path.samefile(stored, run_dir / "checkpoint_final.pt")   # one copy on disk: a hard link
    log_text = (run_dir / "training.log").read_text()   # each metric once: on the console and in training.log
    assert "4 steps; policy from random weights\n" in log_text
    assert sum(line.startswith("step 2/4 |") for line in out) == 1 and "step 2/4: train/grad_norm=" in log_text
    expected = {k for k in dotted_keys(DEFAULTS) if k != "mlflow.tags"}   # tags: one param per tag
    assert expected <= set(run.data.params)
    for key in ("model.n_future_tokens", "model.tokenizer", "eval.max_new_tokens"):
        assert key in run.data.params, key
    assert run.data.params["model.n_future_tokens"] == "3"   # TINY's head count, as it ran
    assert run.data.params["mlflow.tags.team"] == "wmtp" and "mlflow.tags.api_token" not in run.data.params
    with open(client.download_artifacts(run_id, "config.yaml", str(tmp_path))) as f:
        config_yaml = yaml.safe_load(f)
    assert {k for k in dotted_keys(config_yaml) if not k.startswith("mlflow.tags")} == {
        k for k in dotted_keys(DEFAULTS) if k != "mlflow.tags"}
    assert config_yaml["model"]["n_future_tokens"] == 3 and config_yaml["mlflow"]["tags"]["team"] == "wmtp"
    recorded = [*map(str, run.data.params.values()), *map(str, run.data.tags.values())]
    assert not any(SECRET in text for text in recorded)
    for path in tmp_path.rglob("*"):   # config.yaml, training.log, checkpoints' sidecars: nowhere on disk but the db
        if path.is_file() and path.suffix in (".yaml", ".log", ".json", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run.data.tags["mlflow.source.git.commit"] == commit.strip() and len(commit.strip()) == 40


def test_help_and_usage_errors_come_back_before_torch_is_imported():
    for args, code in ((["--help"], 0), (["train", "--bogus"], 2), (["trian"], 2)):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "weighted_mtp", *args], cwd=ROOT,
                           capture_output=True, text=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
        assert r.returncode == code and "wmtp.config" in imported and not {"torch", "mlflow", "numpy"} & imported, args


def logged_run(uri, pipeline, **metrics):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("weighted-mtp/production") or client.get_experiment(
        client.create_experiment("weighted-mtp/production"))
    exp_id = getattr(exp, "experiment_id", exp)
    run_id = client.create_run(exp_id, run_name=PIPELINE_TYPES[pipeline].run_name,
                               tags={"pipeline": pipeline, "wmtp.steps": "7"}).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key.replace("__", "/"), value, step=7)
    client.set_terminated(run_id)
    return client, exp_id, run_id


def test_report_shows_val_pass_at_1_and_refuses_an_unknown_experiment(tmp_path, empty_store):
    uri = new_store(empty_store, tmp_path)
    logged_run(uri, "baseline", val__loss=1.5, val__pass_at_1=0.25)
    logged_run(uri, "rho1", val__loss=1.25, val__pass_at_1=0.25, eval__pass_at_1=0.5)
    r = run_module("report", "--tracking-uri", uri, cwd=tmp_path)
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:-2]}
    assert r.returncode == 0 and rows["baseline-mtp"][3:7] == ["7", "1.5000", "-", "0.250"]
    assert rows["baseline-mtp"][7] == "val"
    assert rows["rho1-wmtp"][3:7] == ["7", "1.2500", "-", "0.500"]   # evaluate's pass@1 wins over validation's
    assert rows["critic-pretrain"] == ["critic-pretrain", "(no", "run)"]
    # in this process: report's exit 2 from real processes is ./run.sh report's below
    r = main_in_process("report", "--tracking-uri", uri, "--experiment", "nope", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().splitlines() == [
        f"error: report: no experiment 'nope' in {uri} (known: weighted-mtp/production, Default)"]
    env = {**os.environ, "WMTP_ENV_FILE": str(tmp_path / "no.env")}   # ./run.sh report: the same command
    r = subprocess.run([str(ROOT / "run.sh"), "report", "--tracking-uri", uri, "--experiment", "nope"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: report: no experiment 'nope' in {uri} (known: weighted-mtp/production, Default)")


def test_ui_url_opens_the_training_runs_view(tmp_path, empty_store):
    uri = new_store(empty_store, tmp_path)
    _, exp_id, _ = logged_run(uri, "baseline")
    r = run_module("ui-url", "--tracking-uri", uri, cwd=tmp_path, env={**os.environ, "PORT": "5123"})
    assert r.returncode == 0 and r.stdout == (
        f"http://127.0.0.1:5123/#/experiments/{exp_id}/runs?workflowType=machine_learning\n")
    from wmtp.tracking import runs_view_url
    assert runs_view_url("https://mlflow.example/", "7") == (
        "https://mlflow.example/#/experiments/7/runs?workflowType=machine_learning")


def test_a_local_artifact_store_links_checkpoints_checks_their_sum_and_copies_across_filesystems(tmp_path):
    save_checkpoint({"w": [1, 2, 3]}, tmp_path / "ckpt.pt")   # with its .sha256 sidecar
    store = MlflowStore((tmp_path / "artifacts").as_uri())
    assert store.put(tmp_path / "ckpt.pt", "checkpoints") == f"{(tmp_path / 'artifacts').as_uri()}/checkpoints/ckpt.pt"
    assert os.path.samefile(tmp_path / "artifacts" / "checkpoints" / "ckpt.pt", tmp_path / "ckpt.pt")
    (tmp_path / "ckpt.pt.sha256").write_text("0" * 64 + "\n")   # bytes that no longer match their checksum
    with pytest.raises(CheckpointError, match=r"ckpt.pt: its bytes do not match .*ckpt.pt.sha256$"):
        store.put(tmp_path / "ckpt.pt", "again")
    assert list((tmp_path / "artifacts" / "again").iterdir()) == []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:   # tmpfs: no hard link from /tmp, so a copy
        other = MlflowStore(Path(shm).as_uri())
        other.put(tmp_path / "ckpt.pt", "checkpoints")
        copied = Path(shm) / "checkpoints" / "ckpt.pt"
        assert copied.read_bytes() == (tmp_path / "ckpt.pt").read_bytes()
        assert not os.path.samefile(copied, tmp_path / "ckpt.pt")


def test_a_micro_export_loads_in_transformers_generates_like_the_trainer_and_follows_the_umask(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from wmtp.model import generate
    from wmtp.pretrained import ByteTokenizer, export
    cfg = tiny_config("baseline", tmp_path, "training.max_steps=2", "mlflow.enable_logging=false",
                      "checkpoint.save_every=0")
    result, setup = train_keeping_setup(cfg, use_micro=True)
    final = tmp_path / "ckpt" / "baseline-mtp" / result["run_id"] / "checkpoint_final.pt"
    old = os.umask(0o022)
    try:
        export(final, "hf", tmp_path / "hf")
    finally:
        os.umask(old)
    out = tmp_path / "hf"
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        name: "0o644" for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                   "tokenizer_config.json")}
    tok, hf = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    ids = tok("12+3\n")["input_ids"]
    assert ids == [256, *b"12+3\n"] and tok.decode(ids, skip_special_tokens=True) == "12+3\n"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    g = hf.generation_config
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (256, 257, 258)
    ours = generate(setup.model.eval(), [ids], 257, 258, 8)[0]   # greedy, up to and excluding EOS
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert theirs[:len(ours)] == ours and theirs[len(ours):len(ours) + 1] in ([], [257])
    assert tok.decode(theirs, skip_special_tokens=True) == ByteTokenizer().decode(ours)


def test_export_downloads_into_a_private_temp_dir_not_a_fixed_path_in_tmp(tracking, tmp_path, monkeypatch):
    """A runs:/ checkpoint comes down into a private temp dir, removed once loaded (no fixed paths in
    world-writable dirs): a link planted at the cache's old fixed name (<tmp>/wmtp-export-cache) redirects nothing."""
    from wmtp.pretrained import export
    cfg = tiny_config("baseline", tmp_path, "training.max_steps=2", "checkpoint.save_every=0")
    run_id = wm.train(cfg, use_micro=True)["run_id"]
    shared, victim = tmp_path / "shared-tmp", tmp_path / "victim"
    for d in (shared, victim):
        d.mkdir()
    (shared / "wmtp-export-cache").symlink_to(victim)   # another user's, in a world-writable /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    export(f"runs:/{run_id}/checkpoints/checkpoint_final.pt", "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert list(victim.iterdir()) == []
    assert [p.name for p in shared.iterdir() if p.name.startswith("wmtp-export")] == ["wmtp-export-cache"]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "3"}, {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"}]
JINJA = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_lines(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_and_chat_records_are_recognised_by_their_fields(tmp_path):
    from wmtp.data import read_jsonl
    path = write_lines(tmp_path / "mixed.jsonl", {"instruction": "Add.", "input": "1+2", "output": "3"},
                       {"prompt": "Q: 1+2\nA: ", "completion": "3"}, {"messages": CHAT}, {"text": "x", "id": 1})
    with pytest.raises(UserError) as e:
        read_jsonl(path)
    assert str(e.value) == (f"{path}:4: fits no record shape: {{instruction, input?, output}}, {{prompt, completion}} "
                            "or {messages: [{role, content}, ...]} (its keys: id, text)")
    write_lines(path, {"instruction": "Add.", "input": "1+2", "output": "3"},
                {"prompt": "Q: 1+2\nA: ", "completion": "3", "is_correct": False}, {"messages": CHAT})
    plain, prompted, chat = read_jsonl(path)
    assert (plain["output"], prompted["output"], prompted["_prompt"], chat["output"]) == ("3", "3", "Q: 1+2\nA: ", "4")
    assert prompted["is_correct"] is False and chat["messages"] == CHAT and chat["_source"] == f"{path}:3"


def test_chat_trains_on_the_assistant_turns_only_in_the_plain_fallback_and_the_models_template(tmp_path):
    from wmtp.data import chat_template, encode_records
    from wmtp.pretrained import ByteTokenizer
    tok, B, E = ByteTokenizer(), 256, 257
    chat, prompted = {"messages": CHAT}, {"prompt": "Q: 1+2\nA: ", "completion": "3", "_prompt": "Q: 1+2\nA: ",
                                          "instruction": "Q: 1+2\nA: ", "output": "3"}
    [(ids, labels, _, _), (ids2, labels2, _, _)], _ = encode_records([chat, prompted], tok, 512, "error", "x", "plain")
    assert ids == [B, *b"system: Be brief.\nuser: 1+2\nassistant: 3", E, *b"user: 2+2\nassistant: 4", E]
    assert [(t, label) for t, label in zip(ids, labels) if label != -100] == [(51, 51), (E, E), (52, 52), (E, E)]
    assert ids2 == [B, *b"Q: 1+2\nA: 3", E] and labels2 == [-100] * 11 + [ord("3"), E]   # the prompt as it is
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": JINJA}))
    assert chat_template(model_dir) == JINJA and chat_template(tmp_path) is None
    [(ids, labels, _, _)], _ = encode_records([chat], tok, 512, "error", "x", "chat", chat_template(model_dir))
    assert bytes(t for t in ids if t < 256) == (b"<|system|>Be brief.<|end|>\n<|user|>1+2<|end|>\n<|assistant|>3"
                                                b"<|end|>\n<|user|>2+2<|end|>\n<|assistant|>4<|end|>\n")
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert trained == [*b"3<|end|>\n", E, *b"4<|end|>\n", E]


def test_the_terminal_leaves_the_upload_lines_to_training_log_unless_verbose(monkeypatch):
    """console_logging: a checkpoint upload's INFO line is not shown on the terminal (training.log has it); its
    warnings are, and --verbose shows everything."""
    import logging
    from wmtp.tracking import console_logging
    for name in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_CONFIGURE_LOGGING"):
        monkeypatch.delenv(name, raising=False)
    root, uploads = logging.getLogger(), logging.getLogger("weighted_mtp.s3ckpt")
    saved = root.handlers[:], root.level
    try:
        shown = {}
        for verbose in (False, True):
            root.handlers = []
            console_logging(verbose)
            (handler,) = root.handlers
            records = [uploads.makeRecord(uploads.name, level, __file__, 1, "uploaded a -> b", (), None)
                       for level in (logging.INFO, logging.WARNING)]
            shown[verbose] = [r.levelname for r in records if handler.filter(r)]
        assert shown == {False: ["WARNING"], True: ["INFO", "WARNING"]}
    finally:
        root.handlers, root.level = saved


def test_a_checkpoint_carries_no_password_of_the_tracking_uri(tmp_path):
    """The config a checkpoint keeps (export and evaluate read it) is redacted: a tracking URI's user:password@
    does not travel with a file that is uploaded and shared."""
    import torch
    import weighted_mtp as wm
    from conftest import tiny_config
    cfg = tiny_config("baseline", tmp_path, "training.max_steps=1", "mlflow.enable_logging=false",
                      "mlflow.tracking_uri=http://alice:s3cr3t-pw@127.0.0.1:9/")
    wm.train(cfg, use_micro=True)
    (path,) = (tmp_path / "ckpt").glob("baseline-mtp/*/checkpoint_final.pt")
    assert b"s3cr3t-pw" not in path.read_bytes() and b"alice" not in path.read_bytes()
    kept = torch.load(path, weights_only=False)["config"]["mlflow"]["tracking_uri"]
    assert kept == "http://127.0.0.1:9/"
