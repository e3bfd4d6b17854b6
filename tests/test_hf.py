"""Hugging Face LLaMA checkpoints: loading (single file, sharded, GQA, tied), the rotary convention against a plain
HF-style forward, re-heading a next-token model, export round trips, bf16 frozen weights, bad directories."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

import weighted_mtp as wm
from wmtp.config import UserError
from wmtp.pretrained import HFTokenizer, export
from conftest import main_in_process, train_keeping_setup, ROOT, tiny_config

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 40,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 262,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 256, "hidden_act": "silu",
          "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257}


def random_llama(config, seed=0):
    """HF-named tensors of a random LLaMA; norms away from 1 so a swapped norm would show."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * hd
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    t = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": 1 + rand(d)}
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = rand(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                  p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                  p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                  p + "mlp.down_proj.weight": rand(d, f), p + "input_layernorm.weight": 1 + rand(d),
                  p + "post_attention_layernorm.weight": 1 + rand(d)})
    return t


def write_tokenizer(d):
    """A byte-level tokenizer.json (256 byte tokens, no merges) with <s> and </s>, named in tokenizer_config.json."""
    # sorted: alphabet() comes out of a hash set, in another order at every call (the ids, and with them the
    # losses the training tests compare, changed from run to run)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))


def write_hf(d, config, tensors, shards=1):
    """config.json + model.safetensors, or `shards` files and model.safetensors.index.json, + the tokenizer."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in names[s::shards]}, str(d / file))
            weight_map.update({n: file for n in names[s::shards]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(d)
    return d


def hf_forward(t, config, tokens):
    """LLaMA as Hugging Face computes it: rotate-half RoPE on q/k as stored, GQA by repeating kv heads."""
    d, nh = config["hidden_size"], config["num_attention_heads"]
    nkv, hd, eps = config.get("num_key_value_heads", nh), d // nh, config["rms_norm_eps"]
    B, T = tokens.shape
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    inv = 1.0 / config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotate_half = lambda x: torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    causal = torch.full((T, T), float("-inf")).triu(1)
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        w = lambda name: t[f"model.layers.{i}.{name}.weight"]
        h = rms(x, w("input_layernorm"))
        q = (h @ w("self_attn.q_proj").T).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ w("self_attn.k_proj").T).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ w("self_attn.v_proj").T).view(B, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, d) @ w("self_attn.o_proj").T
        h = rms(x, w("post_attention_layernorm"))
        x = x + (F.silu(h @ w("mlp.gate_proj").T) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    head = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
    return rms(x, t["model.norm.weight"]) @ head.T


@pytest.fixture
def hf_dir(tmp_path):
    return write_hf(tmp_path / "hf", CONFIG, random_llama(CONFIG))


CASES = {"single-gqa-untied": ({}, 1), "sharded-gqa-tied": ({"tie_word_embeddings": True}, 3),
         "single-mha-tied": ({"tie_word_embeddings": True, "num_key_value_heads": 4, "intermediate_size": 96}, 1)}


@pytest.mark.parametrize("case", CASES)
def test_hf_dir_loads_and_matches_an_hf_style_forward(tmp_path, case):
    change, shards = CASES[case]
    config = {**CONFIG, **change}
    tensors = random_llama(config, seed=len(case))
    d = write_hf(tmp_path / case, config, tensors, shards)
    tok, model = wm.load_pretrained(d)
    a = model.args
    assert (a.n_layers, a.n_future_tokens, a.n_kv_heads, a.hidden_dim) == (3, 1, config["num_key_value_heads"],
                                                                          config["intermediate_size"])
    assert (a.norm_eps, a.rope_theta, a.vocab_size, a.max_seq_len) == (1e-5, 500000.0, 262, 256)
    assert model.layers[0].feed_forward.w1.weight.shape == (config["intermediate_size"], 32)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)
    assert tok.decode(tok.encode("12+30 é")) == "12+30 é" and len(tok.encode("12+30 é")) == 8  # é is 2 bytes
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    tokens = torch.randint(0, 262, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = wm.next_token_logits(model, tokens)
    assert logits.shape == (2, 11, 262) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_forward(tensors, config, tokens), atol=1e-5, rtol=1e-5)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_bf16_weights_load_as_asked(hf_dir):
    _, model = wm.load_pretrained(hf_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, fp32 = wm.load_pretrained(hf_dir)
    assert torch.equal(model.output.weight, fp32.output.weight.bfloat16())


def test_a_next_token_model_becomes_an_h4_policy_whose_head_0_is_the_original(hf_dir, caplog):
    _, original = wm.load_pretrained(hf_dir)
    with caplog.at_level("INFO", logger="weighted_mtp"):
        _, policy = wm.load_pretrained(hf_dir, n_future_tokens=4)
    assert (f"{hf_dir}: a 1-head checkpoint as a 4-head model: the trunk keeps 2 blocks, heads 1..3 start as copies "
            "of head 0's block (layers.2)") in caplog.text
    assert len(policy.layers) == 3 and len(policy.extra_heads) == 3 and policy.args.n_layers == 6
    head0 = {k: v for k, v in policy.layers[2].state_dict().items()}
    for j in range(3):
        extra = policy.extra_heads[j].state_dict()
        assert all(torch.equal(extra[k], head0[k]) and extra[k].data_ptr() != head0[k].data_ptr() for k in head0)
    tokens = torch.randint(0, 262, (2, 9))
    assert torch.equal(wm.next_token_logits(policy, tokens), wm.next_token_logits(original, tokens))
    logits = policy.logits(tokens)
    assert all(torch.equal(logits[:, :, k], logits[:, :, 0]) for k in range(4))   # copies, until trained
    _, back = wm.load_pretrained(hf_dir, n_future_tokens=1)   # and a rho1 reference stays one head
    assert len(back.extra_heads) == 0 and back.args.n_layers == 3


def losses(tracking, run_id):
    return [m.value for m in MlflowClient(tracking).get_metric_history(run_id, "train/loss")]


# the trainer on a re-headed model as it trains from scratch: every block from step 1, equal head weights (the
# re-heading defaults that protect head 0 are tests/test_reheading.py's)
EQUAL_HEADS = ["training.new_heads_warmup_steps=0", "training.head_loss_weights=[1.0]"]
RUN = ["training.max_steps=30", "training.log_interval=5", "training.eval_interval=0", "data_sampling.n_samples=240",
       "checkpoint.save_every=0", "training.learning_rate=2e-3", *EQUAL_HEADS]


def test_an_hf_next_token_model_trains_as_h4_and_exports_both_ways_bit_for_bit(tracking, tmp_path, hf_dir):
    cfg = tiny_config("baseline", tmp_path, f"model.path={hf_dir}", "model.n_future_tokens=4", *RUN)
    result, setup = train_keeping_setup(cfg)
    loss = losses(tracking, result["run_id"])
    assert len(loss) == 6 and loss[-1] < 0.8 * loss[0]
    ckpt_path = next((tmp_path / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt"))
    trained = torch.load(ckpt_path)["model"]
    assert not torch.equal(trained["extra_heads.2.attention.wq.weight"], trained["layers.2.attention.wq.weight"])

    out = subprocess.run([sys.executable, "-m", "weighted_mtp", "export", "--checkpoint", str(ckpt_path),
                          "--format", "hf", "--out", str(tmp_path / "out" / "hf")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf"]  # no temporary dir left beside it
    assert sorted(p.name for p in (tmp_path / "out" / "hf").iterdir()) == [   # + generate()'s ids (issue 23)
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    from transformers import AutoTokenizer, GenerationConfig   # the tokenizer files copied: transformers reads them
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "hf")
    ids = HFTokenizer(hf_dir / "tokenizer.json").encode("ab+1")   # transformers encodes as the trainer does
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (256, 257) and hf_tok.decode(ids) == "ab+1"
    assert hf_tok("ab+1", add_special_tokens=False)["input_ids"] == ids
    generation = GenerationConfig.from_pretrained(tmp_path / "out" / "hf")
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (256, 257, 257)
    from transformers import AutoModelForCausalLM   # transformers' own LLaMA generates greedily as the trainer does
    from wmtp.model import generate
    auto, prompt = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf"), [256, *ids]
    ours = generate(setup.model.eval(), [prompt], 257, 257, 6)[0]   # up to and excluding EOS
    theirs = auto.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert theirs[:len(ours)] == ours and theirs[len(ours):len(ours) + 1] in ([], [257])
    tok, hf = wm.load_pretrained(tmp_path / "out" / "hf")
    assert hf.args.n_future_tokens == 1 and tok.bos_id == 256
    for key, value in hf.state_dict().items():   # head 0's model: trunk, layers.2, norm, output
        assert torch.equal(value, trained[key]), key
    export(ckpt_path, "meta", tmp_path / "out" / "meta")
    _, meta = wm.load_pretrained(tmp_path / "out" / "meta")
    assert meta.args.n_future_tokens == 4 and meta.args.hidden_dim == 40
    assert sorted(meta.state_dict()) == sorted(trained)
    for key, value in meta.state_dict().items():
        assert torch.equal(value, trained[key]), key
    tokens = torch.randint(0, 262, (2, 9))
    assert torch.equal(wm.next_token_logits(hf, tokens), wm.next_token_logits(meta, tokens))
    assert torch.equal(wm.next_token_logits(hf, tokens), wm.next_token_logits(setup.model.eval(), tokens))


def test_a_lora_run_exports_with_its_adapters_merged(tmp_path, hf_dir):
    cfg = tiny_config("baseline", tmp_path, f"model.path={hf_dir}", "model.lora.rank=2", "mlflow.enable_logging=false",
                      "checkpoint.save_every=0", *EQUAL_HEADS)
    model = train_keeping_setup(cfg)[1].model
    ckpt_path = next((tmp_path / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt"))
    assert torch.load(ckpt_path)["model_partial"]
    export(ckpt_path, "hf", tmp_path / "out")
    _, exported = wm.load_pretrained(tmp_path / "out")
    wq = model.layers[1].attention.wq
    assert wq.lora_b.abs().sum() > 0
    assert torch.equal(exported.layers[1].attention.wq.weight, wq.weight + wq.scale * (wq.lora_b @ wq.lora_a))
    tokens = torch.randint(0, 262, (2, 9))
    torch.testing.assert_close(wm.next_token_logits(exported, tokens), wm.next_token_logits(model.eval(), tokens),
                               atol=1e-5, rtol=1e-5)


def test_an_hf_reference_drives_rho1(tracking, tmp_path, hf_dir):
    smaller = {**CONFIG, "num_hidden_layers": 2}   # a reference of another size, as Sheared-LLaMA-2.7B for a 7B
    reference_dir = write_hf(tmp_path / "ref", smaller, random_llama(smaller, seed=5))
    cfg = tiny_config("rho1", tmp_path, f"model.path={hf_dir}", f"reference.path={reference_dir}", *RUN)
    result, setup = train_keeping_setup(cfg)
    reference = setup.pipeline.reference
    assert reference.args.n_layers == 2 and reference.args.n_future_tokens == 1
    assert not any(p.requires_grad for p in reference.parameters())
    loss = losses(tracking, result["run_id"])
    assert len(loss) == 6 and loss[-1] < 0.8 * loss[0]
    sparsity = [m.value for m in MlflowClient(tracking).get_metric_history(result["run_id"], "train/weight_sparsity")]
    assert all(0.3 < s < 0.5 for s in sparsity)   # k_percent 0.6 keeps 60 % of the tokens


def test_bf16_frozen_weights_lora_base_and_reference_still_learn(tracking, tmp_path, hf_dir):
    cfg = tiny_config("rho1", tmp_path, f"model.path={hf_dir}", f"reference.path={hf_dir}", "model.lora.rank=4",
                      "model.lora.alpha=8", "model.dtype=bfloat16", *RUN, "training.learning_rate=1e-2")
    result, setup = train_keeping_setup(cfg)
    dtypes = {n: p.dtype for n, p in setup.model.named_parameters()}
    assert dtypes["layers.0.attention.wq.weight"] == dtypes["tok_embeddings.weight"] == torch.bfloat16
    assert dtypes["layers.0.attention.wq.lora_a"] == dtypes["extra_heads.1.feed_forward.w2.lora_b"] == torch.float32
    assert {n for n, p in setup.model.named_parameters() if p.dtype == torch.float32} == {
        n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in setup.pipeline.reference.parameters()} == {torch.bfloat16}
    loss = losses(tracking, result["run_id"])
    assert loss[-1] < 0.9 * loss[0]


def test_a_bf16_critic_trunk_trains_its_fp32_value_head(tmp_path, hf_dir):
    cfg = tiny_config("critic", tmp_path, f"model.path={hf_dir}", "model.dtype=bfloat16", "model.init_from=",
                      "mlflow.enable_logging=false")
    model = train_keeping_setup(cfg)[1].model
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert model.value_head.weight.dtype == torch.float32 and model.value_head.weight.requires_grad


def rejected(d, message, **kw):
    with pytest.raises(UserError) as e:
        wm.load_pretrained(d, **kw)
    assert str(e.value) == message


def test_bad_hf_dirs_are_one_line_errors(tmp_path):
    tensors = random_llama(CONFIG)
    d = write_hf(tmp_path / "a", CONFIG, tensors)
    (d / "config.json").unlink()
    rejected(d, f"{d}: not a model directory (no config.json for Hugging Face, no params.json for Meta)")

    d = write_hf(tmp_path / "b", CONFIG, {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    rejected(d, f"{d}: tensors do not match config.json (missing ['model.layers.1.mlp.up_proj.weight'])")

    d = write_hf(tmp_path / "c", CONFIG, {**tensors, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)})
    rejected(d, f"{d / 'model.safetensors'}: model.layers.0.self_attn.k_proj.weight has shape (32, 32), "
                "config.json implies (16, 32)")

    d = write_hf(tmp_path / "d", {**CONFIG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, tensors)
    rejected(d, f"{d / 'config.json'}: not a LLaMA this trainer computes exactly (rope_type 'llama3')")

    d = write_hf(tmp_path / "e", {k: v for k, v in CONFIG.items() if k != "intermediate_size"}, tensors)
    rejected(d, f"{d / 'config.json'}: missing 'intermediate_size'")

    d = write_hf(tmp_path / "f", CONFIG, tensors, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors"
    index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"  # a wrong index
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    rejected(d, f"{d / 'model-00002-of-00002.safetensors'}: has no tensor model.embed_tokens.weight, which "
                "model.safetensors.index.json places there")

    d = write_hf(tmp_path / "g", CONFIG, tensors)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(UserError, match=f"^{d / 'model.safetensors'}: not a readable safetensors file"):
        wm.load_pretrained(d)


def test_the_cli_rejects_a_bad_model_dir_and_a_bad_export_in_one_line(tmp_path):
    d = write_hf(tmp_path / "hf", CONFIG, {k: v for k, v in random_llama(CONFIG).items() if k != "lm_head.weight"})
    # train's in this process (its exit 2 from a real process: test_bad_input.py); export's first is a real process
    train = main_in_process("train", "--config", str(ROOT / "configs/baseline/baseline_local.yaml"), "--override",
                            f"model.path={d}", "--override", "mlflow.enable_logging=false", cwd=tmp_path)
    assert train.returncode == 2
    assert train.stderr.strip().splitlines()[-1] == \
        f"error: {d}: tensors do not match config.json (missing ['lm_head.weight'])"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out" / "model"
    exported = subprocess.run([sys.executable, "-m", "weighted_mtp", "export", "--checkpoint",
                               str(tmp_path / "junk.pt"), "--format", "hf", "--out", str(out)],
                              cwd=tmp_path, capture_output=True, text=True)
    assert exported.returncode == 2 and len(exported.stderr.strip().splitlines()) == 1
    assert exported.stderr.startswith(f"error: {tmp_path / 'junk.pt'}: not a readable checkpoint")
    assert not out.exists() and not (tmp_path / "out").exists()
    torch.save({"model": {}}, tmp_path / "state.pt")
    exported = main_in_process("export", "--checkpoint", str(tmp_path / "state.pt"), "--format", "meta", "--out",
                               str(out), cwd=tmp_path)
    assert exported.returncode == 2
    assert exported.stderr == f"error: {tmp_path / 'state.pt'}: not a trainer checkpoint (no config, model_args)\n"
    assert not (tmp_path / "out").exists()


CHAT_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_with_bos_rule(d, rule):
    """write_tokenizer's tokenizer as transformers reads it (special tokens named by strings), whose own config adds
    BOS or not: "none" (as SmolLM2's) or "bos" (tokenizer.json's post-processor "<s> $A", as LLaMA's); and a chat
    template in chat_template.jinja, where transformers 5 writes it."""
    from tokenizers import processors
    write_tokenizer(d)
    if rule == "bos":
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
        tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").write_text(CHAT_JINJA)


@pytest.mark.parametrize("rule", ["none", "bos"])
def test_an_export_generates_the_trainers_tokens_with_stock_transformers_tied_and_with_its_chat_template(tmp_path,
                                                                                                         rule):
    transformers = pytest.importorskip("transformers")
    from wmtp.data import chat_template, encode_records
    from wmtp.evaluation import task_prompt
    from wmtp.model import generate
    config = {**CONFIG, "tie_word_embeddings": True}
    d = write_hf(tmp_path / "hf", config, random_llama(config))
    tokenizer_with_bos_rule(d, rule)
    cfg = tiny_config("baseline", tmp_path, f"model.path={d}", "model.n_future_tokens=2", "training.max_steps=2",
                      "training.eval_interval=0", "checkpoint.save_every=0", "mlflow.enable_logging=false",
                      "training.learning_rate=1e-2", "training.new_heads_warmup_steps=0")  # the tied matrix trains
    _, setup = train_keeping_setup(cfg)
    model, tok = setup.model.eval(), setup.tok
    assert model.output.weight is model.tok_embeddings.weight  # tied while training: one matrix, trained as one
    from wmtp.pretrained import empty_model
    twin = empty_model(model.args).to_empty(device="cpu")  # how FSDP materialises a model built on the meta device
    assert twin.output.weight is twin.tok_embeddings.weight
    assert tok.prefix_ids == ([] if rule == "none" else [256])
    ckpt_path = next((tmp_path / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt"))
    trained = torch.load(ckpt_path)["model"]
    assert torch.equal(trained["output.weight"], trained["tok_embeddings.weight"])
    assert not torch.equal(trained["tok_embeddings.weight"], random_llama(config)["model.embed_tokens.weight"])
    out = export(ckpt_path, "hf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # no duplicate weight
    assert (out / "chat_template.jinja").read_text() == CHAT_JINJA and chat_template(out) == CHAT_JINJA
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    auto = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert auto.lm_head.weight.data_ptr() == auto.model.embed_tokens.weight.data_ptr()  # tied there too
    for text in ("def f(x):", "12+30\n", "ab"):
        prompt = tok.prefix_ids + tok.encode(text)
        assert hf_tok(text)["input_ids"] == prompt  # the same BOS rule as stock transformers
        ours = generate(model, [prompt], tok.eos_id, tok.pad_id, 8)[0]
        theirs = auto.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
        assert theirs[:len(ours)] == ours and theirs[len(ours):len(ours) + 1] in ([], [257])
    # the chat template is used: training renders it, evaluate's chat prompt is transformers' own
    e = tiny_config("baseline", tmp_path, "eval.prompt=chat").eval
    record = {"instruction": "Write f.", "output": "def f(): pass", "task_id": "t"}
    ids = task_prompt(record, tok, e, "alpaca", chat_template(out))
    theirs = hf_tok.apply_chat_template([{"role": "user", "content": "Write f.\n"}], add_generation_prompt=True)
    assert ids == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    [(train_ids, labels, _, _)], _ = encode_records([record], tok, 512, "error", "x", "chat", chat_template(d))
    assert tok.decode(train_ids) == ("<|im_start|>user\nWrite f.\n<|im_end|>\n<|im_start|>assistant\n"
                                     "def f(): pass<|im_end|>\n")
    assert train_ids[:len(ids)] == ids and train_ids[-1] == tok.eos_id


def test_a_tied_model_written_as_a_meta_dir_reads_back_tied(tmp_path):
    """params.json's tie_word_embeddings is honoured: the Meta dir of a tied model loads as one matrix (load_pretrained)
    and the sharded path's tensors (pretrained_params) fill the embedding and the output from equal tensors."""
    from wmtp.pretrained import pretrained_params, save_meta
    config = {**CONFIG, "tie_word_embeddings": True}
    _, tied = wm.load_pretrained(write_hf(tmp_path / "hf", config, random_llama(config)), n_future_tokens=2)
    save_meta(tied, tmp_path / "meta")
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["tie_word_embeddings"] is True
    _, back = wm.load_pretrained(tmp_path / "meta")
    assert back.args.n_future_tokens == 2 and back.output.weight is back.tok_embeddings.weight
    assert torch.equal(back.output.weight, tied.tok_embeddings.weight)
    groups = {name: t for group in pretrained_params(tmp_path / "meta", 2) for name, t in group.items()}
    assert torch.equal(groups["output.weight"], groups["tok_embeddings.weight"])
