"""bench.py --quick runs end to end and reports every figure. Whether figures meet their goals is the bench's
report, not a test: timings on a shared CI machine prove nothing."""
import importlib.util
import json
import math
import subprocess
import sys
import time
from unittest import mock

import torch

from conftest import ROOT, torch_threads

FIGURES = ["P1", "P2", "P3", "P4", "P5", "P7", "P8", "P10", "P10_separate", "ckpt_stall", "upload_step",
           "log_overhead", "gen_kv_cache", "sandbox_throughput", "sandbox_isolation", "fsdp_step", "fsdp_memory",
           "fsdp_setup_memory"]


def test_bench_quick_reports_every_figure(tmp_path):
    out = tmp_path / "results.json"
    # one torch thread: on a busy 2-core machine two threads make every step wait for a descheduled one; one timed
    # call a side per repeat (--steps 1): each figure still computed from its two alternating repeats
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--threads", "1", "--steps", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in FIGURES + (["P6"] if torch.cuda.is_available() else []):
        r = results[name]
        # log_overhead and P6 may be skipped (--quick; a GPU of unknown peak), saying why
        if name in ("log_overhead", "P6") and "skipped" in r:
            assert isinstance(r["skipped"], str) and r["skipped"]
            continue
        if name == "P7" and importlib.util.find_spec("transformers") is None:  # the bench extra is missing: says so
            assert r == {"skipped": "transformers is not installed (pip install -e '.[bench]')"}
            continue
        for key in ("median", "min", "max", "goal"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key, r)
        assert r["min"] <= r["median"] <= r["max"], (name, r)
        assert f"| {name} |" in proc.stdout  # and it is in the printed table
    assert ("P6" in results) == torch.cuda.is_available()
    assert results["P5"]["goal"] > 1.05  # computed from one head's share of the model FLOPs
    assert len(results["P1"]["ratios"]) == 2 and len(results["fsdp_step"]["ratios"]) == 2  # --quick's 2 repeats
    assert results["meta"]["quick"] is True and results["meta"]["torch"] == torch.__version__
    assert results["meta"]["sizes"]["steps"] == 1 and results["meta"]["sizes"]["repeats"] == 2


def bench_in_process(capsys, *argv):
    """bench.py *argv run in this process (bench.main, its CLI exactly, without a new interpreter's imports):
    (exit code, stdout, stderr). bench.py --quick above keeps the one real process."""
    import bench
    with mock.patch.object(sys, "argv", ["bench.py", *argv]), torch_threads(torch.get_num_threads()):
        try:
            code = bench.main() or 0
        except SystemExit as e:   # argparse's usage errors
            code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_only_runs_the_chosen_figures_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "results.json"
    kept = {"median": 0.5, "min": 0.4, "max": 0.6, "goal": 1.1, "ok": True}
    out.write_text(json.dumps({"P1": kept}))
    code, stdout, stderr = bench_in_process(capsys, "--quick", "--threads", "1", "--only", "P4", "--out", str(out))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["P1"] == kept and results["meta"]["figures"] == ["P4"]
    assert set(results) == {"P1", "P4", "meta"} and results["P4"]["min"] <= results["P4"]["median"]
    code, _, stderr = bench_in_process(capsys, "--only", "P4,P99", "--out", str(out))
    assert code == 2 and "--only: unknown figure(s) P99; known: P1, P2," in stderr
    assert json.loads(out.read_text()) == results  # nothing written


def test_weights_read_counts_what_a_verify_forward_reads_against_a_plain_step():
    import bench
    from wmtp.config import load_config
    from wmtp.pretrained import build_model
    _, model = build_model(load_config(ROOT / "configs" / "baseline" / "baseline_local.yaml", []), True,
                           value_head=False)
    # the micro model: dim 128, 4 heads of 32, 2 kv heads, FFN 352 (2/3 of 4·128 up to a multiple of 32), vocab 259
    block = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 352 + 2 * 128  # q, k and v, o, w1-w3, two norms
    shared = 2 * block + 128 + 259 * 128  # 2 trunk blocks, the final norm, the output matrix
    assert bench.weights_read(model) == (shared + 4 * block) / (shared + block)  # 1 140 736 / 587 008
    assert (shared + block, shared + 4 * block) == (587_008, 1_140_736)


def test_programs_per_second_scores_every_program_and_counts_them():
    """bench's sandbox figures: every program is scored (each must pass its assert, or the call fails) and the rate
    is programs over the seconds the scoring took: at least the programs over the whole call's wall time."""
    import bench
    start = time.perf_counter()
    rate = bench.programs_per_second(workers=2, n_programs=4)
    assert rate >= 4 / (time.perf_counter() - start)
