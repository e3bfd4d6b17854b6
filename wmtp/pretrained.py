"""
Models in and out: tokenizers (bytes, sentencepiece, tokenizer.json), Meta dirs (params.json + consolidated.pth)
and Hugging Face LLaMA dirs (config.json + safetensors) loaded into a model built on the meta device, tensor by
tensor (no rank ever makes a random full-size model first), the micro model, and export back to either format.
"""
import contextlib
import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
import shutil
import tempfile

import s3ckpt
import torch

from wmtp.config import config_from_dict, load_config, tracking_uri, UserError
from wmtp.model import LoRALinear, ModelArgs, MTPTransformer, ValueModel, apply_lora, init_parts, lora_a_init


log = logging.getLogger("weighted_mtp")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS/EOS/PAD: needs no vocabulary file, so the micro model runs anywhere. A text
    starts with BOS (prefix_ids), as its exported tokenizer.json says."""
    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259
    prefix_ids, special_text = [256], {}

    def encode(self, text):
        """text -> its UTF-8 bytes as ids 0..255; no BOS (the caller adds prefix_ids)."""
        return list(text.encode("utf-8"))

    def decode(self, ids):
        """ids -> text: BOS/EOS/PAD (>= 256) dropped, invalid UTF-8 replaced by U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """Meta's tokenizer.model; sentencepiece is an optional extra, imported only here."""

    def __init__(self, path):
        try:
            import sentencepiece
        except ImportError:
            raise UserError(f"model.tokenizer: {path} needs the sentencepiece package (pip install sentencepiece)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()
        self.pad_id = self.eos_id  # pads sit after EOS and are masked out of every loss, so any id will do
        self.prefix_ids, self.special_text = [self.bos_id], {}  # Meta's rule: every text starts with BOS

    def encode(self, text):
        """text -> ids; no BOS (the caller adds prefix_ids)."""
        return self.sp.encode(text)

    def decode(self, ids):
        """ids -> text, by sentencepiece's own decode."""
        return self.sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face tokenizer.json (the `tokenizers` package). BOS/EOS are the tokens tokenizer_config.json names
    beside it, else the ids in config.json. encode() adds no special token; prefix_ids are what the tokenizer's own
    config puts before a text (bos_prefix), so that the trainer starts a text as transformers' AutoTokenizer does."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable tokenizer.json ({e})")
        self.bos_id, self.eos_id = special_ids(Path(path).parent, self.tok)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self.eos_id  # as for sentencepiece: pads are masked out of every loss
        self.prefix_ids = bos_prefix(self.tok, self.bos_id)
        # a chat template's {{ bos_token }} / {{ eos_token }}: their text, which encode() reads back as the token
        self.special_text = {"bos_token": self.tok.id_to_token(self.bos_id) or "",
                             "eos_token": self.tok.id_to_token(self.eos_id) or ""}

    def encode(self, text):
        """text -> ids, no special token added (the caller adds prefix_ids)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """ids -> text, special tokens left out."""
        return self.tok.decode(list(ids), skip_special_tokens=True)


def read_json(path):
    """The JSON value in the file at `path`; an unreadable file or bad JSON is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})")


def special_ids(model_dir, tok):
    """[BOS id, EOS id]: the tokens tokenizer_config.json names, else config.json's bos/eos_token_id."""
    names = read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").exists() else {}
    config = read_json(model_dir / "config.json") if (model_dir / "config.json").exists() else {}
    ids = []
    for which in ("bos", "eos"):
        name = names.get(f"{which}_token")
        name = name.get("content") if isinstance(name, dict) else name
        token_id = tok.token_to_id(name) if isinstance(name, str) else None
        token_id = config.get(f"{which}_token_id") if token_id is None else token_id
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id  # LLaMA 3.1 lists its EOS ids
        if not isinstance(token_id, int):
            raise UserError(f"{model_dir}: no {which.upper()} token (name it as {which}_token in tokenizer_config.json "
                            f"or give {which}_token_id in config.json)")
        ids.append(token_id)
    return ids


def bos_prefix(tok, bos_id):
    """[BOS] or []: whether tokenizer.json's post-processor puts BOS before a text, as transformers' AutoTokenizer
    then does (LLaMA's and Mistral's add <s>, LLaMA 3's <|begin_of_text|>, SmolLM2's nothing). A generic
    tokenizer_config.json's add_bos_token is not read: transformers 5 ignores it too."""
    text = tok.encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    full = tok.encode(TOKENIZER_PROBE, add_special_tokens=True).ids
    return [bos_id] if full[:1] == [bos_id] and full[1:len(text) + 1] == text else []


def load_tokenizer(explicit, model_dir):
    """model.tokenizer when given (a tokenizer.json, or a sentencepiece .model), else the model dir's tokenizer.model
    or tokenizer.json, whichever it has; None when it has neither."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise UserError(f"model.tokenizer: {path} does not exist")
    else:
        found = [p for p in (Path(model_dir) / "tokenizer.model", Path(model_dir) / "tokenizer.json") if p.exists()]
        if not found:
            return None
        path = found[0]
    return HFTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_state(model, state, source, partial=False):
    """Load `state` into `model`, strictly but for value-head and LoRA keys (absent from policy checkpoints and
    Meta files, freshly initialised then) — and any key when `partial` (a LoRA run saves only what it trains);
    a mismatch is a UserError naming the source and the keys. A model on the meta device takes the tensors
    themselves (assign), in their dtype; a materialised one copies them into its own."""
    check_state(model, state, source, partial)
    model.load_state_dict(state, strict=False, assign=any(p.is_meta for p in model.parameters()))
    for m in model.modules():  # assigning replaced the parameters: tie a tied model's output to its embedding again
        if isinstance(m, MTPTransformer):
            m.tie()


def check_state(model, state, source, partial=False):
    """load_state's checks alone (names and shapes; nothing is read): a model sharded on the meta device is
    filled from checked checkpoints rows by rows (parallel.fill_shards)."""
    own = model.state_dict()
    optional = lambda k: partial or k.startswith("value_head.") or ".lora_" in k
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not optional(k)]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        problems = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"shape {shapes[:2]}" if shapes else ""]
        raise UserError(f"{source}: does not match the model ({'; '.join(p for p in problems if p)}) "
                        "— another model size?")


def empty_model(args, value_head=False, memory_efficient_loss=True):
    """The architecture without storage (on torch's meta device): shapes to check against, and a model for
    load_state to fill."""
    with torch.device("meta"):
        return MTPTransformer(args, value_head, memory_efficient_loss)


def model_args_from_meta(model_dir):
    """ModelArgs from a Meta dir's params.json, its keys that ModelArgs lacks ignored; unreadable is a UserError."""
    path = Path(model_dir) / "params.json"
    params = read_json(path)
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in params.items() if k in known})


def read_consolidated(model_dir):
    """(path, state) of a Meta dir's consolidated.pth, memory-mapped; unreadable is a one-line UserError."""
    path = Path(model_dir) / "consolidated.pth"
    try:
        return path, torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})")


def read_meta_dir(model_dir, dtype):
    """(args, state) of a Meta dir: checked against params.json, each tensor copied out of the memory-mapped file
    in `dtype` (so the model never holds pages of a file that may be replaced)."""
    args = model_args_from_meta(model_dir)
    path, state = read_consolidated(model_dir)
    load_state(empty_model(args), state, f"{path} (vs params.json)")  # shapes only: nothing is allocated
    return args, {k: v.to(dtype, copy=True) for k, v in state.items()}


HF_BLOCK = [("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
            ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
            ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
            ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
            ("post_attention_layernorm", "ffn_norm")]


def hf_key_map(n_layers, tied):
    """{Hugging Face tensor name: Meta name} for a next-token LLaMA of n_layers blocks."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"layers.{i}.{meta}.weight" for hf, meta in HF_BLOCK})
    return names


def rotary_to_meta(w, n_heads):
    """HF orders each head's q/k rows as [first halves | second halves] for its rotate-half RoPE; Meta interleaves
    the pairs: HF row h·d + c·d/2 + i is Meta row h·d + 2i + c (inverse of transformers' conversion `permute`)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def rotary_to_hf(w, n_heads):
    """rotary_to_meta's inverse, for export: Meta row h·d + 2i + c is HF row h·d + c·d/2 + i."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def model_args_from_hf(model_dir):
    """ModelArgs of a one-head model (tie_word_embeddings included) from config.json; what we cannot compute is an
    error."""
    path = Path(model_dir) / "config.json"
    c = read_json(path)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers >= 5 keeps rope_theta in there
    rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    try:
        dim, n_heads = c["hidden_size"], c["num_attention_heads"]
        n_kv = c.get("num_key_value_heads") or n_heads
        args = ModelArgs(dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
                         vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                         norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
                         max_seq_len=c.get("max_position_embeddings"), n_future_tokens=1,
                         tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise UserError(f"{path}: missing {e}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = [(c.get("model_type", "llama") == "llama", f"model_type {c.get('model_type')!r}"),
              (c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}"),
              (not c.get("attention_bias") and not c.get("mlp_bias"), "biases"),
              (rope_type == "default", f"rope_type {rope_type!r}"),
              (c.get("head_dim", dim // n_heads) == dim // n_heads, f"head_dim {c.get('head_dim')} != {dim}/{n_heads}"),
              (dim % (2 * n_heads) == 0 and n_heads % n_kv == 0, f"{n_heads} heads, {n_kv} kv heads of dim {dim}")]
    unsupported = [what for ok, what in checks if not ok]
    if unsupported:
        raise UserError(f"{path}: not a LLaMA this trainer computes exactly ({', '.join(unsupported)})")
    return args


def hf_weight_files(model_dir):
    """{tensor name: safetensors file}: the shards model.safetensors.index.json names, or model.safetensors."""
    from safetensors import safe_open
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' of tensor names to files")
        return {name: Path(model_dir) / file for name, file in weight_map.items()}
    single = Path(model_dir) / "model.safetensors"
    if not single.exists():
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                        "(a pytorch_model.bin must be converted to safetensors first)")
    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {name: single for name in f.keys()}
    except Exception as e:
        raise UserError(f"{single}: not a readable safetensors file ({e})")


def read_hf_dir(model_dir, dtype):
    """(args, state in Meta names) of a Hugging Face LLaMA dir (hf_tensors); a tied lm_head is the embedding itself
    (the model ties them: MTPTransformer.tie)."""
    args = model_args_from_hf(model_dir)
    state = dict(hf_tensors(model_dir, args, args.tie_word_embeddings, dtype))
    if args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return args, state


def hf_tensors(model_dir, args, tied, dtype=None):
    """(Meta name, tensor) of a Hugging Face LLaMA dir, one at a time. Names and shapes are checked against
    config.json before any tensor is read; then the memory-mapped files give each tensor, cast to dtype (None: as
    stored), q/k rows put back in Meta's RoPE order."""
    from safetensors import safe_open
    names, files = hf_key_map(args.n_layers, tied), hf_weight_files(model_dir)
    ignored = {n for n in files if n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")}
    missing = [n for n in names if n not in files]
    unexpected = [n for n in files if n not in names and n not in ignored]
    if missing or unexpected:
        what = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        raise UserError(f"{model_dir}: tensors do not match config.json ({'; '.join(w for w in what if w)})")
    expected = empty_model(args).state_dict()
    for path in sorted(set(files[n] for n in names)):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})")
        for name in [n for n in names if files[n] == path]:
            meta = names[name]
            if name not in f.keys():
                raise UserError(f"{path}: has no tensor {name}, which model.safetensors.index.json places there")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(expected[meta].shape):
                raise UserError(f"{path}: {name} has shape {shape}, config.json implies {tuple(expected[meta].shape)}")
            w = f.get_tensor(name)
            w = w.to(dtype) if dtype else w
            if meta.endswith(("wq.weight", "wk.weight")):
                w = rotary_to_meta(w, args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads)
            yield meta, w


def reheaded(args, H):
    """(ModelArgs, targets) of a checkpoint of shape `args` re-headed for H future tokens (Gloeckle et al.'s
    fine-tuning setting): the trunk and head 0 stay; a head the checkpoint lacks starts as a copy of head 0's block
    (the last of `layers`), so head 0 still gives the checkpoint's own logits; heads beyond H are dropped.
    targets: {the checkpoint's tensor name: [the names it fills in the H-head model]}. The one re-heading: of a
    state (with_heads), of a dir's tensors read one at a time (pretrained_params) and of a shape alone."""
    own, names = args.n_future_tokens, empty_model(args).state_dict()
    head0 = f"layers.{args.n_layers - own}."
    targets = {k: [] if k.startswith("extra_heads.") and int(k.split(".")[1]) >= H - 1 else [k] for k in names}
    for k in names:
        if k.startswith(head0):
            targets[k] += [f"extra_heads.{j}.{k[len(head0):]}" for j in range(own - 1, H - 1)]
    return dataclasses.replace(args, n_layers=args.n_layers - own + H, n_future_tokens=H), targets


def with_heads(args, state, H, source):
    """(args, state) re-headed for H future tokens (reheaded): a head's copy of head 0 is a tensor of its own."""
    own = args.n_future_tokens
    if H == own:
        return args, state
    args_h, targets = reheaded(args, H)
    state = {name: v if name == k else v.clone() for k, v in state.items() for name in targets.get(k, [k])}
    n_blocks = args.n_layers - own + 1  # trunk + head 0
    change = (f"heads {own}..{H - 1} start as copies of head 0's block (layers.{n_blocks - 1})" if H > own
              else f"heads {H}..{own - 1} dropped")
    log.info(f"{source}: a {own}-head checkpoint as a {H}-head model: the trunk keeps {n_blocks - 1} blocks, {change}")
    return args_h, state


def load_pretrained(path, n_future_tokens=None, dtype=torch.float32, value_head=False, memory_efficient_loss=True,
                    tokenizer=""):
    """(tokenizer or None, model) of a Meta or Hugging Face LLaMA directory, on the CPU, its weights in `dtype`
    (a value head, when asked for, fresh and fp32). n_future_tokens=None keeps the checkpoint's own head count,
    another H re-heads it (with_heads). `tokenizer`: a file to use instead of the directory's own."""
    d = Path(path)
    hf = dir_format(d) == "hf"  # first: a dir that is neither is an error before any tokenizer is read
    tok = load_tokenizer(tokenizer, d)
    args, state = read_hf_dir(d, dtype) if hf else read_meta_dir(d, dtype)
    args, state = with_heads(args, state, n_future_tokens or args.n_future_tokens, d)
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise UserError(f"{d}: its tokenizer has {tok.vocab_size} tokens, the model only {args.vocab_size}")
    model = empty_model(args, value_head, memory_efficient_loss)
    load_state(model, state, str(d))
    if value_head:
        model.value_head.to_empty(device="cpu")
        model.value_head.reset_parameters()
    return tok, model


def is_model_dir(path):
    """Whether `path` is a Meta (params.json) or Hugging Face (config.json) model dir."""
    return bool(path) and ((Path(path) / "params.json").exists() or (Path(path) / "config.json").exists())


def dir_format(path):
    """"hf" when the dir has a config.json, else "meta" when it has a params.json: the one precedence by which
    every reader of a model dir (weights, shape, memory plan) reads a dir holding both."""
    d = Path(path)
    if (d / "config.json").exists():
        return "hf"
    if (d / "params.json").exists():
        return "meta"
    raise UserError(f"{d}: not a model directory (no config.json for Hugging Face, no params.json for Meta)")


def dir_args(path):
    """ModelArgs of a Meta or Hugging Face dir as stored (dir_format's precedence), read from its config alone."""
    return model_args_from_hf(path) if dir_format(path) == "hf" else model_args_from_meta(path)


def load_reference(path, vocab_size, dtype, meta=False):
    """rho1's reference from a Meta or HF dir: its own architecture and size, one head, frozen weights in dtype
    (meta: its shape alone, on the meta device; pretrained_params(path, 1) fills it)."""
    if meta:
        reference = empty_model(pretrained_args(path, 1)).to(dtype)
    else:
        _, reference = load_pretrained(path, n_future_tokens=1, dtype=dtype)
    if reference.args.vocab_size != vocab_size:
        raise UserError(f"reference.path: {path} has a vocabulary of {reference.args.vocab_size}, the policy "
                        f"{vocab_size}: the reference must share the policy's tokenizer")
    log.info(f"rho1 reference: {path} ({reference.args.n_layers} blocks, one head, {dtype})")
    return reference


def next_token_logits(model, tokens):
    """tokens [B,T] -> head 0's logits [B,T,V] in float32: the next-token distribution at every position."""
    return model.logits(tokens.to(model.tok_embeddings.weight.device), n_heads=1)[:, :, 0].float()


def cast_frozen(model, dtype):
    """Frozen weights (a LoRA base, the critic's trunk) in `dtype` — bf16 halves them; trainable ones stay fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


TOKENIZER_PROBE = "def f(x): return x * 2 + 1\n07+35 = 42, caf\u00e9"


def tokenizer_mismatch(a, b):
    """Why two tokenizers differ ('' when they agree): vocabulary size, BOS/EOS ids, the ids of a probe text."""
    for what, x, y in (("vocabulary size", a.vocab_size, b.vocab_size), ("BOS/EOS", (a.bos_id, a.eos_id),
                       (b.bos_id, b.eos_id)), ("ids of a probe text", a.encode(TOKENIZER_PROBE),
                                                 b.encode(TOKENIZER_PROBE))):
        if x != y:
            return f"{what} {str(x)[:40]} != {str(y)[:40]}"
    return ""


def build_value_model(cfg, policy, tok):
    """critic.model copy (a deep copy of `policy`, the starting policy) or a Meta/HF dir with the policy's tokenizer,
    as a ValueModel: trunk frozen (in model.dtype), LoRA (critic.lora) or fully trained; head and loss per critic.*.
    Its weights are the starting ones: a trained critic's are loaded over them (load_checkpoint_into)."""
    c = cfg.critic
    if c.model == "copy":
        trunk = copy.deepcopy(policy)
    else:
        vtok, trunk = load_pretrained(c.model, n_future_tokens=1)
        policy_tok = cfg.model.tokenizer or cfg.model.path or "the byte tokenizer"
        if vtok is None:
            raise UserError(f"critic.model: {c.model} has no tokenizer to compare with the policy's ({policy_tok})")
        why = tokenizer_mismatch(tok, vtok)
        if why:
            raise UserError(f"critic.model: the tokenizer of {c.model} differs from the policy's ({policy_tok}): "
                            f"{why}")
    value_model = ValueModel(trunk, c.head, logprob=c.features == "hidden+logprob", squash=c.loss != "mse")
    trunk.requires_grad_(c.trunk == "full")
    if c.trunk == "lora":
        apply_lora(trunk, c.lora.rank, c.lora.alpha)
    cast_frozen(trunk, DTYPES[cfg.model.dtype])
    return value_model


def micro_args(cfg, vocab_size):
    """ModelArgs of the micro model: model.micro's shape with n_trunk_layers + H blocks (H = model.n_future_tokens),
    its vocabulary model.micro.vocab_size, else `vocab_size` (the tokenizer's)."""
    m, H = cfg.model.micro, cfg.model.n_future_tokens
    return ModelArgs(dim=m.dim, n_layers=m.n_trunk_layers + H, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                     vocab_size=m.vocab_size or vocab_size, multiple_of=m.multiple_of, norm_eps=m.norm_eps,
                     rope_theta=m.rope_theta, n_future_tokens=H)


def check_micro(cfg, use_micro):
    """--use-micro-model (./run.sh --local) trains the micro model: a model.path or model.tokenizer it would ignore is
    an error, so the recorded params are what ran."""
    ignored = [f"model.{k}={getattr(cfg.model, k)}" for k in ("path", "tokenizer") if getattr(cfg.model, k)]
    if use_micro and ignored:
        raise UserError(f"{' and '.join(ignored)} would be ignored: --use-micro-model (./run.sh --local) trains the "
                        f"micro model; drop --local/--use-micro-model to train that model, or drop the setting")


def build_model(cfg, use_micro, value_head, meta=False):
    """(tokenizer, model): the micro model (random init from training.seed, byte tokenizer) or model.path (a Meta
    or HF dir, re-headed to model.n_future_tokens), with LoRA adapters when model.lora.rank > 0 — built before any
    checkpoint loads into it. Under LoRA the frozen base is held in model.dtype (read straight into it).
    meta: the same model on the meta device, no weight read or drawn; initial_params gives its weights."""
    mcfg = cfg.model
    check_micro(cfg, use_micro)
    torch.manual_seed(cfg.training.seed)  # every rank builds the same initial weights
    lora, frozen = mcfg.lora.rank > 0, DTYPES[mcfg.dtype]
    with torch.device("meta") if meta else contextlib.nullcontext():
        if use_micro or not mcfg.path:
            tok = ByteTokenizer()
            model = MTPTransformer(micro_args(cfg, tok.vocab_size), value_head, mcfg.memory_efficient_loss)
        else:
            tok, model = load_model_dir(mcfg, value_head, frozen if lora else torch.float32, meta)
        if lora:
            apply_lora(model, mcfg.lora.rank, mcfg.lora.alpha)
            cast_frozen(model, frozen)
    return tok, model


def added_heads(cfg, use_micro):
    """The heads that re-heading model.path adds (with_heads: they start as copies of head 0): own..H-1, where
    own is the directory's head count (1 for a Hugging Face dir); none for the micro model."""
    if use_micro or not cfg.model.path:
        return range(0)
    return range(dir_args(cfg.model.path).n_future_tokens, cfg.model.n_future_tokens)


def pretrained_args(path, H):
    """ModelArgs of a Meta or HF dir re-headed to H heads (reheaded), from its config alone (dir_args): the shape
    training builds and the memory plan plans."""
    return reheaded(dir_args(path), H)[0]


def load_model_dir(mcfg, value_head, dtype=torch.float32, meta=False):
    """model.path, a Meta or Hugging Face dir, with its tokenizer (model.tokenizer, else the dir's own); meta: its
    shape alone, on the meta device, in dtype (a value head in fp32)."""
    if meta:
        tok = load_tokenizer(mcfg.tokenizer, mcfg.path)
        model = empty_model(pretrained_args(mcfg.path, mcfg.n_future_tokens), value_head,
                                  mcfg.memory_efficient_loss)
        for name, p in model.named_parameters():
            p.data = p.data if name.startswith("value_head.") else p.data.to(dtype)
        if tok is not None and tok.vocab_size > model.args.vocab_size:
            raise UserError(f"{mcfg.path}: its tokenizer has {tok.vocab_size} tokens, the model only "
                            f"{model.args.vocab_size}")
    else:
        tok, model = load_pretrained(mcfg.path, mcfg.n_future_tokens, dtype, value_head,
                                     mcfg.memory_efficient_loss, mcfg.tokenizer)
    if tok is None:
        raise UserError(f"model.tokenizer: {mcfg.path} has no tokenizer.model or tokenizer.json "
                        "(set model.tokenizer)")
    return tok, model


def pretrained_params(path, H):
    """A Meta or HF dir's weights for an H-head model as groups {name: tensor} of one checkpoint tensor each (as
    stored; with the names it fills, reheaded): a Meta consolidated.pth memory-mapped, each tensor's pages
    released once its group is consumed; a Hugging Face dir through hf_tensors."""
    d, args = Path(path), dir_args(path)
    tied = dir_format(d) == "hf" and args.tie_word_embeddings  # a Meta file holds output.weight itself
    if dir_format(d) == "hf":
        tensors, mapped = hf_tensors(d, args, tied), False
    else:
        file, state = read_consolidated(d)
        check_state(empty_model(args), state, f"{file} (vs params.json)")
        tensors, mapped = state.items(), True
    targets = reheaded(args, H)[1]
    if tied:
        targets["tok_embeddings.weight"].append("output.weight")
    for name, tensor in tensors:
        yield {target: tensor for target in targets[name]}
        if mapped:
            s3ckpt.release_pages(tensor)


def initial_params(cfg, use_micro, model):
    """The weights build_model(cfg, use_micro, ...) starts `model` (its twin on the meta device) with, as groups
    {name: full tensor} of at most one block: the micro model's random init drawn part by part in its
    constructor's order (init_parts), or model.path's tensors (pretrained_params); then the value head's and the
    LoRA adapters' random init, drawn as build_model draws them. For parallel.fill_shards."""
    mcfg, value_head = cfg.model, model.value_head is not None
    torch.manual_seed(cfg.training.seed)
    if use_micro or not mcfg.path:
        for prefix, part in init_parts(model.args, value_head):
            group = {f"{prefix}.{k}": v for k, v in part.state_dict().items()}
            del part  # the next part is drawn once this one is gone (fill_shards drops its own references too)
            yield group
    else:
        yield from pretrained_params(mcfg.path, mcfg.n_future_tokens)
        if value_head:
            yield {f"value_head.{k}": v for k, v in torch.nn.Linear(model.args.dim, 1).state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield {f"{name}.lora_a": lora_a_init(*m.lora_a.shape), f"{name}.lora_b": torch.zeros(m.lora_b.shape)}


def merged_state(model):
    """The policy's weights in Meta names: LoRA merged into its base, the value head left out."""
    state = {f"{name}.weight": m.merged_weight().detach()
             for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, value in model.state_dict().items():
        if not key.startswith("value_head.") and ".lora_" not in key:
            state.setdefault(key, value.detach())
    return {k: v.cpu() for k, v in state.items()}


def save_meta(model, out_dir):
    """Write params.json + consolidated.pth in Meta's layout: LoRA merged in, value head left out; params.json
    holds only the fields that are set, as Meta's own do."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "consolidated.pth.tmp"
    torch.save(merged_state(model), tmp)
    os.replace(tmp, out_dir / "consolidated.pth")
    params = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))


def save_hf(model, out_dir, tok=None, max_shard_bytes=5 * 2**30):
    """Write a Hugging Face LLaMA dir of head 0's next-token model (HF's LLaMA has no extra heads: Meta's format
    keeps them): config.json + model.safetensors, or shards + model.safetensors.index.json past max_shard_bytes.
    A tied model stays tied: tie_word_embeddings true and no lm_head tensor."""
    from safetensors.torch import save_file
    a, meta = model.args, merged_state(model)
    n_blocks = a.n_layers - a.n_future_tokens + 1
    state = {}
    for hf, name in hf_key_map(n_blocks, tied=a.tie_word_embeddings).items():
        w = meta[name]
        if name.endswith(("wq.weight", "wk.weight")):
            w = rotary_to_hf(w, a.n_heads if name.endswith("wq.weight") else a.n_kv_heads or a.n_heads)
        state[hf] = w.contiguous()
    shards, size = [[]], 0
    for name, w in state.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += w.nbytes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({n: state[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in state.values())},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": meta["layers.0.feed_forward.w1.weight"].shape[0], "num_hidden_layers": n_blocks,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads or a.n_heads,
              "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "hidden_act": "silu",
              "tie_word_embeddings": a.tie_word_embeddings,
              "torch_dtype": str(meta["norm.weight"].dtype).removeprefix("torch.")}
    config.update({"max_position_embeddings": a.max_seq_len} if a.max_seq_len else {})
    config.update({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
                  if tok is not None else {})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def policy_from_checkpoint(state, cfg, use_micro, source):
    """The policy a trainer checkpoint holds, value head dropped. A full one needs only its model_args; a LoRA one
    (model_partial) is its adapters over the base model.path (or the micro model's seeded init), rebuilt in fp32."""
    args = ModelArgs(**s3ckpt.checkpoint_part(state, "about")["model_args"])
    part = s3ckpt.checkpoint_part(state, "model")
    weights = {k: v for k, v in part["model"].items() if not k.startswith("value_head.")}
    if not part.get("model_partial"):
        model = empty_model(args)
        load_state(model, weights, source)
        return model
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    _, model = build_model(cfg, use_micro, value_head=False)
    if model.args != args:
        raise UserError(f"{source}: trained on {args}, but its config rebuilds {model.args} as the LoRA base "
                        "(pass the run's --config, or --use-micro-model for a micro-model run)")
    load_state(model, weights, source, partial=True)
    return model


def copy_tokenizer_files(source, out_dir):
    """The tokenizer (a given file, or the dir's tokenizer.model / tokenizer.json, whose post-processor says whether
    a text starts with BOS), the JSON beside it that names BOS/EOS, and chat_template.jinja, so that an exported dir
    is complete and tokenizes as the trainer did."""
    folder = source if source.is_dir() else source.parent
    names = ["tokenizer.model", "tokenizer.json"] if source.is_dir() else [source.name]
    for name in names + ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, Path(out_dir) / name)
    config = Path(out_dir) / "tokenizer_config.json"
    if config.is_file():  # {"content": ...} without "__type": AddedToken is ours to read, not transformers': a string
        names = read_json(config)
        config.write_text(json.dumps({k: v["content"] if k.endswith("_token") and isinstance(v, dict) and "__type"
                                      not in v and "content" in v else v for k, v in names.items()}, indent=2))


def byte_to_char():
    """GPT-2's printable stand-in for each byte (what the tokenizers library's ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def save_byte_tokenizer(out_dir, tok):
    """The micro model's ByteTokenizer as a Hugging Face tokenizer.json, built with the tokenizers library: byte b
    is id b (ByteLevel's stand-ins, no merges), <s>/</s>/<pad> are ids 256/257/258, and encoding adds <s> as
    training does; tokenizer_config.json names the three for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    hf = Tokenizer(models.BPE(vocab={c: b for b, c in byte_to_char().items()}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    hf.add_special_tokens(list(names.values()))
    assert [hf.token_to_id(n) for n in names.values()] == [tok.bos_id, tok.eos_id, tok.pad_id]
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_id)])
    hf.save(str(Path(out_dir) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, **names}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_generation_config(out_dir, tok):
    """generation_config.json: the ids generate() starts, stops and pads with."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    (Path(out_dir) / "generation_config.json").write_text(json.dumps({"_from_model_config": False, **ids}, indent=2))


def follow_umask(root):
    """Modes as any new file gets them (0666 / 0777 less the umask): mkdtemp made the dir private, 0700."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def fetch_checkpoint(checkpoint):
    """A checkpoint's state from a path, an s3:// or a runs:/ URI. A download goes to a private temporary dir removed
    once loaded: a cache at a fixed name in the shared temp dir is any local user's to plant a link or a file in."""
    with tempfile.TemporaryDirectory(prefix="wmtp-export-") as cache:
        try:
            return s3ckpt.load_checkpoint(s3ckpt.resolve_checkpoint(checkpoint, cache, tracking_uri=tracking_uri()))
        except s3ckpt.CheckpointError as e:
            raise UserError(str(e))


def export(checkpoint, fmt, out, config="", use_micro=False):
    """Write a trainer checkpoint's policy (LoRA merged, value head left out) as a Hugging Face or Meta model dir,
    with the base model's tokenizer files. Everything goes to a temporary dir renamed to `out` at the end: an
    error leaves nothing behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory")
    state = fetch_checkpoint(checkpoint)
    lacking = [k for k in ("model", "config", "model_args") if not isinstance(state, dict) or k not in state]
    if lacking:
        raise UserError(f"{checkpoint}: not a trainer checkpoint (no {', '.join(lacking)})")
    cfg = load_config(config) if config else config_from_dict(s3ckpt.checkpoint_part(state, "about")["config"],
                                                              f"{checkpoint} (its config)")
    model = policy_from_checkpoint(state, cfg, use_micro, checkpoint)
    mcfg = cfg.model
    micro = use_micro or not mcfg.path
    tok = ByteTokenizer() if micro else load_tokenizer(mcfg.tokenizer, mcfg.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "hf":
            save_hf(model, tmp, tok)
            save_generation_config(tmp, tok)
        else:
            save_meta(model, tmp)
        if micro and fmt == "hf":
            save_byte_tokenizer(tmp, tok)
        elif not micro:
            copy_tokenizer_files(Path(mcfg.tokenizer or mcfg.path), tmp)
        follow_umask(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    heads = "head 0 (HF's LLaMA has no extra heads)" if fmt == "hf" else f"{model.args.n_future_tokens} heads"
    log.info(f"exported {checkpoint} -> {out} ({fmt}: {heads}{', LoRA merged' if state.get('model_partial') else ''})")
    return out
