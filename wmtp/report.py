"""
Results: `report` (the newest run of each pipeline), and compare's statistics (mean ± 95 % Student-t intervals over
seeds), its plot of the metrics over steps and its table.
"""
import difflib
import json
import math
from pathlib import Path
import tempfile
import time

from wmtp.config import CONFIGS, UserError, read_yaml
from wmtp.pipelines import PIPELINE_TYPES, policy_pipelines
from wmtp.tracking import metric_name, newest_run, runs_view_url


# each critic figure beside its no-training baseline (the starting policy's log-probabilities): its margin is the news
COMPARED = ("val/loss", "val/accuracy", metric_name("eval/pass@1"), "val/auc", "val/auc_logprob",
            "val/auc_logprob_mean", "val/token_credit", "val/token_credit_logprob")


# compare/metrics.png's panels: (title, metric, whose rows). The critic's losses are a value MSE, not the policies'
# cross-entropy: panels of their own, never on the same axes.
# Whose: "policy", the rows of pipelines that train the policy (trains_policy), else "value".
PANELS = (("policies: train/loss (CE)", "train/loss", "policy"), ("policies: val/loss (CE)", "val/loss", "policy"),
          ("val/accuracy", "val/accuracy", "policy"), ("val/pass_at_1", metric_name("val/pass@1"), "policy"),
          ("critic: train/loss (value MSE)", "train/loss", "value"), ("critic: val/auc", "val/auc", "value"))
WEAKER_MARK = "!"   # beside a pass@1 whose programs ran in a weaker sandbox than bwrap


def report(uri, experiment, every_run=False):
    """The newest run of each pipeline (every_run: every run, newest first): name, id, status, steps, val/loss,
    val/accuracy (the critic: AUC), pass@1 (evaluate's eval/pass@1, else validation's val/pass@1, marked "val"; "!"
    when its programs ran in a weaker sandbox than bwrap), wall time and where it started (tag wmtp.started_from);
    then the link to the runs in MLflow's UI. An unknown experiment is a UserError."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"report: no experiment '{experiment}' in {uri} (known: {known})")
    print(f"{'run':<16} {'run id':<33} {'status':<8} {'steps':>6} {'val/loss':>9} {'accuracy':>9} {'pass@1':>9} "
          f"{'wall':>6}  started from")
    if every_run:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
        lines = [report_row(r.info.run_name, r) for r in runs]
    else:
        newest = [(kind, newest_run(client, experiment, f"tags.pipeline = '{name}'"))
                  for name, kind in PIPELINE_TYPES.items()]
        lines = [f"{kind.run_name:<16} (no run)" if r is None else report_row(r.info.run_name, r) for kind, r in newest]
    print("\n".join(lines))
    if any(WEAKER_MARK in line for line in lines):
        print(f"{WEAKER_MARK} scored in a weaker sandbox (eval.sandbox uid or none): a program may have read what "
              "bwrap hides")
    print(f"\nMLflow UI: {runs_view_url(uri, exp.experiment_id)}"
          + ("" if uri.startswith("http") else "   (start it with ./run.sh ui)"))


def report_row(name, r):
    """One run's line of `report`."""
    m = r.data.metrics
    acc = m.get("val/accuracy", m.get("val/auc"))
    acc_text = "-" if acc is None else (f"{acc:.3f}" + (" auc" if "val/accuracy" not in m else ""))
    pass1_text = pass_at_1_cell(m, r.data.tags, r.data.params)
    wall = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
    return (f"{name:<16} {r.info.run_id:<33} {r.info.status[:8]:<8} {r.data.tags.get('wmtp.steps', '?'):>6} "
            f"{m.get('val/loss', float('nan')):>9.4f} {acc_text:>9} {pass1_text:>9} "
            f"{wall:>5.0f}s  {r.data.tags.get('wmtp.started_from', '-')}")


def compare_rows(seeds, pipelines):
    """--pipelines as a tuple of compare's rows; a bad --seeds or row is a UserError naming it."""
    policy = policy_pipelines()
    rows = [*policy, *(f"{p}:{v}" for p in policy for v in PIPELINE_TYPES[p].compare_variants)]
    if seeds < 1:
        raise UserError(f"compare: --seeds {seeds}: must be >= 1")
    for row in pipelines.split(","):
        if row not in rows:
            near = difflib.get_close_matches(row, rows, 1)
            raise UserError(f"compare: --pipelines: '{row}' is not a row" + (f" (did you mean '{near[0]}'?)" if near
                            else "") + f"; choose among {', '.join(rows)}")
    return tuple(pipelines.split(","))


def list_configs():
    """`ls`: every config under configs/ with its pipeline and experiment.description, one line each."""
    print(f"{'config':<42} {'pipeline':<11} description")
    for path in sorted(CONFIGS.glob("*/*.yaml")):
        experiment = read_yaml(path).get("experiment", {})
        print(f"{str(path.relative_to(CONFIGS.parent)):<42} {experiment.get('pipeline', '-'):<11} "
              f"{experiment.get('description', '')}")
    return 0


def pass_at_1_cell(metrics, tags, params):
    """report's pass@1: evaluate's eval/pass@1, else validation's val/pass@1 marked "val", else "-"; "!" when the
    programs ran in a weaker sandbox than bwrap (evaluate's tag sandbox.isolation, validation's param eval.sandbox)."""
    pass1, val = metrics.get(metric_name("eval/pass@1")), metrics.get(metric_name("val/pass@1"))
    if pass1 is None and val is None:
        return "-"
    mode = tags.get("sandbox.isolation") if pass1 is not None else params.get("eval.sandbox")
    text = f"{pass1:.3f}" if pass1 is not None else f"{val:.3f} val"
    return text + (WEAKER_MARK if mode not in (None, "bwrap") else "")


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
    the parent run with the plot of PANELS over steps."""
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
    """compare/metrics.png (compare_figure) on the parent run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    histories = {run_id: {m: sorted((x.step, x.value) for x in client.get_metric_history(run_id, m))
                          for m in {metric for _, metric, _ in PANELS}}
                 for row in summary.values() for run_id in row["runs"]}
    fig = compare_figure(summary, histories)
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "metrics.png", dpi=100)
        client.log_artifact(parent, str(Path(tmp) / "metrics.png"), "compare")
    plt.close(fig)


def compare_figure(summary, histories):
    """PANELS on a 2 x 3 grid, 1200 x 760 px at dpi 100 (MLflow's artifact preview shows it at its width): a line
    with markers per row and seed over its steps (a series of one point still shows), one colour per row, the
    critic's rows on the critic's panels only."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.6))
    for ax, (title, metric, whose) in zip(axes.flat, PANELS):
        for i, (row, values) in enumerate(summary.items()):
            if PIPELINE_TYPES[row.partition(":")[0]].trains_policy != (whose == "policy"):
                continue
            for j, run_id in enumerate(values["runs"]):
                points = histories[run_id].get(metric, [])
                if points:
                    ax.plot(*zip(*points), color=f"C{i}", marker="o", markersize=4, alpha=0.85,
                            label=row if j == 0 else None)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step (after the warm-up)", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return fig


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
