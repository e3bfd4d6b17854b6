"""Data: Alpaca rendering, loss masking boundaries, EOS, right padding, sampling, JSONL errors, the arith checker."""
import types

import pytest
import torch

from wmtp.config import UserError
from wmtp.model import MTPTransformer, ModelArgs, generate
from wmtp.pretrained import ByteTokenizer
from wmtp.data import (Batches, Examples, arith_records, check_arith, collate, encode_records, epoch_order,
                       length_grouped, read_jsonl, render_prompt, sample_records)

TOK = ByteTokenizer()


def test_alpaca_template_with_and_without_input():
    with_input = render_prompt({"instruction": "Add.", "input": "1+2", "output": "3"})
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n1+2\n\n### Response:\n")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    no_input = render_prompt({"instruction": "Say hi.", "output": "hi"})
    assert no_input.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input" not in no_input


def test_labels_cover_exactly_the_response_and_eos():
    record = {"instruction": "Say hi.", "output": "hi"}
    (ids, labels, reward, _), = encode_records([record], TOK, 512, "truncate", "x")[0]
    prompt_len = 1 + len(render_prompt(record).encode())
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and len(ids) == prompt_len + 3
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == [ord("h"), ord("i"), TOK.eos_id]
    assert reward == 1.0


def test_right_padding_to_the_longest_in_the_batch():
    examples = [([1, 2, 3], [-100, 2, 3], 1.0, {}), ([4, 5], [-100, 5], 0.0, {})]
    tokens, labels, rewards = collate(examples, TOK.pad_id, "cpu")
    assert tokens.tolist() == [[1, 2, 3], [4, 5, TOK.pad_id]]           # 3 = longest, not max_length
    assert labels.tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert rewards.tolist() == [1.0, 0.0]


def test_overlong_sequences_truncate_skip_or_fail():
    long = {"instruction": "x" * 300, "output": "yes", "_source": "d.jsonl:7"}
    prompt_len = 1 + len(render_prompt(long).encode())
    short = {"instruction": "Say hi.", "output": "hi"}
    examples, n = encode_records([long, short], TOK, prompt_len + 2, "truncate", "d.jsonl")
    assert n == 1 and len(examples[0][0]) == prompt_len + 2 and examples[0][1][-2:] == [ord("y"), ord("e")]
    examples, n = encode_records([long, short], TOK, prompt_len + 2, "skip", "d.jsonl")
    assert n == 1 and len(examples) == 1 and examples[0][3] is short
    with pytest.raises(UserError, match=rf"^d.jsonl:7: sequence of {prompt_len + 4} tokens exceeds "
                                        rf"dataset.max_length={prompt_len + 2}$"):
        encode_records([long], TOK, prompt_len + 2, "error", "d.jsonl")
    with pytest.raises(UserError, match=r"d.jsonl: no examples left"):
        encode_records([long], TOK, prompt_len + 2, "skip", "d.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "a", "output": ', "not valid JSON"),
    ('{"instruction": "a"}', "missing 'output' (a string)"),
    ('[1, 2]', "expected a JSON object"),
    ('{"instruction": "a", "output": "b", "is_correct": "yes"}', "'is_correct' a boolean"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n\n' + line + "\n")
    with pytest.raises(UserError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_sampling_ratio_and_determinism():
    records = [{"output": str(i), "is_correct": i % 3 != 0} for i in range(300)]   # 200 correct, 100 incorrect
    chosen = sample_records(records, 40, 0.25, seed=1)
    assert len(chosen) == 40 and sum(r["is_correct"] for r in chosen) == 10
    assert chosen == sample_records(records, 40, 0.25, seed=1) != sample_records(records, 40, 0.25, seed=2)
    assert len(sample_records(records, 0, 1.0, seed=1)) == 200   # 0 = all; ratio 1 keeps only correct answers


def test_builtin_arith_is_deterministic_labelled_and_checked():
    train, val = arith_records("train"), arith_records("validation")
    assert len(train) == 18000 and len(val) == 2000 and train == arith_records("train")
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in val}
    for r in train[:200] + val[:200]:
        assert check_arith(r, r["output"]) == r["is_correct"]
    assert check_arith({"instruction": "12+30"}, " 42") and not check_arith({"instruction": "12+30"}, "43")


def test_ranks_get_equal_disjoint_shards():
    shards = [epoch_order(11, 0, 5, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]                    # 11 -> 9: drop_last, ranks agree on steps
    assert len(set(sum(shards, []))) == 9
    assert epoch_order(11, 1, 5, 0, 3) != shards[0]              # a new permutation each epoch


def test_length_grouping_batches_like_lengths_and_keeps_every_example_once():
    lengths = [3, 40, 5, 33, 4, 60, 7, 35] * 8      # buckets by power of two: 3, 4 | 5, 7 | 33, 35, 40, 60
    grouped = length_grouped(list(range(64)), lengths, 4, seed=0)
    assert sorted(grouped) == list(range(64))
    short, middle, long = range(0, 64, 4), range(2, 64, 4), [i for i in range(64) if i % 2]
    expected = {tuple(bucket[i:i + 4]) for bucket in (short, middle, long) for i in range(0, len(bucket), 4)}
    assert {tuple(grouped[i:i + 4]) for i in range(0, 64, 4)} == expected   # in random order within a bucket
    assert grouped == length_grouped(list(range(64)), lengths, 4, seed=0)
    assert grouped != length_grouped(list(range(64)), lengths, 4, seed=1)  # the batches' order is seeded


def test_grouped_batches_pad_little_and_resume_at_the_same_batch():
    examples = [([1] * n, [1] * n, 1.0, {}) for n in [6, 50, 7, 60, 5, 55] * 20]
    cfg = types.SimpleNamespace(training=types.SimpleNamespace(batch_size=4, group_by_length=True),
                                data_sampling=types.SimpleNamespace(seed=3))
    setup = types.SimpleNamespace(data=Examples(examples, []), tok=TOK, device=torch.device("cpu"), cfg=cfg, rank=0,
                                  world=1)
    batches = Batches(setup).take(40)                                 # 30 per epoch: into the second one
    short = [(t != TOK.pad_id).sum(1).max() <= 7 for t, _, _ in batches]
    assert all(s or (t != TOK.pad_id).sum(1).min() >= 50 for s, (t, _, _) in zip(short, batches))  # no mixed batch
    assert sum(short[:30]) == 15                                          # every example once an epoch
    later = Batches(setup, position=25).take(15)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[25:], later))


def test_greedy_generate_batches_prompts_of_different_lengths():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=259, multiple_of=16, n_future_tokens=2)
    model = MTPTransformer(args).eval()
    prompts = [[256, 65, 66], [256, 67, 68, 69, 70, 71]]
    together = generate(model, prompts, TOK.eos_id, TOK.pad_id, 4)
    alone = [generate(model, [p], TOK.eos_id, TOK.pad_id, 4)[0] for p in prompts]
    assert together == alone
    assert all(len(out) <= 4 and TOK.eos_id not in out for out in together)  # up to max_new tokens, EOS left off
