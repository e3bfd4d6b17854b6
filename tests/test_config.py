"""Config loading: defaults <- pipeline file <- overrides, and one clear error naming the key for bad input."""
import dataclasses
import operator
import subprocess
import sys

import pytest
import yaml

from wmtp.config import Config, DEFAULTS, UserError, dotted_keys, flatten, load_config
from conftest import ROOT, main_in_process

LOCAL = ROOT / "configs" / "verifiable" / "verifiable_local.yaml"


def test_layers_merge_in_order():
    cfg = load_config(LOCAL, ["training.beta=0.5", "mlflow.tags={a: b}"])
    assert cfg.experiment.pipeline == "verifiable"          # from the pipeline file
    assert cfg.training.weight_clip_max == 3.0               # from defaults
    assert cfg.training.beta == 0.5                          # from the override, YAML-typed
    assert cfg.mlflow.tags == {"a": "b"}
    assert load_config(LOCAL, ["training.learning_rate=1e-5"]).training.learning_rate == 1e-5  # YAML 1.1 '1e-5'


@pytest.mark.parametrize("override, message", [
    ("training.learnig_rate=1", "--override training.learnig_rate=1: unknown key 'training.learnig_rate' "
                                "(did you mean 'training.learning_rate'?)"),
    ("training.batch_size=eight", "'training.batch_size' must be int, got str 'eight'"),
    ("training.batch_size=true", "'training.batch_size' must be int, got bool True"),
    ("training.k_percent=1.5", "'training.k_percent' must be in (0, 1], got 1.5"),
    ("training.k_percent=0", "'training.k_percent' must be in (0, 1], got 0.0"),
    ("experiment.pipeline=ppo", "'experiment.pipeline' must be one of baseline, critic, rho1, verifiable, got 'ppo'"),
    ("training.weight_clip_min=3.0", "'training.weight_clip_min' (3.0) must be < 'training.weight_clip_max' (3.0)"),
    ("model.micro=4", "'model.micro' must be a mapping"),
    ("nonsense", "expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(LOCAL, [override])
    assert message in str(e.value)


def test_a_lora_critic_trunk_without_adapters_is_refused_by_name():
    """critic.trunk lora with critic.lora.rank 0 would divide alpha by 0 when the value model is built."""
    with pytest.raises(UserError) as e:
        load_config(LOCAL, ["critic.model=copy", "critic.features=hidden", "critic.trunk=lora", "critic.lora.rank=0"])
    assert str(e.value).endswith("'critic.trunk' lora trains adapters of 'critic.lora.rank': set it to 1 or more "
                                 "(or 'critic.trunk' frozen or full)")
    fine = ["critic.model=copy", "critic.features=hidden", "critic.trunk=lora", "critic.lora.rank=2"]
    assert load_config(LOCAL, fine).critic.lora.rank == 2


def test_unknown_key_in_file_and_yaml_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batch_sise: 4\n")
    with pytest.raises(UserError,
                       match=r"bad.yaml: unknown key 'training.batch_sise' \(did you mean 'training.batch_size'\?\)"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training:\n  batch_size: 4\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"broken.yaml:4: invalid YAML"):
        load_config(broken)


def test_every_fixed_key_overrides():
    fixed = ["experiment.name=x", "experiment.pipeline=rho1", "experiment.description=d", "model.path=/m",
             "model.tokenizer=/t", "model.n_future_tokens=2", "model.micro.dim=64", "model.lora.rank=8",
             "dataset.train=a.jsonl", "dataset.validation=b.jsonl", "dataset.max_length=64",
             "data_sampling.n_samples=10", "data_sampling.correct_ratio=0.25", "data_sampling.seed=7",
             "training.max_steps=3", "training.n_epochs=2", "training.batch_size=2",
             "training.gradient_accumulation_steps=2", "training.learning_rate=0.1", "training.max_grad_norm=0.5",
             "training.log_interval=3", "training.eval_interval=4", "training.seed=5", "training.gamma=0.9",
             "training.td_lambda=0.8", "training.beta=2.0", "training.weight_clip_min=0.2",
             "training.weight_clip_max=2.0", "training.td_ema_momentum=0.2", "training.td_ema_warmup_steps=3",
             "training.value_coef=0.1", "training.k_percent=0.3", "checkpoint.dir=/c", "checkpoint.save_every=5",
             "checkpoint.save_total_limit=1", "checkpoint.resume=auto", "mlflow.tracking_uri=http://h",
             "mlflow.experiment=e/x", "mlflow.run_name=r", "mlflow.tags={k: v}", "mlflow.s3_artifacts=s3://b/p",
             "mlflow.enable_logging=false", "critic.checkpoint=s3://b/c.pt", "reference.path=/ref"]
    cfg = load_config(LOCAL, fixed)
    for item in fixed:
        key, value = item.split("=", 1)
        assert operator.attrgetter(key)(cfg) == yaml.safe_load(value), key


def test_flatten_drops_secrets_and_json_encodes_lists():
    flat = flatten({"training": {"learning_rate": 0.1}, "x": {"db_password": "p", "aws_secret": "s", "ids": [1, 2]}})
    assert flat == {"training.learning_rate": 0.1, "x.ids": "[1, 2]"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "weighted_mtp", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_bad_override_exits_2_with_one_line():
    # in this process (train's exit 2 from a real process: test_bad_input.py)
    r = main_in_process("train", "--config", str(LOCAL), "--override", "training.k_percent=2", "--dry-run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {LOCAL}: 'training.k_percent' must be in (0, 1], got 2.0"]


def test_cli_dry_run_prints_merged_config():
    """A real process: `train --dry-run`'s exit 0 and stdout (the other dry runs: in process, test_memplan.py)."""
    r = run_cli("train", "--config", str(LOCAL), "--override", "training.beta=0.25", "--dry-run")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["training"]["beta"] == 0.25 and printed["experiment"]["pipeline"] == "verifiable"


def test_the_dataclasses_and_defaults_yaml_agree_key_for_key():
    """defaults.yaml is the one source of defaults (and comments); the Config dataclasses name the same keys, with
    each default's type."""
    def fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type):
                yield from fields(f.type, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.type

    declared = dict(fields(Config))
    assert sorted(declared) == sorted(dotted_keys(DEFAULTS))
    for key, kind in declared.items():
        assert type(operator.attrgetter(key)(load_config(LOCAL))) is kind, key


def test_a_config_is_frozen():
    cfg = load_config(LOCAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.beta = 2.0
