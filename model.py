"""A Llama-family transformer in plain PyTorch, and its checkpoints in the Hugging Face layout.

Covers the checkpoints the StepAgent paper's agents are built on (Llama 2/3, Mistral, Qwen2) and
SmolLM2. Parameter names follow Hugging Face's `LlamaForCausalLM`, so a safetensors checkpoint maps
one to one; RoPE is the rotate-half form, so no q/k permutation is needed.

    ModelArgs.from_hf(config)           config.json -> dataclass; unsupported values are errors
    Transformer                         forward(tokens, input_pos, mask, slots) -> logits (B, T, V)
    BlockMask                           a packed row's attention pattern, attended block by block
    token_logprobs(...)                 log-probs of chosen target tokens, what every loss uses
    load_model(dir) / save_model(...)   the Hugging Face layout (sharded or not), checked by name

Sampling is in generate.py, the tokenizer and chat formats in tokenizer.py, GGUF conversion in
convert_gguf.py. Departures from Hugging Face: the attention mask is an explicit boolean (B, T, S)
"may attend" tensor (or a BlockMask) and positions are explicit, so packed and tree-shaped rows
(stepagent.pack_row) are ordinary calls; sliding-window attention is not implemented (a config that
would need it is refused).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import BlockMask, KVCache, prefix_attention
from tokenizer import Tokenizer

# Denormal floats (below 1.2e-38) cost x86 CPUs a slow path per operation; a won DPO pair fills the
# backward pass with them (`python bench.py denormals`). Flushed to zero here, at import, because
# torch's CPU worker threads copy the setting only when they start.
torch.set_flush_denormal(True)


# ----------------------------------------------------------------------------- config


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    max_seq_len: int = 4096  # max_position_embeddings
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v biases (Qwen2; `attention_bias` for Llama)
    o_bias: bool = False  # o_proj bias (Llama's `attention_bias` covers it too)
    mlp_bias: bool = False
    hf_config: dict = field(default_factory=dict, repr=False)  # the original, written back on save

    @staticmethod
    def from_hf(cfg: dict, max_seq_len: int | None = None, where: str = "config.json") -> "ModelArgs":
        """Build from a Hugging Face config dict; `where` names the file in error messages."""
        def bad(field_name, why):
            return ValueError(f"{where}: field {field_name!r} {why}")

        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral", "qwen2"):
            raise bad("model_type", f"is {mt!r}; supported: llama (Llama 2/3, SmolLM2), mistral, qwen2")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' two names of one function
            raise bad("hidden_act", f"is {act!r}; only silu (SwiGLU) is supported")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if k not in cfg:
                raise bad(k, "is missing")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = cfg.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(k, f"is {v!r}; a whole number of at least 1 is needed")
        for k in ("rms_norm_eps", "rope_theta"):
            v = cfg.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
                raise bad(k, f"is {v!r}; a number above 0 is needed")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        # transformers >= 5 keeps theta and scaling in `rope_parameters`; older files use the top level
        rp = cfg.get("rope_parameters") or {}
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise bad("rope_scaling", f"has rope_type {kind!r}; supported: llama3, linear")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
            if kind == "llama3":  # as transformers: the pretraining context defaults to the config's
                scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
        ctx = max_seq_len or cfg.get("max_position_embeddings", 4096)
        window = cfg.get("sliding_window", 4096)  # transformers' default where the key is absent
        uses_window = mt == "mistral" or (mt == "qwen2" and cfg.get("use_sliding_window", False))
        if uses_window and window is not None and window < ctx:
            raise bad("sliding_window", f"is {window} < context {ctx}; sliding-window attention is not "
                      f"implemented (load with max_seq_len <= {window}: on the command line, --context {window})")
        bias = bool(cfg.get("attention_bias", False))
        return ModelArgs(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling, max_seq_len=ctx,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attn_bias=(mt == "qwen2") or bias, o_bias=bias and mt == "llama",
            mlp_bias=bool(cfg.get("mlp_bias", False)), hf_config=dict(cfg))

    def to_hf(self) -> dict:
        """A config.json that transformers loads; starts from the original when there was one."""
        cfg = dict(self.hf_config) or {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                       "hidden_act": "silu", "rope_theta": self.rope_theta}
        cfg.update(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                   num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                   head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                   rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_embeddings)
        cfg.setdefault("max_position_embeddings", self.max_seq_len)
        if cfg["model_type"] == "llama":
            cfg.update(attention_bias=self.attn_bias, mlp_bias=self.mlp_bias)
        return cfg


# ----------------------------------------------------------------------------- the network


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3 or linear scaling applied (as transformers)."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = args.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_ctx = s.get("original_max_position_embeddings", args.max_seq_len)  # from_hf always sets it
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _packed_linear(x, w, b):
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class Linear(nn.Linear):
    """nn.Linear with an inference path through oneDNN on pre-packed weights (`packed_weights`).
    On the AMD CPUs this project is developed on, MKL's fp32 GEMM runs small-batch products at a
    third of memory bandwidth and large ones at half the speed of oneDNN's packed kernel
    (`python bench.py model` shows the effect on decoding)."""

    packed: torch.Tensor | None = None

    def forward(self, x):
        if self.packed is not None and not torch.is_grad_enabled():
            return _packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32 then back, as Hugging Face's LlamaRMSNorm, for bit-level parity in bf16
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = Linear(a.dim, a.n_heads * a.head_dim, bias=a.attn_bias)
        self.k_proj = Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.attn_bias)
        self.v_proj = Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.attn_bias)
        self.o_proj = Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)

    qkv = None  # (packed fused weight, bias) inside packed_weights()

    def forward(self, x, cos, sin, mask, cache: KVCache | None, slots):
        B, T, _ = x.shape
        if self.qkv is not None and not torch.is_grad_enabled():
            hd = self.head_dim
            q, k, v = _packed_linear(x, *self.qkv).split([self.n_heads * hd, self.n_kv_heads * hd,
                                                          self.n_kv_heads * hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(slots, k, v)
            # the mask's last dim says how many slots are in use: attend to those only
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        gqa = self.n_kv_heads != self.n_heads
        if getattr(cache, "prefix", None) is not None:
            y = prefix_attention(q, k, v, mask, cache.prefix)
        elif isinstance(mask, BlockMask):
            y = mask.attend(q, k, v, gqa)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(a.dim, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = Linear(a.dim, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = Linear(a.intermediate_size, a.dim, bias=a.mlp_bias)

    gate_up = None  # (packed fused weight, bias) inside packed_weights()

    def forward(self, x):
        if self.gate_up is not None and not torch.is_grad_enabled():
            g, u = _packed_linear(x, *self.gate_up).chunk(2, -1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, mask, cache, slots):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """Hugging Face's `model.` submodule: embeddings, blocks, final norm."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Body(args)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.caches: list[KVCache] | None = None
        # activation (gradient) checkpointing: training forwards store each block's input only and
        # recompute the block in backward, ~1/3 more compute for activation memory ~1/n_layers-th;
        # the log-probs and gradients are the same
        self.grad_ckpt = False

    def _apply(self, fn, recurse=True):
        # every .to() / .half() / to_empty() comes here: RoPE's frequencies are recomputed in fp32 on the
        # new device, as a cast to bf16 would round them (positions drift) and to_empty leaves them unset
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.args, self.inv_freq.device)
        return self

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def setup_caches(self, batch: int, slots: int) -> None:
        a = self.args
        self.caches = [KVCache(batch, slots, a.n_kv_heads, a.head_dim, self.dtype, self.device)
                       for _ in range(a.n_layers)]

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, dim).

        tokens (B, T) ids. input_pos: RoPE positions, (T,) or (B, T); default 0..T-1.
        mask: bool, (B, T, S) or (B, 1, T, S), True = may attend, or a BlockMask (T = S = N), the same
        pattern computed block by block; default causal. With KV caches set
        up (setup_caches), the new keys/values go to cache `slots` (T,) (default: input_pos) and
        the queries attend to cache slots 0..S-1 under `mask`, which is then required.
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if self.caches is not None:
            if mask is None:
                raise ValueError("with a KV cache, pass an explicit mask over the cache slots")
            slots = input_pos if slots is None else slots
        if isinstance(mask, BlockMask):
            if self.caches is not None:
                raise ValueError("a BlockMask is for scoring whole rows, not with a KV cache")
        elif mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S): the same pattern for every head
        # cos/sin in fp32, then cast, as transformers does
        freqs = input_pos.float()[..., None] * self.inv_freq  # (T, D/2) or (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
        x = self.model.embed_tokens(tokens)
        ckpt = self.grad_ckpt and torch.is_grad_enabled() and self.caches is None
        for i, layer in enumerate(self.model.layers):
            if ckpt:  # keep each block's input only; its activations are recomputed in backward
                x = checkpoint(layer, x, cos, sin, mask, None, slots, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if self.caches is None else self.caches[i], slots)
        return self.model.norm(x)

    def forward(self, tokens, input_pos=None, mask=None, slots=None) -> torch.Tensor:
        """Logits (B, T, vocab); arguments as in `hidden`."""
        return self.lm_head(self.hidden(tokens, input_pos, mask, slots))

    @staticmethod
    def from_args(args: ModelArgs, device=None, dtype=torch.float32, seed: int = 0) -> "Transformer":
        """A freshly initialised model (normal(0, 0.02) weights, as transformers' Llama init)."""
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            m = Transformer(args)
        for mod in m.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        return m.to(dtype)


# ----------------------------------------------------------------------------- load / save

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(d) -> torch.dtype:
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"dtype {d!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[d]


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: model.safetensors, or the shards its index names."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            files = sorted(set(json.load(open(index))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid index ({e.__class__.__name__}: {e})") from None
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for name in files:
        f = os.path.join(path, name)
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: shard named in the index is missing")
        try:
            sd.update(load_file(f))
        except Exception as e:
            raise ValueError(f"{f}: cannot read safetensors (truncated or corrupt? {e})") from None
    return sd


def load_model(path: str, device=None, dtype=None, max_seq_len: int | None = None):
    """(model, tokenizer) from a Hugging Face-layout folder. Every key and shape is checked; the
    error lists missing, unexpected and mis-shaped tensors by name. dtype: torch dtype or
    "fp32"/"bf16"/"fp16"; default float32."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (is {path!r} a model folder?)")
    try:
        cfg = json.load(open(cfg_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    args = ModelArgs.from_hf(cfg, max_seq_len, where=cfg_path)
    tokenizer = Tokenizer(path)
    dtype, device = _dtype(dtype) or torch.float32, torch.device(device or "cpu")
    sd = read_safetensors(path)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} vs expected {tuple(s)}" for k, s in expected.items()
                    if k in sd and sd[k].shape != s)
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")
        parts = [f"missing: {few(missing)}" if missing else "", f"unexpected: {few(unexpected)}" if unexpected else "",
                 f"wrong shape: {few(shapes)}" if shapes else ""]
        raise ValueError(f"{path}: checkpoint does not match config.json; " + "; ".join(p for p in parts if p))
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args, device)
    return model.eval(), tokenizer


def save_model(model: Transformer, tokenizer: Tokenizer, path: str, max_shard_bytes: int = 2 * 1024**3,
               extra: dict | None = None) -> None:
    """Write the Hugging Face layout atomically: the folder is built beside `path` and swapped in by
    two renames, so a complete checkpoint (the old or the new) is always on disk: in `path`, or, if
    killed between the renames, in .<name>.old-*, where restore_checkpoint (called here and before
    every resume) finds it. `extra`: more files to put in it, name -> object (JSON for *.json names,
    torch.save otherwise), e.g. trainer and optimizer state."""
    from safetensors.torch import save_file

    path = os.path.abspath(path.rstrip("/"))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    restore_checkpoint(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.args.tie_embeddings:
            sd.pop("lm_head.weight", None)
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        cfg = model.args.to_hf()
        # transformers >= 5 reads `dtype` before `torch_dtype`: both name the saved one (an HF file's may differ)
        cfg["dtype"] = cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
        for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                     ("pad_token_id", tokenizer.pad_id)):
            cfg.setdefault(k, v)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        tokenizer.save(tmp)
        for name, obj in (extra or {}).items():  # trainer state (.json) and optimizer state (torch.save)
            if name.endswith(".json"):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=1)
            else:
                torch.save(obj, os.path.join(tmp, name))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint gets ordinary modes
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_checkpoint(path: str) -> None:
    """Undo what a save_model killed mid-way left beside `path`: with `path` gone and the checkpoint it
    replaced in .<name>.old-* (killed between the two renames), move that back; with `path` there,
    delete the leftovers (a half-written .<name>.tmp-*, a half-deleted .<name>.old-*). Safe to call
    from every rank at once."""
    path = os.path.abspath(path.rstrip("/"))
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        return
    names = os.listdir(parent)
    old = [n for n in names if n.startswith(f".{base}.old-")]
    if not os.path.exists(path) and len(old) == 1:
        try:
            os.rename(os.path.join(parent, old[0]), path)
            print(f"{path}: restored the checkpoint an interrupted save had moved aside", file=sys.stderr)
        except FileNotFoundError:  # another rank moved it first
            pass
    if os.path.exists(path):
        for n in names:
            if n.startswith((f".{base}.old-", f".{base}.tmp-")):
                shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


# ----------------------------------------------------------------------------- scoring


def token_logprobs(model: Transformer, tokens: torch.Tensor, target_mask: torch.Tensor,
                   input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   src: torch.Tensor | None = None) -> torch.Tensor:
    """log p(tokens[b, t]) for every target column, 0 elsewhere: (B, T), differentiable.

    tokens (B, T); target_mask (B, T) bool, which columns are scored. A target at column t is
    predicted by the model's output at column src[b, t] (default t - 1, the ordinary shift; packed
    rows point a candidate's first token back at its state's last token). Logits are computed only
    at the predicting columns, so memory is (number of targets, vocab), not (B, T, vocab).
    """
    B, T = tokens.shape
    h = model.hidden(tokens, input_pos, mask)  # (B, T, dim)
    target_mask = target_mask.bool()
    if src is None:
        src = torch.arange(T, device=tokens.device).expand(B, T) - 1
    b_idx, t_idx = target_mask.nonzero(as_tuple=True)  # (N,)
    s_idx = src[b_idx, t_idx]
    if (s_idx < 0).any():
        raise ValueError("a target has no predicting column (target at column 0, or src < 0)")
    logits = model.lm_head(h[b_idx, s_idx]).float()  # (N, V)
    lp = logits.log_softmax(-1).gather(-1, tokens[b_idx, t_idx, None]).squeeze(-1)  # (N,)
    out = torch.zeros(B, T, dtype=lp.dtype, device=tokens.device)
    return out.index_put((b_idx, t_idx), lp)
