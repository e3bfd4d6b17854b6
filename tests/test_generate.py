"""Generation with a KV cache: token for token what re-running the whole prefix gives (greedy, batched prompts of
different lengths, GQA, LoRA), EOS stops a row and the loop, reproducible sampling, nucleus cut, bf16 autocast."""
import pytest
import torch

from wmtp.model import KVCache, LoRALinear, MTPTransformer, ModelArgs, apply_lora, generate, next_token
from wmtp.pretrained import ByteTokenizer

TOK = ByteTokenizer()
# the micro model's shape (2 trunk blocks, H=3 heads, GQA) at small dims: random weights, byte vocabulary
ARGS = ModelArgs(dim=32, n_layers=2 + 3, n_heads=4, n_kv_heads=2, vocab_size=TOK.vocab_size, multiple_of=16,
                    n_future_tokens=3)
PROMPTS = [[256, 72, 105], [256] + list(b"def add(a, b):"), [256], [256] + list(b"x = 1\n")]


def micro_model(seed=0):
    torch.manual_seed(seed)
    return MTPTransformer(ARGS).eval()


@torch.no_grad()
def without_cache(model, prompt, eos_id, max_new):
    """The plain loop: the whole prefix through the model's forward for every new token, head 0's argmax."""
    ids = list(prompt)
    for _ in range(max_new):
        logits = model.logits(torch.tensor([ids]), n_heads=1)
        nxt = int(logits[0, -1, 0].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_greedy_with_the_cache_equals_rerunning_the_prefix_for_a_batch_of_lengths():
    model = micro_model()
    cached = generate(model, PROMPTS, TOK.eos_id, TOK.pad_id, 24)
    assert cached == [without_cache(model, p, TOK.eos_id, 24) for p in PROMPTS]
    assert [len(c) for c in cached] == [24] * 4  # no EOS in these: every row ran to max_new_tokens
    assert len({tuple(c) for c in cached}) == 4  # and the rows differ, so a mixed-up row would show


def test_greedy_with_the_cache_equals_rerunning_the_prefix_under_lora():
    model = micro_model(1)
    apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(2)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_b.data.normal_(0.0, 0.2)  # non-zero adapters: the outputs differ from the base model's
    cached = generate(model, PROMPTS, TOK.eos_id, TOK.pad_id, 16)
    assert cached == [without_cache(model, p, TOK.eos_id, 16) for p in PROMPTS]
    base = micro_model(1)
    assert cached != [without_cache(base, p, TOK.eos_id, 16) for p in PROMPTS]


def test_eos_stops_its_row_and_the_loop_stops_when_every_row_is_done():
    model = micro_model()
    full = generate(model, PROMPTS, eos_id=-1, pad_id=TOK.pad_id, max_new_tokens=20)  # -1: never stops
    eos = next(t for t in full[0][3:] if t not in full[0][:3])  # a token row 0 first writes at step >= 3
    steps = []
    hook = model.norm.register_forward_hook(lambda *_: steps.append(1))  # one final norm per model call
    stopped = generate(model, PROMPTS, eos, TOK.pad_id, 20)
    hook.remove()
    assert stopped == [row[:row.index(eos)] if eos in row else row for row in full]
    assert len(stopped[0]) >= 3 and eos not in stopped[0]
    # the prompt forward, then one call per token until the last row's EOS (or its 20th token)
    assert len(steps) == 1 + max(row.index(eos) if eos in row else 19 for row in full)

    alone = generate(model, [PROMPTS[0]], eos, TOK.pad_id, 20)
    assert alone == [stopped[0]]


def test_sampling_is_reproducible_with_a_generator_and_a_tiny_top_p_is_greedy():
    model = micro_model()
    draw = lambda seed, **kw: generate(model, PROMPTS, TOK.eos_id, TOK.pad_id, 12, temperature=1.0,
                                          generator=torch.Generator().manual_seed(seed), **kw)
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    greedy = generate(model, PROMPTS, TOK.eos_id, TOK.pad_id, 12)
    assert draw(7) != greedy
    assert draw(7, top_p=1e-6) == greedy  # the nucleus is the most likely token alone


def test_nucleus_keeps_the_most_likely_tokens_up_to_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draws = next_token(logits, 1.0, 0.7, g)  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is tokens {0, 1}
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    draws = next_token(logits, 1.0, 0.8, g)  # 0.5 + 0.3 reaches 0.8 exactly: token 2 is left out
    assert set(draws.tolist()) == {0, 1}
    assert set(next_token(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}
    assert next_token(logits[:1] * 3, 0.0, 1.0, None).tolist() == [0]  # temperature 0: argmax


@torch.no_grad()
def test_bf16_autocast_cache_gives_the_forwards_logits_within_bf16_rounding():
    model = micro_model()
    prompts = PROMPTS[:2]
    width, lengths = max(map(len, prompts)), torch.tensor([len(p) for p in prompts])
    tokens = torch.tensor([p + [TOK.pad_id] * (width - len(p)) for p in prompts])
    rows = torch.arange(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache(model, 2, width + 1, torch.bfloat16, "cpu")
        first = model.next_logits(tokens, torch.arange(width).expand(2, width), width, cache, lengths - 1)
        reference = model.logits(tokens, n_heads=1)[rows, lengths - 1, 0].float()
        torch.testing.assert_close(first, reference, atol=0.05, rtol=0.05)
        nxt = torch.tensor([65, 66])  # one decode step, each row at its own position
        second = model.next_logits(nxt[:, None], lengths[:, None], width + 1, cache, torch.zeros(2, dtype=torch.long))
        extended = [torch.tensor([p + [int(t)]]) for p, t in zip(prompts, nxt)]
        reference = torch.cat([model.logits(x, n_heads=1)[:, -1, 0].float() for x in extended])
        torch.testing.assert_close(second, reference, atol=0.05, rtol=0.05)
        outs = generate(model, prompts, TOK.eos_id, TOK.pad_id, 6)
    assert cache.keys[0].dtype == torch.bfloat16 and all(len(o) == 6 for o in outs)


def test_an_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="every prompt at least one token"):
        generate(micro_model(), [[256, 65], []], TOK.eos_id, TOK.pad_id, 4)
