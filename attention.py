"""The attention patterns beyond plain causal that the prefix-sharing design needs, and the KV cache
they read: BlockMask (a packed row of a trajectory and its candidates, attended block by block; pad_rows
makes a batch of such rows and their blocks) and
PrefixKVCache / prefix_attention (the K practices of every state of a trajectory decoding together
over its one shared prefix). model.Attention dispatches to them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    to key columns [0, klim) and [lo, hi), its own block (stepagent.pack_row's packed rows: the
    trajectory is one causal block; its candidates, a few hundred tokens at a time, are blocks that
    see the trajectory before their state and themselves). Attention then costs sum (hi - lo) *
    (klim + hi - lo) instead of N^2, with the same softmax over the same keys as the dense mask;
    columns in no block (padding) get output 0. blocks[b]: (lo, hi, klim) in column order, klim <= lo.

    Block by block suits a CPU, where attention's cost is its FLOPs. On the devices in `dense_on`,
    for attention widths (heads x head_dim) up to `dense_max_width`, the same mask goes to one SDPA
    call over the whole row instead, as a narrow model on a GPU waits on launches, not FLOPs
    (measured: docs/speed.md). width: the model's heads x head_dim (None: narrow). Checked on
    `device` (where the model runs) from `mask`, which may stay on the CPU: no device sync per block."""

    dense_on = ("cuda",)  # device types that may take one dense SDPA; bench_train.py and a test change these
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


def pad_rows(rows: list[tuple], device, block: int = 256, width: int | None = None):
    """stepagent.pack_row rows as one batch, right-padded to (B, N), in token_logprobs' argument order: tokens,
    targets, positions, mask, predicting columns. score_packed and train_irl's discriminator and
    per-token policy scoring share it. The mask is a BlockMask: the trajectory one causal block,
    its candidates in blocks of about `block` tokens (whole candidates, in order), each seeing the
    trajectory up to its last candidate's state and itself; padding is in no block. width: the
    model's attention width, which picks how a GPU attends (BlockMask)."""
    B, N = len(rows), max(len(r[0]) for r in rows)
    tokens, pos, src = (torch.zeros(B, N, dtype=torch.long) for _ in range(3))
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    targets = torch.zeros(B, N, dtype=torch.bool)
    blocks = []
    for i, (t, p, m, tg, s, _, ccols) in enumerate(rows):
        n = len(t)
        tokens[i, :n], pos[i, :n], mask[i, :n, :n], targets[i, :n], src[i, :n] = t, p, m, tg, s
        blocks.append([(0, ccols[0][0] if ccols else n, 0)])  # the trajectory
        for a, b in ccols:  # a candidate's first position is its state's boundary: what it sees up to
            lo, hi, klim = blocks[-1][-1]
            if len(blocks[-1]) > 1 and b - lo <= block:
                blocks[-1][-1] = (lo, b, max(klim, int(p[a])))
            else:
                blocks[-1].append((a, b, int(p[a])))
    return (tokens.to(device), targets.to(device), pos.to(device), BlockMask(mask, blocks, device, width),
            src.clamp(min=0).to(device))
