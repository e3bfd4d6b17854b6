"""Each pipeline owns its facts (issue 33, item 1): a fifth pipeline is its class in wmtp/pipelines.py and its
configs in configs/<name>/, nothing else (the README's recipe, done in a temp copy of the checkout), and no other
module keys anything on a pipeline's name (the farm of facts)."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import weighted_mtp as wm
from conftest import POLICY_CRITIC, ROOT, TINY
from wmtp.config import PIPELINES, UserError, load_config, pipeline_names
from wmtp.memplan import memory_plan, parameter_counts
from wmtp.pipelines import CONTROL_ROWS, PIPELINE_TYPES, Baseline, Critic, Rho1, Verifiable, policy_pipelines
from wmtp.pretrained import ByteTokenizer, micro_args

FIFTH = '''

class Uniform(Pipeline):
    """Every target token weighs 1, as the baseline's, under a name of its own."""
    name = "uniform"
'''


def copy_of_checkout(dest):
    """The tracked tree of the checkout (no .venv, mlruns, checkpoints or caches) copied to dest."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_a_fifth_pipeline_is_its_class_and_its_configs(tmp_path):
    """The README's recipe: one class appended to wmtp/pipelines.py and configs/uniform/uniform_local.yaml, nothing
    else. `train --dry-run` plans it (no reference, no value model: the base's rows) and one training step on the
    micro model writes its final checkpoint under the class's run name, uniform-mtp (the default <name>-mtp)."""
    tree = copy_of_checkout(tmp_path / "tree")
    with open(tree / "wmtp/pipelines.py", "a") as f:
        f.write(FIFTH)
    (tree / "configs/uniform").mkdir()
    (tree / "configs/uniform/uniform_local.yaml").write_text(
        "experiment:\n  name: uniform-micro\n  pipeline: uniform\n  description: every token weighs 1\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    config = ["--config", "configs/uniform/uniform_local.yaml", "--use-micro-model"]
    overrides = [f"--override={o}" for o in [*TINY, "training.max_steps=1", "training.eval_interval=1",
                                             "checkpoint.save_every=0", "mlflow.enable_logging=false",
                                             f"checkpoint.dir={tmp_path}/ckpt"]]
    dry = subprocess.run([sys.executable, "-m", "weighted_mtp", "train", *config, *overrides, "--dry-run"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = {line[1:44].strip(): line[44:].split() for line in dry.stdout.splitlines() if line.startswith("#   ")}
    assert "\n  pipeline: uniform\n" in dry.stdout
    assert "# memory plan per GPU: uniform, 4 blocks (3 heads), d=32, V=259, 0.1M parameters" in dry.stdout
    assert list(plan) == ["trainable parameters (fp32 masters)", "gradients (fp32)", "AdamW moments (2 x fp32)",
                          "bf16 autocast weight copies", "activations saved for backward",
                          "loss logits (one head at a time)", "peak", "validation: gathered weights + KV cache",
                          "setup: host RAM per rank while loading"]  # no reference, no value model: the base's rows
    assert plan["peak"] == ["20.68", "12.24"] and plan["trainable parameters (fp32 masters)"] == ["0.25", "0.25"]
    run = subprocess.run([sys.executable, "-m", "weighted_mtp", "train", *config, *overrides],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    finals = list((tmp_path / "ckpt" / "uniform-mtp").glob("*/checkpoint_final.pt"))
    assert len(finals) == 1, sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*"))
    ckpt = torch.load(finals[0], map_location="cpu", weights_only=False)
    assert ckpt["step"] == 1 and ckpt["config"]["experiment"]["pipeline"] == "uniform"


def test_the_pipelines_of_the_configs_are_the_registered_classes(tmp_path):
    """config.PIPELINES (read off configs/<name>/<name>_local.yaml) names exactly the classes; the class facts
    give the guide's run names and compare's rows; a directory without its <name>_local.yaml (configs/control/)
    names no pipeline."""
    assert PIPELINES == ("baseline", "critic", "rho1", "verifiable") and set(PIPELINE_TYPES) == set(PIPELINES)
    assert {p: k.run_name for p, k in PIPELINE_TYPES.items()} == {
        "baseline": "baseline-mtp", "critic": "critic-pretrain", "verifiable": "verifiable-wmtp",
        "rho1": "rho1-wmtp"}
    assert policy_pipelines() == ("baseline", "verifiable", "rho1")
    assert all(row.partition(":")[0] in policy_pipelines() for row in CONTROL_ROWS)
    for d, files in {"fifth": ["fifth_local.yaml"], "control": ["fifth.yaml"], "sixth": ["sixth.yaml"]}.items():
        (tmp_path / d).mkdir()
        for f in files:
            (tmp_path / d / f).write_text("{}\n")
    assert pipeline_names(tmp_path) == ("fifth",)


def test_the_trainer_and_the_memory_plan_ask_the_class():
    """FSDP's guard is the class's fsdp_refusal (a separate value model: verifiable and critic with critic.model copy,
    raised by prepare before anything is built); the memory plan's rows come from trains_policy, holds_reference
    and decodes: rho1's reference is one more frozen copy of the policy in fp32, 4 bytes a parameter."""
    copy = load_config(Verifiable.local_config(), ["critic.model=copy", "training.parallel=fsdp"])
    refusal = ("critic.model=copy with training.parallel=fsdp: a separate value model is not sharded yet; use "
               "training.parallel=ddp or critic.model=policy")
    assert Verifiable.fsdp_refusal(copy) == Critic.fsdp_refusal(copy) == refusal
    assert Baseline.fsdp_refusal(copy) is Rho1.fsdp_refusal(copy) is None
    assert Verifiable.fsdp_refusal(load_config(Verifiable.local_config(), POLICY_CRITIC)) is None
    with pytest.raises(UserError, match=re.escape(refusal)):
        wm.prepare(copy, use_micro=True, rank=0, world=2)
    args = micro_args(load_config(Baseline.local_config(), TINY), ByteTokenizer.vocab_size)
    n = sum(parameter_counts(args, None, 0))
    base, rho1, critic = (memory_plan(args, p, device="cpu") for p in ("baseline", "rho1", "critic"))
    assert memory_plan(args, None, device="cpu") == base and base["reference"] == 0 and rho1["reference"] == 4 * n
    assert parameter_counts(args, "critic", 0) == (args.dim + 1, n)  # the value head trains, the policy is frozen
    assert critic["activations"] < base["activations"] and critic["validation"] < base["validation"]


# ------------------------------------------------------------------------------------------- the farm of facts
SOURCES = ["weighted_mtp.py", "weights.py", "s3ckpt.py", "bench.py", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "wmtp").glob("*.py") if p.name != "pipelines.py")]
SCRIPTS = ["run.sh", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.sh"))]


def docstrings(tree):
    """The Constant nodes that are docstrings (of the module, a class or a function)."""
    return {id(body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and (body := node.body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)}


def config_key_parts(tree):
    """The nodes that name config keys, not pipelines: dataclass fields (critic: CriticConfig) and a dotted key's
    short name beside it ({"critic.checkpoint": "critic"}: the tag wmtp.critic.resolved)."""
    fields = {id(n.target) for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)}
    shorts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.Dict) for k, v in zip(n.keys, n.values)
              if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str)
              and str(k.value).startswith(v.value + ".")}
    return fields | shorts


def keyed_on_names(source, names, run_names):
    """[(line, what)] where Python code keys on a pipeline's name (its experiment.pipeline value or its run name):
    - a string literal (an f-string's literal parts included; docstrings not) whose whole stripped value is a
      pipeline name or a run name, or that starts with "<name>:" followed by no space (a compare row,
      "verifiable:shuffled") or with "<run name>-" (a variant's run);
    - a variable, argument or function named exactly like a pipeline.
    Not keyed on a name: prose that mentions a pipeline ("the critic has no pass@k", a plot's title "critic: val/auc"),
    a path to one config file ("configs/baseline/warmup_local.yaml": configs/ names pipelines), and config sections,
    fixed config keys that share a pipeline's name: an attribute (cfg.critic.model), a key's dotted prefix
    ("critic.", "critic.checkpoint") and config_key_parts."""
    tree, found = ast.parse(source), []
    skip = docstrings(tree) | config_key_parts(tree)
    row = re.compile("^(" + "|".join(map(re.escape, names)) + r"):(\S|$)")
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if (text in names or text in run_names or row.match(text)
                    or text.startswith(tuple(f"{r}-" for r in run_names))):
                found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Name) and node.id in names:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.arg) and node.arg in names:
            found.append((node.lineno, node.arg))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            found.append((node.lineno, node.name))
    return found


def shell_words_naming(text, names):
    """[(line, word)] of a shell script's code (comment lines, the usage text, skipped) where a word, split at
    anything but letters, digits and _ . / : -, is exactly a pipeline name: a list of pipelines (`for p in a b`)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("#"):
            found += [(n, w) for w in re.findall(r"[\w./:-]+", line.split(" # ")[0]) if w in names]
    return found


def test_no_module_but_pipelines_py_keys_on_a_pipeline_name():
    names, run_names = set(PIPELINE_TYPES), {k.run_name for k in PIPELINE_TYPES.values()}
    code = ('def f(cfg, rho1):\n    """critic"""\n    return cfg.critic.model == "critic" or f"rho1-wmtp-{x}" or '
            '"critic.model" or "configs/baseline/b.yaml" or f"critic:{v}" or "critic: val/auc" or '
            '{"critic.checkpoint": "critic"}\n')
    assert sorted(keyed_on_names(code, names, run_names)) == [(1, "rho1"), (3, "'critic'"), (3, "'critic:'"),
                                                              (3, "'rho1-wmtp-'")]
    assert shell_words_naming("# baseline critic\nfor p in baseline rho1; do\n  x configs/rho1/rho1.yaml\n", names) \
        == [(2, "baseline"), (2, "rho1")]
    found = {path: keyed_on_names((ROOT / path).read_text(), names, run_names) for path in SOURCES}
    found.update({path: shell_words_naming((ROOT / path).read_text(), names) for path in SCRIPTS})
    assert {path: hits for path, hits in found.items() if hits} == {}
