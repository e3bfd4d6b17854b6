"""
Results: `report` (the newest run of each pipeline), and compare's statistics (mean ± 95 % Student-t intervals over
seeds), its plot of the metrics over steps and its table.
"""
import json
import math
from pathlib import Path
import tempfile
import time

from config import PIPELINES, UserError
from pipelines import PIPELINE_TYPES
from tracking import metric_name, newest_run


# each critic figure beside its no-training baseline (the starting policy's log-probabilities): its margin is the news
COMPARED = ("val/loss", "val/accuracy", metric_name("eval/pass@1"), "val/auc", "val/auc_logprob",
            "val/auc_logprob_mean", "val/token_credit", "val/token_credit_logprob")


PLOTTED = ("train/loss", "val/loss", "val/accuracy", metric_name("val/pass@1"))




def report(uri, experiment):
    """The newest run of each pipeline: steps, val/loss, val/accuracy (the critic: AUC), pass@1 (evaluate's
    eval/pass@1, else validation's val/pass@1, marked "val"), start, wall. An unknown experiment is a UserError."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"report: no experiment '{experiment}' in {uri} (known: {known})")
    print(f"{'pipeline':<11} {'run id':<33} {'steps':>6} {'val/loss':>9} {'accuracy':>9} {'pass@1':>9} {'wall':>6}  "
          "started from")
    for pipeline in PIPELINES:
        r = newest_run(client, experiment, f"tags.pipeline = '{pipeline}'")
        if r is None:
            print(f"{pipeline:<11} (no run)")
            continue
        m = r.data.metrics
        acc = m.get("val/accuracy", m.get("val/auc"))
        acc_text = "-" if acc is None else (f"{acc:.3f}" + (" auc" if "val/accuracy" not in m else ""))
        pass1 = m.get(metric_name("eval/pass@1"))
        pass1_text = f"{pass1:.3f}" if pass1 is not None else "-" if metric_name("val/pass@1") not in m else (
            f"{m[metric_name('val/pass@1')]:.3f} val")
        wall = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
        print(f"{pipeline:<11} {r.info.run_id:<33} {r.data.tags.get('wmtp.steps', '?'):>6} "
              f"{m.get('val/loss', float('nan')):>9.4f} {acc_text:>9} {pass1_text:>9} "
              f"{wall:>5.0f}s  {r.data.tags.get('wmtp.started_from', '-')}")


def mean_interval(values):
    """(mean, h): the 95 % Student-t interval mean ± h, h = t_{0.975, n−1} · s / √n, s the sample standard
    deviation (n − 1 in its denominator); h is nan for a single value."""
    from scipy.stats import t as student_t  # scipy comes with mlflow
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(student_t.ppf(0.975, n - 1)) * s / math.sqrt(n)


def summarize_compare(client, parent, pipelines, runs):
    """{pipeline: {metric: {values, mean, ci95}, runs, started_from}} from the runs' last logged values; logged on
    the parent run with the plot of PLOTTED over steps."""
    from mlflow.entities import Metric
    summary, now = {}, int(time.time() * 1000)
    for p in pipelines:
        ids = [seed_runs[p] for seed_runs in runs]
        last = [client.get_run(run_id).data.metrics for run_id in ids]
        summary[p] = {"runs": ids, "started_from": PIPELINE_TYPES[p.partition(":")[0]].compare_start}
        for m in COMPARED:
            values = [x[m] for x in last if m in x]
            if len(values) == len(ids):
                mean, h = mean_interval(values)
                summary[p][m] = {"values": values, "mean": mean, "ci95": h}
    client.log_batch(parent, metrics=[Metric(f"{p}/{m}_{k}", v[k], now, 0) for p, row in summary.items()
                                      for m, v in row.items() if m in COMPARED for k in ("mean", "ci95")
                                      if math.isfinite(v[k])])
    client.log_text(parent, json.dumps(summary, indent=2), "compare/summary.json")
    plot_compare(client, parent, summary)
    return summary


def plot_compare(client, parent, summary):
    """compare/metrics.png: one panel per metric of PLOTTED, a line per pipeline and seed over its steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.5 * len(PLOTTED), 3.6))
    for ax, metric in zip(axes, PLOTTED):
        for i, (p, row) in enumerate(summary.items()):
            for j, run_id in enumerate(row["runs"]):
                history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
                if history:
                    ax.plot(*zip(*history), color=f"C{i}", alpha=0.8, label=p if j == 0 else None)
        ax.set(title=metric, xlabel="policy step (after the warm-up)")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "metrics.png", dpi=100)
        client.log_artifact(parent, str(Path(tmp) / "metrics.png"), "compare")
    plt.close(fig)


def format_compare(summary, seeds, warmup_steps, steps):
    """The table: per policy pipeline, where it started and mean ± 95 % half-width of each metric of COMPARED."""
    width = max([11, *map(len, summary)])  # control rows: verifiable:shuffled-critic
    shown = [m for m in COMPARED if any(m in row for row in summary.values())]  # no all-"-" columns
    cols = [max(15, len(m)) for m in shown]
    head = f"{'pipeline':<{width}} {'started from':<26}" + "".join(f" {m:>{c}}" for m, c in zip(shown, cols))
    lines = [f"{seeds} seed(s); a {warmup_steps}-step warm-up baseline, then {steps} steps of each pipeline", head]
    for p, row in summary.items():
        cells = ["-" if m not in row else f"{row[m]['mean']:.3f}" + (
            f" ± {row[m]['ci95']:.3f}" if math.isfinite(row[m]["ci95"]) else "") for m in shown]
        lines.append(f"{p:<{width}} {row['started_from']:<26}" + "".join(f" {c:>{w}}" for c, w in zip(cells, cols)))
    return "\n".join(lines)
