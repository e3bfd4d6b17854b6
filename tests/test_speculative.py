"""Self-speculative greedy decoding (generate(..., speculative=True)): token for token plain greedy decoding's output
on a briefly trained micro model (its drafts sometimes right, sometimes wrong), at batch 1 and 8 with prompts of
different lengths, EOS and max_new_tokens anywhere in a draft block, under LoRA and bf16 autocast, on a Hugging Face
model re-headed to H = 3, and H = 1; the counts behind eval/tokens_per_forward and eval/accept_head_{k}."""
import pytest
import torch

import weighted_mtp as wm
import weights as W
from wmtp.model import LoRALinear, MTPTransformer, ModelArgs, apply_lora, decode_stats, generate
from wmtp.pretrained import ByteTokenizer
from conftest import torch_threads
from test_hf import CONFIG, random_llama, write_hf

TOK = ByteTokenizer()
ARGS = ModelArgs(dim=32, n_layers=2 + 3, n_heads=4, n_kv_heads=2, vocab_size=TOK.vocab_size, multiple_of=16,
                 n_future_tokens=3)
TEXTS = [b"def add(a, b):\n    return a + b\n", b"def sub(a, b):\n    return a - b\n", b"x = 1\ny = 2\nprint(x + y)\n"]
PROMPTS = [list(b"def add"), list(b"def sub(a, b):"), [], list(b"x = 1\n"), list(b"qq"), list(b"def"),
           list(b"y = 2\nprint("), list(b"    return a")]
PROMPTS = [[TOK.bos_id] + p for p in PROMPTS]  # 8 prompts of 1 to 15 tokens


def train_briefly(args, steps=40, seed=0):
    """The model after `steps` AdamW steps on three short programs: good enough that heads 1..H-1 often guess
    right, not so good that they always do."""
    torch.manual_seed(seed)
    model = MTPTransformer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seqs = [[TOK.bos_id, *t, TOK.eos_id] for t in TEXTS]
    width = max(map(len, seqs))
    tokens = torch.tensor([s + [TOK.pad_id] * (width - len(s)) for s in seqs])
    targets = W.shift_targets(torch.tensor([s + [-100] * (width - len(s)) for s in seqs]), args.n_future_tokens)
    for _ in range(steps):
        loss, _, _ = model(tokens, targets)  # W.mtp_loss(ce, targets != -100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained(one_thread):
    return train_briefly(ARGS)


@torch.no_grad()
def without_cache(model, prompt, eos_id, max_new):
    """Greedy decoding the slow, obvious way: the whole prefix through forward for every token, head 0's argmax."""
    ids = list(prompt)
    for _ in range(max_new):
        nxt = int(model.logits(torch.tensor([ids]), n_heads=1)[0, -1, 0].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def both(model, prompts, max_new, eos_id=TOK.eos_id):
    """(plain greedy, speculative greedy, the speculative run's counts)."""
    stats = {}
    fast = generate(model, prompts, eos_id, TOK.pad_id, max_new, speculative=True, stats=stats)
    return generate(model, prompts, eos_id, TOK.pad_id, max_new), fast, stats


def test_the_same_tokens_as_plain_greedy_at_batch_8_and_1_in_fewer_forwards(trained):
    plain, fast, stats = both(trained, PROMPTS, 40)
    assert fast == plain == [without_cache(trained, p, TOK.eos_id, 40) for p in PROMPTS]
    assert len({len(p) for p in PROMPTS}) == 7 and len({tuple(c) for c in plain}) == 8  # rows differ
    assert len({len(c) for c in plain}) > 2  # rows stop (EOS) after different numbers of tokens
    assert 0 < stats["accepted"][1] < stats["accepted"][0] < stats["verified"]  # drafts both right and wrong
    assert stats["tokens"] == sum(len(c) + (len(c) < 40) for c in plain)  # the EOS of a stopped row counts
    assert decode_stats(stats)["tokens_per_forward"] == stats["tokens"] / stats["forwards"] > 1.5
    for prompt, row in zip(PROMPTS, plain):
        assert both(trained, [prompt], 40)[1] == [row]


def test_max_new_tokens_and_eos_anywhere_in_a_draft_block_end_rows_as_plain_greedy_does(trained):
    full = generate(trained, PROMPTS, -1, TOK.pad_id, 30)  # eos -1: every row runs to 30 tokens
    for max_new in (1, 2, 3, 4, 5, 7, 11, 19, 30):  # blocks of 1-3 tokens, 8 rows: ends at every place of a block
        plain, fast, stats = both(trained, PROMPTS, max_new, eos_id=-1)
        assert fast == plain == [row[:max_new] for row in full]
        assert stats["tokens"] == 8 * max_new
    for eos in sorted({t for row in full for t in row})[::3]:  # a third of the tokens as the EOS: ends anywhere
        plain, fast, _ = both(trained, PROMPTS, 30, eos_id=eos)
        assert fast == plain == [row[:row.index(eos)] if eos in row else row for row in full]


def test_plain_counts_one_token_per_forward_and_a_one_head_model_decodes_plain():
    stats = {}
    one_head = MTPTransformer(ModelArgs(**{**ARGS.__dict__, "n_layers": 3, "n_future_tokens": 1})).eval()
    out = generate(one_head, PROMPTS, TOK.eos_id, TOK.pad_id, 12, speculative=True, stats=stats)
    assert out == generate(one_head, PROMPTS, TOK.eos_id, TOK.pad_id, 12)
    assert decode_stats(stats) == {"tokens_per_forward": 1.0}  # nothing drafted: no acceptance to report
    # hand-made counts: 30 tokens in 12 forwards; of 10 verify forwards, head 1's draft right in 8, head 2's in 5
    counts = {"tokens": 30, "forwards": 12, "verified": 10, "accepted": [8, 5]}
    assert decode_stats(counts) == {"tokens_per_forward": 2.5, "accept_head_1": 0.8, "accept_head_2": 0.5}


def test_sampling_decodes_plain_whatever_speculative_says(trained):
    draw = lambda speculative: generate(trained, PROMPTS, TOK.eos_id, TOK.pad_id, 12, temperature=1.0,
                                        generator=torch.Generator().manual_seed(3), speculative=speculative)
    assert draw(True) == draw(False)


def test_lora_adapters_decode_identically(trained):
    model = train_briefly(ARGS)
    apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(2)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_b.data.normal_(0.0, 0.02)  # non-zero adapters: the output is not the base model's
    plain, fast, stats = both(model, PROMPTS, 24)
    assert fast == plain and plain != both(trained, PROMPTS, 24)[0]
    assert 0 < stats["accepted"][0] < stats["verified"]


def test_bf16_autocast_decodes_identically(trained):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fast, stats = both(trained, PROMPTS, 24)
    assert fast == plain and stats["accepted"][0] > 0


def test_a_hugging_face_model_re_headed_to_three_heads_decodes_identically(tmp_path):
    _, model = wm.load_pretrained(write_hf(tmp_path / "hf", CONFIG, random_llama(CONFIG)), n_future_tokens=3)
    plain, fast, stats = both(model.eval(), PROMPTS, 20, eos_id=257)
    assert fast == plain == [without_cache(model, p, 257, 20) for p in PROMPTS]
    assert stats["verified"] > 0 and stats["tokens"] > 0  # heads 1-2 copy head 0: right only on repeated tokens
