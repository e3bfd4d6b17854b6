"""Every bad input is one line `error: ...` on stderr and exit code 2, before any training: no MLflow run, no
checkpoint left behind. Plus a hypothesis fuzz of the JSONL reader and the config loader: they return or raise
UserError, nothing else.

Most cases call weighted_mtp.main([...]) in-process (the CLI exactly, without a 3 s interpreter start); two run
`python -m weighted_mtp` for real to pin the process's own exit code and stderr.
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import weighted_mtp as wm
from wmtp.config import DEFAULTS, PIPELINES, UserError, dotted_keys, load_config
from wmtp.model import MTPTransformer
from wmtp.pretrained import micro_args, model_args_from_meta, save_meta
from wmtp.data import read_jsonl
from conftest import load_meta_weights, main_in_process, ROOT, TINY

BASELINE = str(ROOT / "configs" / "baseline" / "baseline_local.yaml")
VERIFIABLE = str(ROOT / "configs" / "verifiable" / "verifiable_local.yaml")
OK = {"instruction": "Say it.", "output": "ok"}             # 1 + 147 prompt bytes + 2 + EOS = 151 tokens
LONG = {"instruction": "Say it.", "output": "x" * 100}      # 249 tokens
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))  # its caches too stay out of the repo
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def write_jsonl(path, *lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_names(db):
    """Runs in the sqlite store, read with sqlite3 (an MlflowClient would create the store it looks at)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        if not con.execute("select name from sqlite_master where name = 'runs'").fetchall():
            return []
        return [r[0] for r in con.execute("select name from runs")]


def nothing_left(tmp_path):
    assert run_names(tmp_path / "mlflow.db") == []
    ckpt = tmp_path / "ckpt"
    assert not ckpt.exists() or [p for p in ckpt.rglob("*") if p.is_file()] == []


@pytest.fixture
def cli(tracking, tmp_path, capsys):
    """cli(*overrides, config=, micro=) -> (exit code, stderr) of `train` with the tiny overrides and a tmp
    checkpoint.dir, in the tmp MLflow store."""
    def run(*overrides, config=BASELINE, micro=True):
        argv = ["train", "--config", str(config)] + (["--use-micro-model"] if micro else [])
        # the Alpaca prompt: the token counts these tests work with (the local configs use the short plain one)
        for o in [*TINY, "dataset.template=alpaca", f"checkpoint.dir={tmp_path}/ckpt", *overrides]:
            argv += ["--override", o]
        capsys.readouterr()
        code = wm.main(argv)
        return code, capsys.readouterr().err
    return run


def rejected(cli, tmp_path, message, *overrides, **kw):
    code, err = cli(*overrides, **kw)
    assert (code, err) == (2, f"error: {message}\n")
    nothing_left(tmp_path)


# -----------------------------------------------------------------------------
# data


def test_a_jsonl_line_that_is_not_json_names_file_and_line(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", OK, "not json", OK)
    rejected(cli, tmp_path, f"{data}:2: not valid JSON (Expecting value)",
             f"dataset.train={data}", f"dataset.validation={data}")


def test_a_jsonl_line_without_output(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", OK, OK, {"instruction": "Say it."})
    rejected(cli, tmp_path, f"{data}:3: missing 'output' (a string)",
             f"dataset.train={data}", f"dataset.validation={data}")


def test_a_jsonl_line_that_is_not_an_object(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", OK, "[1, 2]")
    rejected(cli, tmp_path, f"{data}:2: expected a JSON object", f"dataset.train={data}")


def test_a_dataset_left_empty_by_the_length_filter(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", LONG, LONG, LONG)
    rejected(cli, tmp_path, f"{data}: no examples left after sampling and dataset.max_length filtering",
             f"dataset.train={data}", f"dataset.validation={data}", "dataset.max_length=200",
             "dataset.on_overlong=skip")


def test_an_overlong_sequence_with_on_overlong_error_names_file_and_line(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", OK, LONG, OK, OK)
    rejected(cli, tmp_path, f"{data}:2: sequence of 249 tokens exceeds dataset.max_length=200",
             f"dataset.train={data}", f"dataset.validation={data}", "dataset.max_length=200",
             "dataset.on_overlong=error")


def test_overlong_sequences_are_truncated_and_counted_not_rejected(cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", *[LONG] * 3, *[OK] * 5)
    val = write_jsonl(tmp_path / "val.jsonl", *[OK] * 8)
    code, err = cli(f"dataset.train={train}", f"dataset.validation={val}", "dataset.max_length=200",
                    "dataset.on_overlong=truncate", "training.max_steps=1", "mlflow.enable_logging=false")
    assert (code, err) == (0, "")
    (log,) = (tmp_path / "ckpt" / "baseline-mtp").glob("local-*/training.log")
    assert ", 8 train / 8 val examples (3 truncated), 1 steps" in log.read_text()


# -----------------------------------------------------------------------------
# config


def test_an_unknown_key_names_the_nearest_known_one(cli, tmp_path):
    rejected(cli, tmp_path, "--override training.learning_rat=0.1: unknown key 'training.learning_rat' "
                            "(did you mean 'training.learning_rate'?)", "training.learning_rat=0.1")


def test_an_unknown_key_in_a_config_file(cli, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("experiment: {pipeline: baseline}\ntraining: {max_step: 3}\n")
    rejected(cli, tmp_path, f"{config}: unknown key 'training.max_step' (did you mean 'training.max_steps'?)",
             config=config)


def test_an_unknown_pipeline(cli, tmp_path):
    rejected(cli, tmp_path, f"{BASELINE}: 'experiment.pipeline' must be one of baseline, critic, rho1, verifiable, "
                            "got 'ppo'", "experiment.pipeline=ppo")


def test_a_wrong_type_names_the_key(cli, tmp_path):
    rejected(cli, tmp_path, "--override training.batch_size=four: 'training.batch_size' must be int, got str 'four'",
             "training.batch_size=four")


@pytest.mark.parametrize("value, shown", [("0", "0.0"), ("1.5", "1.5"), ("-0.1", "-0.1")])
def test_k_percent_outside_0_1(cli, tmp_path, value, shown):
    rejected(cli, tmp_path, f"{BASELINE}: 'training.k_percent' must be in (0, 1], got {shown}",
             f"training.k_percent={value}")


@pytest.mark.parametrize("lo, hi", [("3.0", "3.0"), ("2.0", "0.5")])
def test_weight_clip_min_not_below_max(cli, tmp_path, lo, hi):
    rejected(cli, tmp_path, f"{BASELINE}: 'training.weight_clip_min' ({float(lo)}) must be < "
                            f"'training.weight_clip_max' ({float(hi)})",
             f"training.weight_clip_min={lo}", f"training.weight_clip_max={hi}")


def test_the_process_itself_exits_2_with_one_line(tracking, tmp_path):
    """The real CLI process: exit status 2 and exactly one line on stderr, for a data error (read after the config
    was loaded and checked); the same for a config error in this process (a real process costs seconds)."""
    data = write_jsonl(tmp_path / "d.jsonl", OK, "{", OK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking}
    base = ["train", "--config", BASELINE, "--use-micro-model", "--override", f"checkpoint.dir={tmp_path}/ckpt"]
    cases = [(main_in_process, ["--override", "training.max_stpes=3"],
              "error: --override training.max_stpes=3: unknown key 'training.max_stpes' (did you mean "
              "'training.max_steps'?)\n"),
             (None, ["--override", f"dataset.train={data}"],
              f"error: {data}:2: not valid JSON (Expecting property name enclosed in double quotes)\n")]
    for in_process, extra, message in cases:
        if in_process:
            r = in_process(*base, *extra, cwd=tmp_path)
        else:
            r = subprocess.run([sys.executable, "-m", "weighted_mtp", *base, *extra], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr, r.stdout) == (2, message, "")
    nothing_left(tmp_path)


# -----------------------------------------------------------------------------
# checkpoints and model files


@pytest.fixture(scope="module")
def critic_ckpt(tmp_path_factory):
    """checkpoint_final.pt (+ .sha256) of a 2-step tiny critic (dim 32), trained without MLflow."""
    d = tmp_path_factory.mktemp("critic")
    cfg = load_config(ROOT / "configs" / "critic" / "critic_local.yaml",
                         [*TINY, "training.max_steps=2", "checkpoint.save_every=0", "mlflow.enable_logging=false",
                          "model.init_from=", f"checkpoint.dir={d}"])  # a random trunk: no baseline run needed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d}/unused.db")  # never the repo's mlflow.db
        wm.train(cfg, use_micro=True)
    (path,) = d.glob("critic-pretrain/local-*/checkpoint_final.pt")
    assert Path(f"{path}.sha256").is_file()
    return path


def copy_checkpoint(src, dst):
    shutil.copy(src, dst)
    shutil.copy(f"{src}.sha256", f"{dst}.sha256")
    return dst


def test_a_critic_checkpoint_from_another_model_size(cli, tmp_path, critic_ckpt):
    ckpt = copy_checkpoint(critic_ckpt, tmp_path / "critic.pt")
    rejected(cli, tmp_path, f"{ckpt}: does not match the model (shape ['tok_embeddings.weight (259, 32) != (259, 64)', "
                            "'layers.0.attention.wq.weight (32, 32) != (64, 64)']) — another model size?",
             "model.micro.dim=64", f"critic.checkpoint={ckpt}", config=VERIFIABLE)


def test_the_right_critic_checkpoint_is_accepted(cli, tmp_path, critic_ckpt):
    """The control for the three rejections around it: the same file, unharmed, trains."""
    ckpt = copy_checkpoint(critic_ckpt, tmp_path / "critic.pt")
    code, err = cli(f"critic.checkpoint={ckpt}", "training.max_steps=1", "mlflow.enable_logging=false",
                    config=VERIFIABLE)
    assert (code, err) == (0, "")


def test_a_corrupted_critic_checkpoint_fails_its_checksum(cli, tmp_path, critic_ckpt):
    ckpt = copy_checkpoint(critic_ckpt, tmp_path / "critic.pt")
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    rejected(cli, tmp_path, f"{ckpt}: checksum mismatch (corrupted or truncated)",
             f"critic.checkpoint={ckpt}", config=VERIFIABLE)


def test_a_truncated_critic_checkpoint_fails_its_checksum(cli, tmp_path, critic_ckpt):
    ckpt = copy_checkpoint(critic_ckpt, tmp_path / "critic.pt")
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    rejected(cli, tmp_path, f"{ckpt}: checksum mismatch (corrupted or truncated)",
             f"critic.checkpoint={ckpt}", config=VERIFIABLE)


def meta_dir(tmp_path):
    """A Meta-format dir (params.json + consolidated.pth) of the tiny micro model."""
    cfg = load_config(BASELINE, TINY)
    out = tmp_path / "meta"
    save_meta(MTPTransformer(micro_args(cfg, 259)), out)
    return out


def load_meta(model_dir):
    model = MTPTransformer(model_args_from_meta(model_dir))
    load_meta_weights(model, model_dir)
    return model


def test_meta_weights_that_do_not_match_params_json(tmp_path):
    d = meta_dir(tmp_path)
    load_meta(d)  # the untouched dir loads
    where = f"{d / 'consolidated.pth'} (vs params.json): does not match the model"
    state = torch.load(d / "consolidated.pth")
    torch.save({k: v for k, v in state.items() if k != "norm.weight"}, d / "consolidated.pth")
    with pytest.raises(UserError) as e:
        load_meta(d)
    assert str(e.value) == f"{where} (missing ['norm.weight']) — another model size?"

    torch.save(state, d / "consolidated.pth")
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "n_layers": params["n_layers"] + 1}))
    with pytest.raises(UserError) as e:
        load_meta(d)
    assert str(e.value) == (f"{where} (missing ['layers.2.attention.wq.weight', 'layers.2.attention.wk.weight', "
                            "'layers.2.attention.wv.weight']) — another model size?")

    (d / "params.json").write_text(json.dumps({**params, "dim": 64}))
    with pytest.raises(UserError) as e:
        load_meta(d)
    assert str(e.value) == (f"{where} (shape ['tok_embeddings.weight (259, 32) != (259, 64)', "
                            "'layers.0.attention.wq.weight (32, 32) != (64, 64)']) — another model size?")


def test_a_meta_model_without_its_tokenizer(cli, tmp_path):
    d = meta_dir(tmp_path)
    rejected(cli, tmp_path, f"model.tokenizer: {tmp_path / 'missing.model'} does not exist",
             f"model.path={d}", f"model.tokenizer={tmp_path / 'missing.model'}", micro=False)


def test_a_meta_model_whose_tokenizer_dir_has_no_tokenizer_model(cli, tmp_path):
    d = meta_dir(tmp_path)
    rejected(cli, tmp_path, f"model.tokenizer: {d} has no tokenizer.model or tokenizer.json (set model.tokenizer)",
             f"model.path={d}", micro=False)


@pytest.mark.skipif(__import__("importlib").util.find_spec("sentencepiece") is not None,
                    reason="sentencepiece is installed: the missing-package message cannot happen")
def test_a_meta_model_without_sentencepiece_installed(cli, tmp_path):
    d = meta_dir(tmp_path)
    (d / "tokenizer.model").write_bytes(b"\x00" * 16)
    rejected(cli, tmp_path, f"model.tokenizer: {d / 'tokenizer.model'} needs the sentencepiece package "
                            "(pip install sentencepiece)", f"model.path={d}", micro=False)


# -----------------------------------------------------------------------------
# bugs found by the fuzzers below, pinned as plain examples


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, char):
    record = {"instruction": f"a{char}b", "output": "c"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(path) == [{**record, "_source": f"{path}:1"}]


def test_a_deeply_nested_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", "[" * 100_000)
    with pytest.raises(UserError) as e:
        read_jsonl(path)
    assert str(e.value) == f"{path}:1: not valid JSON (nested too deeply)"


def test_an_override_that_looks_like_an_impossible_date(tmp_path):
    cfg = load_config(BASELINE, ["experiment.name=2001-13-45"])
    assert cfg.experiment.name == "2001-13-45"


def test_a_config_file_with_an_impossible_date(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("experiment: {name: 2001-13-45}\n")
    with pytest.raises(UserError) as e:
        load_config(config)
    assert str(e.value) == f"{config}: invalid YAML (month must be in 1..12)"


def test_an_integer_too_large_for_a_float_key(tmp_path):
    big = "1" + "0" * 309
    with pytest.raises(UserError) as e:
        load_config(BASELINE, [f"training.learning_rate={big}"])
    assert str(e.value) == \
        f"--override training.learning_rate={big}: 'training.learning_rate' must be float, got int {big}"


def test_a_key_with_a_newline_is_still_a_one_line_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"experiment": {"\n": None}}))
    with pytest.raises(UserError) as e:
        load_config(config)
    assert str(e.value) == f"{config}: unknown key 'experiment.\\n' (did you mean 'experiment.name'?)"


# -----------------------------------------------------------------------------
# fuzz: the JSONL reader and the config loader never raise anything but UserError

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # what UTF-8 can hold
scalar = st.none() | st.booleans() | st.integers() | st.floats() | text
json_value = st.recursive(scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
                          max_leaves=8)
record = st.fixed_dictionaries({}, optional={"instruction": text | json_value, "output": text | json_value,
                                             "input": text | json_value, "is_correct": st.booleans() | json_value,
                                             "task_id": text, "metadata": json_value})
line = text | record.map(lambda r: json.dumps(r, ensure_ascii=False)) | json_value.map(json.dumps)


def read_or_user_error(path):
    try:
        records = read_jsonl(path)
    except UserError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e)
        return None
    assert all(isinstance(r, dict) and isinstance(r["output"], str) and isinstance(r["instruction"], str)
               for r in records)
    return records


@FUZZ
@given(lines=st.lists(line, max_size=6))
def test_fuzz_jsonl_text_lines(lines):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "d.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        read_or_user_error(path)


@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b'{"instruction": "a", "output": "\xff"}\n')
def test_fuzz_jsonl_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "d.jsonl"
        path.write_bytes(data)
        read_or_user_error(path)


# raw separators excluded: see test_jsonl_strings_may_hold_unicode_line_separators
plain = st.text(st.characters(blacklist_categories=("Cs",),
                              blacklist_characters="\x85\u2028\u2029"), max_size=30)


@FUZZ
@given(records=st.lists(st.fixed_dictionaries({"instruction": plain, "output": plain},
                                              optional={"input": plain, "is_correct": st.booleans()}), max_size=5))
def test_fuzz_jsonl_round_trip(records):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "d.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        assert read_jsonl(path) == [{**r, "_source": f"{path}:{i}"} for i, r in enumerate(records, 1)]


def typed(default):
    """Values of the default's own type (so the fuzz gets past the type check) mixed with anything."""
    if isinstance(default, bool):
        own = st.booleans()
    elif isinstance(default, int):
        own = st.integers(-5, 10**6)
    elif isinstance(default, float):
        own = st.floats() | st.integers(-5, 10**6)
    elif isinstance(default, str):
        own = text | st.sampled_from(PIPELINES + ("truncate", "skip", "error", "auto", "never"))
    elif isinstance(default, dict) and default:
        own = st.fixed_dictionaries({}, optional={k: typed(v) for k, v in default.items()})
    else:
        own = st.dictionaries(text, scalar, max_size=3)
    return own | json_value


config_tree = (st.fixed_dictionaries({}, optional={k: typed(v) for k, v in DEFAULTS.items()})
               | st.dictionaries(text, json_value, max_size=3) | json_value)
DOTTED = sorted(dotted_keys(DEFAULTS))
override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED) | text,
                     text | scalar.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip()))


def leaves(tree, defaults, prefix=""):
    for key, default in defaults.items():
        if isinstance(default, dict) and default:
            yield from leaves(tree[key], default, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", tree[key], default


@FUZZ
@given(tree=config_tree, overrides=st.lists(override, max_size=3))
def test_fuzz_config_files_and_overrides(tree, overrides):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
        try:
            cfg = load_config(path, overrides)
        except UserError:
            return  # (one line or not: see test_a_key_with_a_newline_is_still_a_one_line_error)
    # what it accepts has every key, each with its default's type
    for key, value, default in leaves(cfg.to_dict(), DEFAULTS):
        assert type(value) is type(default) or (isinstance(default, dict) and isinstance(value, dict)), key


@pytest.mark.parametrize("key", ["model.init_from", "critic.checkpoint"])
def test_a_sharded_checkpoint_starts_no_run_and_names_the_files_that_do(tmp_path, key):
    sharded = tmp_path / "checkpoint_step_3"   # what checkpoint.format=sharded writes: a directory with trainer.pt
    sharded.mkdir()
    (sharded / "trainer.pt").write_bytes(b"not read: refused before")
    pipeline = "baseline" if key == "model.init_from" else "verifiable"
    cfg = load_config(ROOT / "configs" / pipeline / f"{pipeline}_local.yaml",
                      [*TINY, f"checkpoint.dir={tmp_path}/ckpt", "model.init_from=", f"{key}={sharded}"])
    with pytest.raises(UserError, match=rf"^{sharded}: a sharded checkpoint \(checkpoint.format=sharded\) can only "
                                        r"resume its own run: start from that run's checkpoint_best.pt or "
                                        r"checkpoint_final.pt \(whole files\)$"):
        wm.prepare(cfg, use_micro=True)
