"""
Config: configs/defaults.yaml <- the pipeline's file <- --override a.b=c, every key checked against the defaults,
then typed into frozen dataclasses. defaults.yaml is the one source of defaults and comments; the dataclasses name
the keys, their types and their ranges (tests/test_config.py checks that the two agree key for key).

Also the names every other module agrees on (pipelines, templates, dtypes) and UserError, the one
exception that reaches the user as a single line. Imports nothing of the project's.
"""
import contextlib
import dataclasses
import difflib
import json
import os
import sys
from pathlib import Path
import re

import yaml


ROOT = Path(__file__).resolve().parent.parent  # the checkout (this file is wmtp/config.py)
# configs/ beside the package (a checkout, an editable install), else where `pip install .` put it (pyproject.toml's
# data-files: <venv>/share/weighted-mtp/configs)
CONFIGS = next((d for d in (ROOT / "configs", Path(sys.prefix) / "share" / "weighted-mtp" / "configs")
                if (d / "defaults.yaml").is_file()), ROOT / "configs")


# Secrets are known by name, never by a substring ("token" is in model.n_future_tokens, model.tokenizer and
# eval.max_new_tokens): the credential variables, and keys whose last word names a credential (db_password, api_key).
SECRET_NAMES = frozenset({"mlflow_tracking_username", "mlflow_tracking_password", "mlflow_tracking_token",
                          "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                          "mlflow_auth_admin_password", "mlflow_flask_server_secret_key", "hf_token"})
SECRET_LAST_WORDS = ("password", "passwd", "secret", "token", "api_key", "access_key", "secret_key", "credentials")


def is_secret(key):
    """True for a credential variable's name or a key whose last word names a credential (db_password, api_token);
    False for n_future_tokens, tokenizer, max_new_tokens."""
    key = str(key).lower()
    return key in SECRET_NAMES or key in SECRET_LAST_WORDS or key.endswith(tuple("_" + w for w in SECRET_LAST_WORDS))


def without_userinfo(value):
    """A URI's user:password@ removed (http://u:p@host -> http://host): a tracking URI may carry its login."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1", value) if isinstance(value, str) else value


def pipeline_names(configs):
    """The pipelines, sorted: each directory configs/<name>/ that holds <name>_local.yaml. Read off the disk because
    config.py is below pipelines.py (it cannot ask PIPELINE_TYPES, and a registry filled by pipelines.py would be
    empty whenever that module is not yet imported); configs/control/, which holds other pipelines' configs, is none.
    tests/test_fifth_pipeline.py checks that these are the names of pipelines.PIPELINE_TYPES."""
    return tuple(sorted(d.name for d in configs.iterdir() if (d / f"{d.name}_local.yaml").is_file()))


PIPELINES = pipeline_names(CONFIGS)


# The other names every module agrees on, as literals here so that config.py imports nothing of the project's.
SANDBOXES = ("bwrap", "uid", "none")  # eval.sandbox: how generated code runs (sandbox.py)


TEMPLATE_NAMES = ("alpaca", "plain", "chat")


DTYPE_NAMES = ("float32", "bfloat16")


def tracking_uri(configured=""):
    """Where MLflow is: mlflow.tracking_uri when set, else $MLFLOW_TRACKING_URI, else ./mlflow.db (embedded)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class UserError(Exception):
    """Bad input (config, data, checkpoint): reported as one line, exit code 2, before any training."""


def read_yaml(path):
    """The YAML mapping in the file at `path` ({} for an empty file); an unreadable file, invalid YAML (with its line)
    or a top level that is not a mapping is a UserError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})")
    except ValueError as e:  # PyYAML's constructors, e.g. an impossible date such as 2001-13-45
        raise UserError(f"{path}: invalid YAML ({e})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections")
    return data


def dotted_keys(tree, prefix=""):
    """Yields the leaf keys of a nested dict as dotted paths ({'a': {'b': 1}} -> 'a.b'); an empty dict is a leaf."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def checked_value(value, default, key, source):
    """The value, coerced to the default's type; a wrong type is an error naming the key."""
    kind = type(default)
    if kind is str and value is None:
        return ""
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if default == "auto" and isinstance(value, AUTO_OR.get(key, ())):
        return value  # the key's own rule checks it
    raise UserError(f"{source}: '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}")


# keys whose default is `auto` and which also take a value of another type
AUTO_OR = {"eval.speculative": bool, "eval.stop": list}


def merge(base, update, source, defaults, prefix=""):
    """Writes `update` into `base` in place, each value type-checked against `defaults` (checked_value); an unknown key
    (with the closest known one as a hint) or a value where a section belongs is a UserError naming `source`."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(dotted, list(dotted_keys(DEFAULTS)), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{source}: unknown key {dotted!r}{hint}")
        if isinstance(defaults[key], dict) and defaults[key]:
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            merge(base[key], value, source, defaults[key], dotted + ".")
        else:
            base[key] = checked_value(value, defaults[key], dotted, source)


def parse_override(text):
    """'a.b=c' -> {'a': {'b': c}}, c read as YAML (the string itself where it is not YAML, '' when empty), ready for
    merge(); text without '=' or a key is a UserError."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--override {text}: expected key=value, e.g. training.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, ValueError):  # not YAML (or an impossible date): the string it is
        value = raw
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def rule(ok, what):
    """A field whose value must satisfy ok(value); `what` (or what()) completes "must be ..." in the error."""
    return dataclasses.field(metadata={"ok": ok, "what": what})


ONE_OR_MORE, NON_NEGATIVE, POSITIVE = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0"), (lambda v: v > 0, "> 0")


FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")


frozen = dataclasses.dataclass(frozen=True)


@frozen
class ExperimentConfig:
    """The `experiment` section: the run's name, its pipeline (one of PIPELINES) and a free-text description."""
    name: str
    pipeline: str = rule(lambda v: v in PIPELINES, lambda: "one of " + ", ".join(PIPELINES))
    description: str


@frozen
class MicroConfig:
    """`model.micro`: the shape of the small random-init model that --use-micro-model builds."""
    dim: int = rule(lambda v: v >= 2, ">= 2")
    n_trunk_layers: int = rule(lambda v: v >= 1, ">= 1 (a shared trunk)")
    n_heads: int = rule(*ONE_OR_MORE)
    n_kv_heads: int = rule(*ONE_OR_MORE)
    multiple_of: int = rule(*ONE_OR_MORE)
    norm_eps: float = rule(*POSITIVE)
    rope_theta: float
    vocab_size: int = rule(*NON_NEGATIVE)

    def check(self, source):
        """Raises UserError unless dim splits into n_heads heads of even size (RoPE rotates pairs) and n_heads is a
        multiple of n_kv_heads (grouped-query attention)."""
        if self.dim % (2 * self.n_heads) or self.n_heads % self.n_kv_heads:
            raise UserError(f"{source}: 'model.micro.dim' ({self.dim}) must split into 'model.micro.n_heads' "
                            f"({self.n_heads}) heads of even size, and n_heads be a multiple of n_kv_heads "
                            f"({self.n_kv_heads})")


@frozen
class LoraConfig:
    """A LoRA section (model.lora; critic.lora for critic.trunk lora): adapters of `rank` whose update is scaled by
    alpha / rank; model.lora.rank 0 = no adapters."""
    rank: int = rule(*NON_NEGATIVE)
    alpha: float = rule(*POSITIVE)


@frozen
class ModelConfig:
    """The `model` section: which weights and tokenizer, H = n_future_tokens heads, the frozen weights' dtype, the micro
    model, LoRA, the starting checkpoint (init_from) and the loss and compile switches."""
    path: str
    tokenizer: str
    n_future_tokens: int = rule(*ONE_OR_MORE)
    dtype: str = rule(lambda v: v in DTYPE_NAMES, " or ".join(DTYPE_NAMES))
    micro: MicroConfig
    lora: LoraConfig
    init_from: str
    memory_efficient_loss: bool
    compile: bool


@frozen
class DatasetConfig:
    """The `dataset` section: the train and validation sources, max_length in tokens, what to do with a longer example,
    and the prompt template."""
    train: str
    validation: str
    max_length: int = rule(lambda v: v >= 8, ">= 8")
    on_overlong: str = rule(lambda v: v in ("truncate", "skip", "error"), "truncate, skip or error")
    template: str = rule(lambda v: v in TEMPLATE_NAMES, " or ".join(TEMPLATE_NAMES))


@frozen
class DataSamplingConfig:
    """The `data_sampling` section: how many training examples (0 = all) at which share of right answers, and how many
    validation examples, drawn with `seed`."""
    n_samples: int = rule(*NON_NEGATIVE)
    correct_ratio: float = rule(*FRACTION)
    seed: int
    val_samples: int = rule(*ONE_OR_MORE)


@frozen
class TrainingConfig:
    """The `training` section: the schedule and optimizer, the weighting's hyperparameters (γ, λ, β, clip range, EMA,
    k_percent), parallelism and the heads' loss weights λ_k with their warm-up."""
    max_steps: int = rule(*NON_NEGATIVE)
    n_epochs: int = rule(*ONE_OR_MORE)
    batch_size: int = rule(*ONE_OR_MORE)
    group_by_length: bool
    gradient_accumulation_steps: int = rule(*ONE_OR_MORE)
    learning_rate: float = rule(*POSITIVE)
    weight_decay: float = rule(*NON_NEGATIVE)
    warmup_steps: int = rule(*NON_NEGATIVE)
    min_lr_ratio: float = rule(*FRACTION)
    max_grad_norm: float = rule(*POSITIVE)
    log_interval: int = rule(*ONE_OR_MORE)
    eval_interval: int = rule(*NON_NEGATIVE)
    seed: int
    max_skipped_steps: int = rule(*ONE_OR_MORE)
    collective_timeout_s: int
    gamma: float = rule(*FRACTION)
    td_lambda: float = rule(*FRACTION)
    critic_lambda: float = rule(*FRACTION)
    beta: float = rule(*POSITIVE)
    weight_clip_min: float = rule(*NON_NEGATIVE)
    weight_clip_max: float
    td_ema_momentum: float = rule(lambda v: 0 < v <= 1, "in (0, 1]")
    td_ema_warmup_steps: int = rule(*NON_NEGATIVE)
    value_coef: float = rule(*NON_NEGATIVE)
    k_percent: float = rule(lambda v: 0 < v <= 1, "in (0, 1]")
    policy_on_incorrect: bool
    parallel: str = rule(lambda v: v in ("ddp", "fsdp"), "ddp or fsdp")
    activation_checkpointing: bool
    weight_control: str = rule(lambda v: v in ("none", "shuffled"), "none or shuffled")
    head_loss_weights: list = rule(lambda v: all(type(x) in (int, float) and x >= 0 for x in v) and v[:1] != [0],
                                   "[], a decay [r] or one weight per head: numbers >= 0, head 0's > 0")
    new_heads_warmup_steps: int = rule(*NON_NEGATIVE)
    head_0_max_rise: float = rule(*NON_NEGATIVE)
    head_0_on_rise: str = rule(lambda v: v in ("warn", "stop"), "warn or stop")

    def check(self, source):
        """Raises UserError unless weight_clip_min < weight_clip_max."""
        if self.weight_clip_min >= self.weight_clip_max:
            raise UserError(f"{source}: 'training.weight_clip_min' ({self.weight_clip_min}) must be < "
                            f"'training.weight_clip_max' ({self.weight_clip_max})")


@frozen
class CheckpointConfig:
    """The `checkpoint` section: where and how often checkpoints are written, how many are kept, the resume choice, the
    upload's limits, the preemption grace and the format (full or sharded)."""
    dir: str
    save_every: int = rule(*NON_NEGATIVE)
    save_total_limit: int = rule(*NON_NEGATIVE)
    resume: str
    upload_retry_budget_s: int
    verify_etag: bool
    upload_timeout_s: int
    preempt_grace_s: int
    format: str = rule(lambda v: v in ("full", "sharded"), "full or sharded")


@frozen
class MlflowConfig:
    """The `mlflow` section: the tracking server and experiment, the run's name and tags, the S3 artifact root, whether
    to log at all and how often to sample system metrics."""
    tracking_uri: str
    experiment: str
    run_name: str
    tags: dict
    s3_artifacts: str
    enable_logging: bool
    system_metrics_interval_s: int


@frozen
class CriticConfig:
    """The `critic` section: the trained critic that verifiable reads (checkpoint) and the value model's make: on the
    policy, a copy of it or a model dir, its trunk, head, features and loss."""
    checkpoint: str
    model: str = rule(bool, "policy, copy or a model directory")
    trunk: str = rule(lambda v: v in ("frozen", "lora", "full"), "frozen, lora or full")
    lora: LoraConfig
    head: str = rule(lambda v: v in ("linear", "mlp"), "linear or mlp")
    features: str = rule(lambda v: v in ("hidden", "hidden+logprob"), "hidden or hidden+logprob")
    loss: str = rule(lambda v: v in ("mse", "bce", "pairwise"), "mse, bce or pairwise")
    shuffle_labels: bool

    def check(self, source):
        """Raises UserError for a make only a separate value model has (head mlp, hidden+logprob, a lora or full trunk,
        loss bce or pairwise) on critic.model policy, for hidden+logprob other than on a frozen copy, and for a lora
        trunk without adapters (critic.lora.rank 0: alpha / rank has no value)."""
        separate = self.model != "policy"
        if not separate and (self.head, self.features, self.trunk, self.loss) != ("linear", "hidden", "frozen", "mse"):
            raise UserError(f"{source}: 'critic.head' {self.head}, 'critic.features' {self.features}, 'critic.trunk' "
                            f"{self.trunk} and 'critic.loss' {self.loss} need a separate value model ('critic.model': "
                            "copy or a model directory); on the policy the value head is linear, mse, frozen trunk")
        if self.features == "hidden+logprob" and (self.model != "copy" or self.trunk != "frozen"):
            raise UserError(f"{source}: 'critic.features' hidden+logprob reads the starting policy's "
                            "log-probabilities off a frozen copy of it: set 'critic.model' copy and 'critic.trunk' "
                            f"frozen (got {self.model!r}, {self.trunk!r})")
        if self.trunk == "lora" and self.lora.rank == 0:
            raise UserError(f"{source}: 'critic.trunk' lora trains adapters of 'critic.lora.rank': set it to 1 or more "
                            "(or 'critic.trunk' frozen or full)")


@frozen
class ReferenceConfig:
    """The `reference` section: rho1's frozen next-token model (a checkpoint, a model dir, auto, or empty for a copy of
    the starting policy)."""
    path: str


@frozen
class EvalConfig:
    """The `eval` section: pass@k's tasks, sampling, sandbox and stop strings (python -m weighted_mtp evaluate and
    sample)."""
    dataset: str
    max_tasks: int = rule(*NON_NEGATIVE)
    n_samples: int = rule(*ONE_OR_MORE)
    temperature: float = rule(*POSITIVE)
    top_p: float = rule(lambda v: 0 < v <= 1, "in (0, 1]")
    max_new_tokens: int = rule(*ONE_OR_MORE)
    batch_size: int = rule(*ONE_OR_MORE)
    seed: int
    k: list = rule(lambda v: bool(v) and all(type(k) is int and k >= 1 for k in v), "a list of whole numbers >= 1")
    timeout_s: float = rule(*POSITIVE)
    memory_mb: int = rule(lambda v: v >= 64, ">= 64")
    workers: int = rule(*NON_NEGATIVE)
    sandbox: str = rule(lambda v: v in SANDBOXES, "bwrap, uid or none")
    speculative: str = rule(lambda v: v in ("auto", True, False), "auto, true or false")  # or a bool: AUTO_OR
    prompt: str = rule(lambda v: v in ("completion", "chat"), "completion or chat")
    stop: str = rule(lambda v: v == "auto" or isinstance(v, list) and all(isinstance(s, str) and s for s in v),
                     "auto or a list of non-empty strings")  # or a list: AUTO_OR


@frozen
class Config:
    """The whole typed config (load_config, config_from_dict): one frozen section per top-level key of defaults.yaml."""
    experiment: ExperimentConfig
    model: ModelConfig
    dataset: DatasetConfig
    data_sampling: DataSamplingConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    mlflow: MlflowConfig
    critic: CriticConfig
    reference: ReferenceConfig
    eval: EvalConfig

    def to_dict(self):
        """The config as a plain nested dict of defaults.yaml's shape, secrets included (redacted() or flatten() before
        it is shown or logged)."""
        return dataclasses.asdict(self)


def typed(cls, tree, source, prefix=""):
    """The merged tree as a frozen `cls`, every field's rule checked (in field order), then the section's own check."""
    values = {}
    for f in dataclasses.fields(cls):
        value = tree[f.name]
        if dataclasses.is_dataclass(f.type):
            value = typed(f.type, value, source, f"{prefix}{f.name}.")
        elif "ok" in f.metadata and not f.metadata["ok"](value):
            what = f.metadata["what"]() if callable(f.metadata["what"]) else f.metadata["what"]
            raise UserError(f"{source}: '{prefix}{f.name}' must be {what}, got {value!r}")
        values[f.name] = value
    section = cls(**values)
    if hasattr(section, "check"):
        section.check(source)
    return section


def load_config(path, overrides=()):
    """defaults.yaml <- the pipeline file <- WMTP_SANDBOX (eval.sandbox, for a machine) <- overrides, as a frozen
    Config; raises UserError naming the file and key on bad input."""
    tree = json.loads(json.dumps(DEFAULTS))
    merge(tree, read_yaml(path), str(path), DEFAULTS)
    machine = os.environ.get("WMTP_SANDBOX", "").strip()
    if machine and machine not in SANDBOXES:
        raise UserError(f"WMTP_SANDBOX must be {', '.join(SANDBOXES)}; got {machine!r}")
    if machine:
        tree["eval"]["sandbox"] = machine
    for text in overrides:
        merge(tree, parse_override(text), f"--override {text}", DEFAULTS)
    return typed(Config, tree, str(path))


def config_from_dict(tree, source):
    """A Config from a plain tree such as a checkpoint's "config": keys added since it was written get defaults."""
    merged = json.loads(json.dumps(DEFAULTS))
    merge(merged, tree, source, DEFAULTS)
    return typed(Config, merged, source)


DEFAULTS = read_yaml(CONFIGS / "defaults.yaml")


def flatten(tree, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}; lists as JSON; secret keys (is_secret) dropped, URIs without their login."""
    flat = {}
    for key, value in redacted(tree).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def redacted(tree):
    """The tree without its secret keys (is_secret) and with every URI's user:password@ removed."""
    return {k: redacted(v) if isinstance(v, dict) else without_userinfo(v) for k, v in tree.items() if not is_secret(k)}


def cli(doc):
    """The CLI's argument parser (here, below torch: `--help` and usage errors need no heavy import); doc is the
    trainer's docstring. train and evaluate share the config arguments and --dry-run."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m weighted_mtp", description=doc.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", required=True)
    config.add_argument("--use-micro-model", action="store_true", help="the small random-init CPU model, bytes")
    config.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    config.add_argument("--dry-run", action="store_true",
                        help="print the merged config, the memory plan per GPU and the paths it reads; run nothing")
    config.add_argument("--nproc", type=int, help="--dry-run: processes in the launch (default: $WORLD_SIZE, else 1)")
    config.add_argument("--gpu-memory-gb", type=float, help="--dry-run: say whether the plan fits GPUs this big")
    config.add_argument("--verbose", action="store_true", help="also MLflow's own log lines and download bars")
    p = sub.add_parser("train", parents=[config], help="train one pipeline")
    p.add_argument("--resume", nargs="?", const="auto", help="PATH, URI or auto (default when given without a value)")
    e = sub.add_parser("evaluate", parents=[config],
                       help="pass@k of a checkpoint's completions (or of --samples) by running them")
    e.add_argument("--checkpoint", default="auto", help="PATH, s3://..., runs:/<id>/..., auto (default: the newest "
                   "finished run of the config's pipeline) or none (the config's model as it is)")
    e.add_argument("--samples", help="score these {task_id, completion} JSONL lines instead of generating")
    e.add_argument("--json", help="also write the summary here")
    s = sub.add_parser("sample", parents=[config], help="the policy's own answers to eval.dataset's tasks, graded "
                       "in the sandbox, as training JSONL (eval.n_samples per task, at eval.temperature)")
    s.add_argument("--checkpoint", default="auto", help="PATH, s3://..., runs:/<id>/..., auto (default: the newest "
                   "finished run of the config's pipeline) or none (the config's model as it is)")
    s.add_argument("--out", required=True, help="the JSONL file to write (atomically: all of it or nothing)")
    d = sub.add_parser("doctor", help="check .env, tracking server, credentials, experiment and S3 bucket")
    d.add_argument("--config", default=str(CONFIGS / "defaults.yaml"))
    d.add_argument("--env-file", default=".env")
    d.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    x = sub.add_parser("export", help="write a trained policy as a Hugging Face or Meta model directory")
    x.add_argument("--checkpoint", required=True, help="a trainer checkpoint: path, s3:// or runs:/ URI")
    x.add_argument("--format", required=True, choices=("hf", "meta"))
    x.add_argument("--out", required=True, help="a new directory")
    x.add_argument("--config", default="", help="the run's config, instead of the one stored in the checkpoint")
    x.add_argument("--use-micro-model", action="store_true", help="the checkpoint is a LoRA run of the micro model")
    c = sub.add_parser("compare", help="the policy pipelines from one warm-up over seeds: mean ± 95 %% intervals")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--warmup-steps", type=int, default=0,
                   help="the shared warm-up's steps (default: those of its config, warmup_local.yaml)")
    c.add_argument("--pipelines", default="", help="comma-separated policy pipelines and <pipeline>:<variant> rows "
                   "(default: every pipeline that trains the policy; with --control: the positive control's rows)")
    c.add_argument("--control", action="store_true", help="the positive control (configs/control/): token weighting "
                   "that must help by construction, to show the harness can see an effect")
    c.add_argument("--gold", action="store_true", help="the critic and verifiable train on the built-ins' written "
                   "right and wrong answers instead of the warm-up's own sampled ones")
    c.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    c.add_argument("--verbose", action="store_true", help="also MLflow's own log lines and download bars")
    r = sub.add_parser("report", help="table of the newest run of each pipeline")
    r.add_argument("--experiment", default=DEFAULTS["mlflow"]["experiment"])
    r.add_argument("--tracking-uri", default="")
    r.add_argument("--all", action="store_true", help="every run of the experiment, newest first")
    sub.add_parser("ls", help="every config under configs/ with its pipeline and description")
    u = sub.add_parser("ui-url", help="the URL of the experiment's training-runs view in the MLflow UI")
    u.add_argument("--experiment", default=DEFAULTS["mlflow"]["experiment"])
    u.add_argument("--tracking-uri", default="")
    return parser
