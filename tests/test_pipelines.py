"""Each pipeline end to end on the tiny micro model, read back from a real (sqlite) MLflow store."""
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed as dist
from mlflow import MlflowClient

import weighted_mtp as wm
from wmtp.config import UserError, load_config
from wmtp.pretrained import build_model
from wmtp.data import collate
from wmtp.parallel import Meter
from wmtp.checkpointing import load_checkpoint_into
from wmtp.pipelines import PIPELINE_TYPES
from conftest import new_store, train_keeping_setup, ROOT, TINY, tiny_config

COMMON = ["train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_sec", "val/loss",
          *[f"{split}/head_{k}_loss" for split in ("train", "val") for k in range(3)]]
EXPECTED = {
    "baseline": COMMON + ["val/accuracy", "val/pass_at_1"],  # the local configs' data: arith + pyfunc (tests)
    "critic": COMMON + ["train/value_loss", "val/explained_variance", "val/auc", "val/auc_half",
               "val/auc_logprob", "val/auc_logprob_mean"],
    "verifiable": COMMON + ["val/accuracy", "val/pass_at_1", "train/td_error_mean", "train/weight_mean",
                            "train/weight_entropy", "train/value_loss", "train/weight_min", "train/weight_max",
                            "val/token_credit", "val/weight_first_wrong", "val/weight_right",
                            "val/token_credit_logprob"],
    "rho1": COMMON + ["val/accuracy", "val/pass_at_1", "train/excess_loss_mean", "train/weight_sparsity"],
}


def only_run(client, name):
    exp = client.get_experiment_by_name("weighted-mtp/production")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1
    return runs[0]


def artifact_files(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifact_files(client, run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def test_four_pipelines_chain_and_log_everything(tracking, tmp_path):
    client = MlflowClient(tracking)
    for pipeline in ["baseline", "critic", "verifiable", "rho1"]:
        result = wm.train(tiny_config(pipeline, tmp_path), use_micro=True)
        run = only_run(client, PIPELINE_TYPES[pipeline].run_name)
        assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["pipeline"] == pipeline and run.data.tags["wmtp.steps"] == "4"
        logged = sorted(k for k in run.data.metrics if not k.startswith("system/"))
        assert logged == sorted(EXPECTED[pipeline]), pipeline
        params = run.data.params
        assert params["training.learning_rate"] == str(tiny_config(pipeline, tmp_path).training.learning_rate)
        assert params["experiment.name"] == f"{pipeline}-local" and params["experiment.pipeline"] == pipeline
        assert params["model.micro.dim"] == "32" and params["mlflow.tags.device"] == "cpu"
        assert artifact_files(client, run.info.run_id) == [
            "checkpoints/checkpoint_best.pt", "checkpoints/checkpoint_best.pt.sha256",
            "checkpoints/checkpoint_final.pt", "checkpoints/checkpoint_final.pt.sha256",
            "checkpoints/checkpoint_step_2.pt", "checkpoints/checkpoint_step_2.pt.sha256",
            "config.yaml", "logs/training.log"]
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [2, 4]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [2, 4]
        log_text = open(client.download_artifacts(run.info.run_id, "logs/training.log", str(tmp_path))).read()
        assert f"run {run.info.run_id}" in log_text and "done: 4 steps" in log_text
    # verifiable started from the critic's best checkpoint: its value head, not a fresh one
    critic = only_run(client, "critic-pretrain")
    verifiable_log = open(client.download_artifacts(only_run(client, "verifiable-wmtp").info.run_id,
                                                    "logs/training.log", str(tmp_path / "v"))).read()
    assert critic.info.run_id in verifiable_log
    # the critic started from the baseline's final weights and trained the value head only
    critic_state = torch.load(client.download_artifacts(critic.info.run_id, "checkpoints/checkpoint_final.pt",
                                                        str(tmp_path / "c")))
    baseline_final = torch.load(client.download_artifacts(only_run(client, "baseline-mtp").info.run_id,
                                                          "checkpoints/checkpoint_final.pt", str(tmp_path / "b")))
    changed = sorted(k for k, v in critic_state["model"].items() if k not in baseline_final["model"]
                     or not torch.equal(v, baseline_final["model"][k]))
    assert changed == ["value_head.bias", "value_head.weight"]


def test_verifiable_without_a_critic_says_which_pipeline_to_run_first(tracking, tmp_path):
    with pytest.raises(UserError, match="no finished run of pipeline 'critic' in experiment "
                                           "'weighted-mtp/production': run the critic pipeline first"):
        wm.train(tiny_config("verifiable", tmp_path), use_micro=True)
    exp = MlflowClient(tracking).get_experiment_by_name("weighted-mtp/production")
    assert exp is None or MlflowClient(tracking).search_runs([exp.experiment_id]) == []   # no empty run left behind


def test_baseline_loss_decreases_over_100_steps(tracking, tmp_path):
    # from random weights at the warm-up's learning rate (baseline_local's 1e-3 continues a trained start)
    cfg = tiny_config("baseline", tmp_path, "training.max_steps=100", "training.log_interval=10",
                      "training.eval_interval=0", "data_sampling.n_samples=400", "checkpoint.save_every=0",
                      "training.learning_rate=3e-3")
    run_id = wm.train(cfg, use_micro=True)["run_id"]
    losses = [m.value for m in MlflowClient(tracking).get_metric_history(run_id, "train/loss")]
    assert len(losses) == 10
    assert losses[-1] < 0.6 * losses[0] and sum(losses[-3:]) < sum(losses[:3])


def test_a_diverging_run_ends_failed_with_the_error_in_its_log(tracking, tmp_path):
    cfg = tiny_config("baseline", tmp_path, "training.learning_rate=1e30", "training.max_skipped_steps=2",
                      "training.max_steps=20", "training.warmup_steps=0")
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        wm.train(cfg, use_micro=True)
    client = MlflowClient(tracking)
    run = only_run(client, "baseline-mtp")
    assert run.info.status == "FAILED"
    log_text = open(client.download_artifacts(run.info.run_id, "logs/training.log", str(tmp_path))).read()
    assert "non-finite steps in a row (training.max_skipped_steps)" in log_text and "Traceback" in log_text


@pytest.mark.parametrize("pipeline", ["baseline", "verifiable"])
def test_train_step_skips_a_non_finite_step_on_the_device(tmp_path, pipeline):
    """The step returns its [non-finite, stop] flags without a host sync; fused AdamW's found_inf leaves weights,
    moments and step count exactly as they were (and the TD-statistics EMA), the next finite step updates, and only
    finite steps are logged."""
    cfg = tiny_config(pipeline, tmp_path)
    tok, model = build_model(cfg, True, value_head=pipeline == "verifiable")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    pipe = PIPELINE_TYPES[pipeline](cfg, model.args.n_future_tokens)
    ids = list(range(65, 85))
    batch = collate([(ids, [-100] * 5 + ids[5:], 1.0, {})] * 2, tok.pad_id, torch.device("cpu"))
    meter = Meter(torch.device("cpu"))
    assert wm.train_step(pipe, model, optimizer, params, [batch], meter, 0).tolist() == [0.0, 0.0]
    moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    finite_log, ema = meter.reduce(), pipe.ema if pipeline == "verifiable" else None
    assert (ema is None) == (pipeline == "baseline")
    model.tok_embeddings.weight.data[70] = float("nan")  # token 70 is in the batch: loss and gradients go NaN
    before = [p.detach().clone() for p in params]
    assert wm.train_step(pipe, model, optimizer, params, [batch], meter, 0, stop_requested=15).tolist() == [1.0, 15.0]
    assert all(torch.equal(a.nan_to_num(), b.detach().nan_to_num()) for a, b in zip(before, params))
    for p, saved in zip(params, moments):
        assert all(torch.equal(saved[k], optimizer.state[p][k]) for k in saved) and optimizer.state[p]["step"] == 1
    assert meter.reduce() == {}  # the skipped step's loss, head losses and norm stay out of the means
    if ema is not None:
        assert torch.equal(pipe.ema["mean"], ema["mean"]) and torch.equal(pipe.ema["var"], ema["var"])
    model.tok_embeddings.weight.data[70] = 0.0
    assert wm.train_step(pipe, model, optimizer, params, [batch], meter, 0).tolist() == [0.0, 0.0]
    assert optimizer.state[params[-1]]["step"] == 2 and not torch.equal(before[-1], params[-1].detach())
    assert {"train/loss", "train/grad_norm", *[f"train/head_{k}_loss" for k in range(3)]} <= set(finite_log)
    assert finite_log["train/grad_norm"] > 0 and 0 < finite_log["train/loss"] < 10


def torchrun_trainings(tmp_path, trainings, nproc=2):
    """One `torchrun --nproc_per_node=nproc` launch (gloo) that trains each (config, overrides, tracking URI) of
    `trainings` in turn, in the launch's one process group (train() runs in a caller's group and leaves it standing: a
    second group on torchrun's store would hang, pytorch#135712) -> per training, each rank's final state dict."""
    out = tmp_path / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    runs = [(str(ROOT / config), [*TINY, f"checkpoint.dir={tmp_path}/ckpt{k}", f"mlflow.tracking_uri={uri}",
                                  *overrides]) for k, (config, overrides, uri) in enumerate(trainings)]
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch, torch.distributed as dist
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import weighted_mtp as wm
        from wmtp.config import load_config
        from conftest import train_keeping_setup
        dist.init_process_group("gloo")
        for k, (config, overrides) in enumerate({runs!r}):
            model = train_keeping_setup(load_config(config, overrides), use_micro=True)[1].model
            torch.save(model.state_dict(), f"{out}/training{{k}}-rank{{os.environ['RANK']}}.pt")
        dist.destroy_process_group()
        wm.exit_worker(0)  # as the CLI's workers leave: a gloo thread can abort Python's finalisation after DDP
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [[torch.load(out / f"training{k}-rank{r}.pt") for r in range(nproc)] for k in range(len(trainings))]


VERIFIABLE = "configs/verifiable/verifiable_local.yaml"


@pytest.fixture(scope="module")
def ddp_trained(tmp_path_factory, empty_store):
    """One 2-process launch, three verifiable trainings: accumulating over 2 micro-batches (a store of its own), then
    the memory-efficient loss and the naive one (a second store)."""
    tmp = tmp_path_factory.mktemp("ddp")
    replicas_uri, loss_uri = new_store(empty_store, tmp / "replicas"), new_store(empty_store, tmp / "loss")
    replicas, efficient, naive = torchrun_trainings(tmp, [
        (VERIFIABLE, ["critic.checkpoint=", "training.gradient_accumulation_steps=2"], replicas_uri),
        (VERIFIABLE, ["critic.checkpoint="], loss_uri),
        (VERIFIABLE, ["critic.checkpoint=", "model.memory_efficient_loss=false"], loss_uri)])
    return types.SimpleNamespace(replicas_uri=replicas_uri, replicas=replicas, efficient=efficient, naive=naive)


def test_two_process_torchrun_makes_one_run_with_identical_replicas(ddp_trained):
    a, b = ddp_trained.replicas
    run = only_run(MlflowClient(ddp_trained.replicas_uri), "verifiable-wmtp")
    assert run.info.status == "FINISHED" and run.data.tags["wmtp.steps"] == "4"
    cfg = load_config(ROOT / VERIFIABLE, TINY)
    initial = build_model(cfg, True, True)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["output.weight"], initial["output.weight"])   # they trained, identically


def test_train_in_the_callers_process_group_uses_it_and_leaves_it_to_the_caller(tmp_path):
    """A launcher or a notebook that owns the process group (here world 1 over a FileStore) runs train() in it, twice:
    train() makes no group of its own (a second init_process_group would raise) and leaves the caller's standing."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        world = dist.group.WORLD
        for k in range(2):
            cfg = tiny_config("baseline", tmp_path / f"run{k}", "mlflow.enable_logging=false",
                              "training.eval_interval=0")
            assert wm.train(cfg, use_micro=True)["steps"] == 4
            assert dist.is_initialized() and dist.group.WORLD is world
    finally:
        dist.destroy_process_group()


# The two loss paths differ only in the order of float sums (their gradients agree to 1e-6: tests/test_heads.py).
# AdamW's first steps move a weight by about lr·sign(g), so a gradient at float-noise level may move it either way:
# weights after 4 steps at lr 3e-3 may differ by up to ~1e-2 from that alone. Measured with the local configs'
# data (arith + pyfunc): <= 1e-5 in one process, 1.4e-4 under 2-process DDP (smaller per-rank batches).
WEIGHTS_TOL = {"atol": 1e-3, "rtol": 0}


def test_memory_efficient_loss_trains_like_the_naive_one_under_ddp(ddp_trained):
    efficient, naive = ddp_trained.efficient[0], ddp_trained.naive[0]
    assert sorted(efficient) == sorted(naive)
    for key in efficient:
        torch.testing.assert_close(efficient[key], naive[key], **WEIGHTS_TOL, msg=key)


@pytest.mark.parametrize("pipeline", ["baseline", "rho1"])
def test_memory_efficient_loss_trains_like_the_naive_one(tracking, tmp_path, pipeline):
    extra = ["reference.path=", "mlflow.enable_logging=false"]
    efficient = train_keeping_setup(tiny_config(pipeline, tmp_path / "a", *extra), use_micro=True)[1].model.state_dict()
    naive = train_keeping_setup(tiny_config(pipeline, tmp_path / "b", *extra, "model.memory_efficient_loss=false"),
                                use_micro=True)[1].model.state_dict()
    # AdamW divides each step by sqrt(v) + eps: where an element's gradient is near zero, the two paths' rounding
    # (1e-7 relative) becomes a step difference (measured: 1.1e-5 on one of 3072 weights after 4 steps at lr 1e-3).
    # 5e-5 is 5 % of one step; the gradients themselves are held to 1e-6 in test_heads.py.
    for key in efficient:
        torch.testing.assert_close(efficient[key], naive[key], atol=5e-5, rtol=1e-5, msg=key)


def test_lora_runs_save_only_what_they_train_and_still_chain(tracking, tmp_path):
    lora = ["model.lora.rank=2", "checkpoint.save_every=0"]
    baseline = wm.train(tiny_config("baseline", tmp_path, *lora), use_micro=True)
    final = torch.load(next((tmp_path / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt")))
    assert final["model_partial"] and final["model"] and all(".lora_" in k for k in final["model"])
    # rho1's reference (auto = that baseline) is the base plus the saved adapters: not the untouched base
    rho1 = wm.train(tiny_config("rho1", tmp_path, *lora), use_micro=True)
    assert rho1["run_id"] != baseline["run_id"] and rho1["steps"] == 4
    reference = build_model(tiny_config("rho1", tmp_path, *lora), True, False)[1]
    load_checkpoint_into(reference, next((tmp_path / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt")))
    key = "layers.0.attention.wq.lora_b"
    assert torch.equal(reference.state_dict()[key], final["model"][key]) and final["model"][key].abs().sum() > 0


def test_system_metrics_reach_the_run(tracking, tmp_path):
    cfg = tiny_config("baseline", tmp_path, "mlflow.system_metrics_interval_s=1", "training.max_steps=40",
                      "data_sampling.n_samples=200", "checkpoint.save_every=0")
    run_id = wm.train(cfg, use_micro=True)["run_id"]
    metrics = MlflowClient(tracking).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and metrics["system/system_memory_usage_megabytes"] > 0


@pytest.mark.parametrize("exists", [False, True], ids=["created", "found-untagged"])
def test_the_experiment_is_marked_for_model_development(tracking, tmp_path, exists):
    """MLflow 3's UI opens an experiment without mlflow.experimentKind as a GenAI one (an empty Traces page): the
    trainer sets it when it creates the experiment or first uses one that lacks it."""
    client = MlflowClient(tracking)
    if exists:
        client.create_experiment("weighted-mtp/production", artifact_location=(tmp_path / "artifacts").as_uri())
    wm.train(tiny_config("baseline", tmp_path, "training.max_steps=2", "checkpoint.save_every=0"))
    tags = client.get_experiment_by_name("weighted-mtp/production").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
