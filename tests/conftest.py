"""Shared helpers, shared set-up and the suite's two tiers.

Tiers (docs/testing.md): every test is in the fast tier unless SLOW below names its file or the test itself; the
collection hook marks those `slow`. `pytest --fast` (`./run.sh test --fast`) runs the fast tier only; a plain run
runs both, the fast tier first. A new test file is fast until it is listed here: the list is the one place to edit.

Guards on the suite itself: pytest-timeout gives each test a limit (FAST_TIMEOUT_S, the slow tier pyproject.toml's
`timeout`), so a hang fails with its stack; with CI=true a run that includes the fast tier fails when the fast tier
takes more than FAST_TIER_BUDGET_S (see fast_tier_seconds).

Shared set-up: one migrated MLflow sqlite store per session (empty_store) that each test copies (tracking,
new_store), instead of paying the schema migrations (seconds) in every test.

A parallel run (`pytest -n N`, what `./run.sh test` with no arguments runs): a worker takes a file's run of tests at a
time (pytest_xdist_make_scheduler), with cpu_count // N threads, and an ALONE test has the machine to itself
(machine_share).
"""
import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

_STARTED = time.monotonic()   # before torch's import: the fast tier's wall time counts the imports too
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # set in the workers of a parallel run (-n N)
if WORKERS > 1:   # each worker its share of the cores, inherited by its torchrun ranks: none waits on a spinning one
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------- tiers
# What makes a test slow: a real torchrun, the tracking stack (PostgreSQL + mlflow server), a moto S3 server with a
# training run behind it, the bench, a pip install, uid-switching sandbox runs, training curves of tens of steps.
# A whole file: its name. One test of an otherwise fast file: "file::test" (the function's name, every
# parametrization). And every test that starts moto's S3 server (SLOW_FIXTURES). test_tiers.py checks that every
# name here still exists.
SLOW = {
    # every test in these files
    "test_packaging.py",                # a venv and a pip install of the checkout
    "test_stack.py",                    # PostgreSQL + moto + mlflow server with basic auth
    "test_tracking_stack_training.py",  # training against that stack
    "test_reliability.py",              # torchrun: SIGTERM to every process, elastic restarts, crashes, NaN
    "test_s3_training.py",              # training runs against moto S3 behind a slow / failing proxy
    "test_fsdp.py", "test_fsdp_memory.py", "test_fsdp_nodes.py", "test_fsdp_shards.py",   # torchrun, FSDP2
    "test_fsdp_launch.py",              # ./run.sh --fsdp: a real trainer dry run per pipeline
    "test_sandbox_hostile.py",          # hostile programs as root and as a throwaway uid, under every isolation
    # single tests of fast files
    "test_bench.py::test_bench_quick_reports_every_figure",   # bench.py --quick: every figure runs (~1 min)
    "test_bench.py::test_bench_only_runs_the_chosen_figures_and_keeps_the_others",
    "test_pipelines.py::test_four_pipelines_chain_and_log_everything",
    "test_pipelines.py::test_baseline_loss_decreases_over_100_steps",
    "test_pipelines.py::test_two_process_torchrun_makes_one_run_with_identical_replicas",
    "test_pipelines.py::test_memory_efficient_loss_trains_like_the_naive_one_under_ddp",
    "test_pipelines.py::test_memory_efficient_loss_trains_like_the_naive_one",    # four trainings
    "test_pipelines.py::test_lora_runs_save_only_what_they_train_and_still_chain",
    "test_pipelines.py::test_system_metrics_reach_the_run",                       # 40 steps for the metrics thread
    "test_pipelines.py::test_the_experiment_is_marked_for_model_development",
    "test_heads.py::test_two_process_ddp_gradients_equal_the_naive_paths_and_reach_the_all_reduce",
    "test_heads.py::test_twenty_step_training_curve_matches_the_naive_one",
    "test_fifth_pipeline.py::test_a_fifth_pipeline_is_its_class_and_its_configs",   # a copy of the tree, 2 launches
    "test_memplan.py::test_plan_is_within_25_percent_of_the_measured_peak",
    "test_memplan.py::test_gpu_check_cpu_dry_runs_every_step",          # every pipeline, DDP and FSDP, for real
    "test_memplan.py::test_gpu_check_stops_loudly_at_the_first_broken_step",
    "test_launch.py::test_verifiable_local_trains_with_two_cpu_processes",
    "test_launch.py::test_test_command_treats_no_tests_as_failure",   # the real ./run.sh test: install + pytest
    "test_launch.py::test_dotenv_lines_count_and_missing_one_is_named",
    "test_launch.py::test_a_dotenv_that_group_or_others_can_read_is_warned_about",
    "test_launch.py::test_dry_run_prints_the_launcher_line",          # a real trainer dry run per launch shape
    "test_results.py::test_compare_nests_every_run_under_one_parent",
    "test_results.py::test_compare_intervals_worked_by_hand_from_the_logged_values",
    "test_results.py::test_policy_pipelines_start_from_identical_weights",
    "test_results.py::test_compare_control_rows_train_the_critic_their_variant_asks_for",
    "test_results.py::test_val_pass_at_1_appears_at_each_validation_on_data_with_tests",
    "test_hf.py::test_an_hf_next_token_model_trains_as_h4_and_exports_both_ways_bit_for_bit",
    "test_hf.py::test_an_hf_reference_drives_rho1",
    "test_hf.py::test_bf16_frozen_weights_lora_base_and_reference_still_learn",
    "test_value_model.py::test_a_separate_critic_round_trips_into_a_frozen_verifiable",
    "test_benchmarks.py::test_humaneval_canonical_solutions_pass_all_164_and_max_tasks_takes_the_first_20",
    "test_evaluate.py::test_model_mode_logs_pass_at_k_on_the_evaluated_training_run",
    "test_evaluate.py::test_samples_mode_scores_known_answers_and_logs_its_own_run",  # a real evaluate process
    "test_generate.py::test_greedy_with_the_cache_equals_rerunning_the_prefix_for_a_batch_of_lengths",  # O(n^2)
    "test_generate.py::test_greedy_with_the_cache_equals_rerunning_the_prefix_under_lora",  # forwards, ~10 s each
    "test_newcomer.py::test_report_shows_val_pass_at_1_and_refuses_an_unknown_experiment",  # 2 real processes
    "test_newcomer.py::test_export_downloads_into_a_private_temp_dir_not_a_fixed_path_in_tmp",  # a tracked run
    "test_hf.py::test_a_lora_run_exports_with_its_adapters_merged",
    "test_evaluate.py::test_run_sh_evaluate_launches_the_same_command",            # run.sh, then a real evaluate
    "test_evaluate.py::test_a_completion_reading_the_environment_finds_no_secret_anywhere",
    "test_reheading.py",                # an NTP model trained 300 steps, then re-headed runs of 60: training curves
    "test_controls.py::test_compare_control_trains_floor_ceiling_weighted_and_shuffled_rows_from_the_control_configs",
    "test_controls.py::test_compare_on_policy_trains_critic_and_verifiable_on_the_warm_ups_own_graded_answers",
    "test_controls.py::test_critic_and_verifiable_log_their_no_training_baselines",
    "test_firstday.py::test_a_terminal_shows_no_mlflow_info_and_no_log_line_inside_a_progress_bar",  # a real pty run
    "test_firstday.py::test_the_local_chain_records_where_each_run_started",
    "test_firstday.py::test_each_continue_hint_names_the_key_the_next_pipeline_reads_and_that_key_takes_it",
    "test_firstday.py::test_compare_prints_one_line_per_run_then_the_table_and_the_parent_runs_link",
    "test_firstday.py::test_a_demo_whose_warm_up_answers_nothing_right_says_so_in_one_line",   # a warm-up, sampled
    "test_firstday.py::test_report_shows_every_run_and_where_it_started_and_links_the_training_view",
    "test_firstday.py::test_run_sh_lists_the_configs_and_passes_export_through",       # real run.sh processes
    "test_sandbox_closed.py::test_evaluate_on_a_machine_without_bwrap_refuses_in_one_line_or_names_the_mode_asked_for",
    "test_sample.py::test_the_trainer_reads_sampled_records_as_written",               # samples, then trains a critic
    "test_sample.py::test_run_sh_sample_reads_the_newest_finished_run_and_names_the_checkpoint_it_read",  # run.sh
    "test_firstday.py::test_a_resumed_run_records_the_checkpoint_it_resumed_from",
    "test_firstday.py::test_the_compare_plot_has_markers_the_critic_on_its_own_axes_and_a_readable_size",
    "test_tiers.py::test_a_fast_tier_over_its_budget_fails_the_run_and_names_its_slowest_tests",  # pytest in pytest
    "test_tiers.py::test_fast_leaves_out_the_slow_tier",
    "test_tiers.py::test_a_parallel_run_keeps_a_files_run_on_one_worker_and_an_alone_test_by_itself",
    # the end-to-end CLI processes (one per command and exit code): 4-5 s each of imports
    "test_newcomer.py::test_ui_url_opens_the_training_runs_view",
    "test_launch.py::test_dry_run_needs_no_credentials_and_keeps_the_users_nproc",
    "test_launch.py::test_local_needs_no_credentials",
    "test_config.py::test_cli_dry_run_prints_merged_config",
    "test_evaluate.py::test_a_task_without_tests_is_an_error_naming_its_line",
    "test_bad_input.py::test_the_process_itself_exits_2_with_one_line",
    "test_hf.py::test_the_cli_rejects_a_bad_model_dir_and_a_bad_export_in_one_line",
}
SLOW_FIXTURES = {"moto_s3", "s3_server"}   # a test that starts moto's S3 server is slow, wherever it is
# Slow tests that must have the machine to themselves in a parallel run (they run last, one at a time, while the
# other workers wait): the hostile programs' run measures the host's free memory and looks for anything a sandbox
# uid left in /tmp, which another worker's training or evaluation would move.
ALONE = {"test_sandbox_hostile.py::test_an_evaluator_run_of_hostile_programs"}
FAST_TIMEOUT_S = 300        # a fast test this long is hung (idle: seconds; a loaded 2-core machine: minutes)
FAST_TIER_BUDGET_S = 120.0  # the fast tier's whole time on an idle 2-core machine; enforced with CI=true


def is_slow(path, name, fixtures=()):
    """Whether the test function `name` of tests/<path>, which requests `fixtures`, is in the slow tier."""
    file = Path(path).name
    return file in SLOW or f"{file}::{name}" in SLOW or bool(SLOW_FIXTURES & set(fixtures))


def is_alone(path, name):
    """Whether the test function `name` of tests/<path> runs with no other test beside it (ALONE)."""
    return f"{Path(path).name}::{name}" in ALONE


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true", help="run the fast tier only (the tests not marked slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier (tests/conftest.py's SLOW): left out by --fast")
    config.addinivalue_line("markers", "alone: in a parallel run, no other test runs beside it (ALONE)")
    if config.getoption("--fast"):
        expr = config.option.markexpr
        config.option.markexpr = f"({expr}) and not slow" if expr else "not slow"


@pytest.hookimpl(tryfirst=True)   # before -m reads the marks
def pytest_collection_modifyitems(config, items):
    """Mark the slow tier, give the fast tier its timeout, and run the fast tier first (a plain run's first minutes
    answer what --fast would; the fast tier's session fixtures are charged to it), the ALONE tests last."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        slow = is_slow(item.path, name, getattr(item, "fixturenames", ()))
        if slow:
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
        if is_alone(item.path, name):
            item.add_marker(pytest.mark.alone)
    items.sort(key=lambda item: (item.get_closest_marker("slow") is not None,   # stable: file order kept in a tier
                                 item.get_closest_marker("alone") is not None))


def runs_of_one_file(nodeids):
    """{nodeid: its unit of work in a parallel run}: each run of consecutive tests of one file in the collection's
    order (the fast tier's tests of a file, its slow ones, its ALONE ones) is one unit, so that a worker builds a
    module fixture once per run of its tests, as a plain run does."""
    units, previous, n = {}, None, 0
    for nodeid in nodeids:
        file = nodeid.split("::")[0]
        n += file != previous
        units[nodeid], previous = f"{n}:{file}", file
    return units


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """A parallel run's scheduler (-n N): xdist's by scope, a scope being a run of one file's tests (runs_of_one_file),
    handed out in the collection's order, the fast tier first (a worker gets its next unit when two or fewer of
    its tests are left)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileRuns(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            if not hasattr(self, "units"):
                self.units = runs_of_one_file(next(iter(self.registered_collections.values())))
            return self.units[nodeid]

    config.option.loadscopereorder = False   # xdist would hand out the biggest units first: keep conftest's order
    return FileRuns(config, log)


@contextlib.contextmanager
def machine_share(directory, alone):
    """Hold this worker's share of the machine for one test: alone, the whole of it (once the tests running
    elsewhere end; tests started after it wait, then share it again). Two flock(2) files in `directory`, which all
    workers of a run share: a waiting `alone` test holds the turnstile, so the other workers cannot keep it
    waiting forever."""
    with open(directory / "turnstile.lock", "a") as turnstile, open(directory / "machine.lock", "a") as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(machine, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """In a parallel run's workers, each test (its fixtures' set-up and teardown included) within machine_share."""
    if WORKERS == 1:
        return (yield)
    run_dir = item.config._tmp_path_factory.getbasetemp().parent   # the controller's: one per run
    with machine_share(run_dir, alone=item.get_closest_marker("alone") is not None):
        return (yield)


# ------------------------------------------------------------------------------------- the fast tier's budget

def fast_tier_seconds(start_s, collected_s, end_s, durations):
    """The fast tier's time in this run, from `durations` {nodeid: (slow?, seconds of setup + call + teardown)}:
    with no slow test run, the wall time from conftest's import to the end (what `--fast` costs); in a run with
    slow tests too, the start-up and collection plus the fast tests' own seconds (they run first, so the session
    fixtures they use are theirs)."""
    if not any(slow for slow, _ in durations.values()):
        return end_s - start_s
    return (collected_s - start_s) + sum(seconds for slow, seconds in durations.values() if not slow)


def fast_tier_budget():
    """The budget in seconds that this run enforces, or None: WMTP_FAST_TIER_BUDGET_S when set (0: none), else
    FAST_TIER_BUDGET_S under CI=true (CI runs on an idle machine; a developer's shared one would fail at random)."""
    given = os.environ.get("WMTP_FAST_TIER_BUDGET_S")
    if given is not None:
        return float(given) or None
    return FAST_TIER_BUDGET_S if os.environ.get("CI") == "true" else None


_CLOCK = {"collected": None, "durations": {}, "verdict": None}


def pytest_collection_finish(session):
    _CLOCK["collected"] = time.monotonic()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """A parallel run's controller collects nothing itself: its collection ends when its workers' does."""
    _CLOCK["collected"] = time.monotonic()


def pytest_runtest_logreport(report):
    slow, seconds = _CLOCK["durations"].get(report.nodeid, ("slow" in report.keywords, 0.0))
    _CLOCK["durations"][report.nodeid] = (slow, seconds + report.duration)


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):   # an xdist worker: the controller, which gets every report, judges
        return
    durations = _CLOCK["durations"]
    fast = [nodeid for nodeid, (slow, _) in durations.items() if not slow]
    if not fast:
        return
    seconds = fast_tier_seconds(_STARTED, _CLOCK["collected"] or _STARTED, time.monotonic(), durations)
    budget = fast_tier_budget()
    over = budget is not None and seconds > budget
    _CLOCK["verdict"] = (len(fast), seconds, budget, over)
    if over and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _CLOCK["verdict"] is None:
        return
    n, seconds, budget, over = _CLOCK["verdict"]
    limit = f"budget {budget:.0f} s" if budget else f"budget {FAST_TIER_BUDGET_S:.0f} s, enforced with CI=true"
    terminalreporter.write_line(f"fast tier: {n} tests, {seconds:.1f} s ({limit})", red=over, bold=over)
    if over:
        slowest = sorted(((s, nodeid) for nodeid, (slow, s) in _CLOCK["durations"].items() if not slow), reverse=True)
        terminalreporter.write_line("FAILED: the fast tier is over its budget; its slowest tests (make them faster, "
                                    "or move them to the slow tier in tests/conftest.py's SLOW):", red=True)
        for s, nodeid in slowest[:10]:
            terminalreporter.write_line(f"  {s:7.2f} s  {nodeid}", red=True)


# ------------------------------------------------------------------------------------------ shared set-up

# The value head on the policy (critic.model policy, as the production configs): the local configs' separate value
# model is tested in test_value_model.py.
POLICY_CRITIC = ["critic.model=policy", "critic.head=linear", "critic.features=hidden"]
# Small enough that a pipeline runs in seconds, big enough that every code path is exercised (H=3 heads, GQA).
TINY = ["model.micro.dim=32", "model.micro.n_trunk_layers=1", "model.micro.n_heads=2", "model.micro.n_kv_heads=1",
        "model.n_future_tokens=3", "data_sampling.n_samples=64", "data_sampling.val_samples=8",
        "training.batch_size=4", "training.max_steps=4", "training.log_interval=2", "training.eval_interval=2",
        "training.warmup_steps=1", "checkpoint.save_every=2", *POLICY_CRITIC]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An empty MLflow sqlite store with every migration applied, built once per session (creating one runs the
    schema migrations: 3-11 s); tests copy it (new_store, tracking: ~0.1 s). Built in its own directory, so that
    its Default experiment's artifact location is there too, never the CWD's mlruns/."""
    from mlflow import MlflowClient
    home = tmp_path_factory.mktemp("empty-store")
    with contextlib.chdir(home):
        MlflowClient(f"sqlite:///{home}/mlflow.db").search_experiments()
    return home / "mlflow.db"


def new_store(empty_store, directory):
    """A copy of the migrated empty store as `directory`/mlflow.db; its sqlite URI."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, directory / "mlflow.db")
    return f"sqlite:///{directory}/mlflow.db"


@pytest.fixture
def tracking(empty_store, tmp_path, monkeypatch):
    """An empty sqlite MLflow store in tmp_path (a copy of the session's migrated one), set as MLFLOW_TRACKING_URI."""
    uri = new_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def main_in_process(*argv, env=None, cwd=None):
    """`python -m weighted_mtp *argv` run in this process: weighted_mtp.main, the CLI exactly, without the seconds
    a new interpreter spends importing torch and mlflow. A CompletedProcess (exit code, stdout, stderr); `env`: the
    variables set for the call, `cwd`: where it runs. Each command and exit code keeps one test of the real process
    (docs/testing.md)."""
    import io
    import logging
    import subprocess
    from unittest import mock
    import weighted_mtp as wm
    out, err, handlers = io.StringIO(), io.StringIO(), logging.getLogger().handlers[:]
    with mock.patch.dict(os.environ, env or {}), contextlib.chdir(cwd or os.getcwd()), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = wm.main(list(argv))
        except SystemExit as e:   # argparse's usage errors
            code = e.code
        finally:
            logging.getLogger().handlers[:] = handlers   # main's basicConfig must not outlive the call
    return subprocess.CompletedProcess(["weighted_mtp", *argv], code or 0, out.getvalue(), err.getvalue())


def workers_said(stderr, limit=4000):
    """What torchrun's workers wrote to stderr, without the launcher's own report (its SIGTERM notices and the
    ChildFailedError block fill the tail and hide the failing rank's error): for a failed run's assertion."""
    ours = [line for line in stderr.splitlines() if "torch/distributed/" not in line and "elastic" not in line]
    return "\n".join(ours)[-limit:]


def tiny_config(pipeline, tmp_path, *overrides):
    from wmtp.config import load_config
    return load_config(ROOT / "configs" / pipeline / f"{pipeline}_local.yaml",
                       [*TINY, f"checkpoint.dir={tmp_path}/ckpt", *overrides])


def load_meta_weights(model, model_dir):
    """A Meta dir's consolidated.pth loaded strictly into `model` (the trainer reads Meta dirs through
    pretrained.read_meta_dir; the tests check the strict load itself)."""
    from wmtp.pretrained import load_state, read_consolidated
    path, state = read_consolidated(model_dir)
    load_state(model, state, f"{path} (vs params.json)")


def train_keeping_setup(cfg, use_micro=False):
    """(train's result, the Setup it trained): prepare() caught on its way into train(), so that a test can look
    at the live model and pipeline, which train() itself does not hand out."""
    import weighted_mtp as wm
    caught, prepare = [], wm.prepare
    wm.prepare = lambda *args, **kwargs: caught.append(prepare(*args, **kwargs)) or caught[-1]
    try:
        return wm.train(cfg, use_micro=use_micro), caught[-1]
    finally:
        wm.prepare = prepare


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to n for a while: tiny matmuls on a busy 2-core machine only wait for a core
    with a second thread (OpenMP spins), and one thread is deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
