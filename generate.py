"""Sampling from the transformer: KV-cached prefill and decode of batched, ragged prompts.

    sample(logits, temperature, top_p, top_k, generator)   next tokens (B,) from logits (B, V)
    prefill / decode_one_token                             one forward over a prompt / one new token
    generate(model, prompts, max_new_tokens, ...)          (ids, logprobs) per prompt
    decode(...)                                            the decoding loop under filled caches
    ChatCache                                              keys/values kept across a rollout's turns
    packed_weights(model)                                  oneDNN-packed inference weights (CPU)

The loop's speed-ups, each a named piece: ChatCache (a turn prefills only its new tokens),
prefix-shared practice rows (attention.PrefixKVCache, stepagent.sample_practice), prefill in groups of
similar length (`PREFILL_SPREAD`), and dropping finished rows once half are done (`COMPACT_AT`).

    python generate.py --model checkpoints/smollm2 --prompt "Name three fruits."
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from attention import KVCache
from model import MLP, Attention, Linear, Transformer, load_model
from tokenizer import Tokenizer

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
    rows = list(range(B))  # the prompt each batch row decodes (finished rows leave at COMPACT_AT)
    live = [True] * B  # batch rows still generating
    out_ids, out_lp, stop_set = [[] for _ in range(B)], [[] for _ in range(B)], set(stop_ids)
    for i in range(max_new_tokens):
        act = [j for j, a in enumerate(live) if a]
        act_t = None if len(act) == len(rows) else torch.tensor(act, device=dev)
        # sample the live rows only: the random draws are then those of a batch of the live rows
        lg = logits if act_t is None else logits[act_t]
        nxt = sample(lg, temperature, top_p, top_k, generator)  # (live,)
        lp = lg.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        for j, t, lpj in zip(act, nxt.tolist(), lp.tolist()):  # one sync, not one per row
            live[j] = _keep_token(rows[j], t, lpj, out_ids, out_lp, stop_set, stop, tokenizer, on_token)
        keep = [j for j in act if live[j]]
        if not keep or i == max_new_tokens - 1:
            break
        if act_t is not None:  # finished rows are fed a dummy token
            nxt = torch.zeros(len(rows), dtype=nxt.dtype, device=dev).index_copy_(0, act_t, nxt)
        if len(keep) < len(rows) and len(keep) <= COMPACT_AT * len(rows):
            idx = torch.tensor(keep, device=dev)
            rows, live = [rows[j] for j in keep], [True] * len(keep)
            nxt, next_pos, valid = nxt[idx], next_pos[idx], None if valid is None else valid[idx]
            # slots still needed: per-row mode up to the furthest position left, else all
            _compact_caches(model, idx, int(next_pos.max()) + max_new_tokens - i if first_slot is None else valid.shape[1])
        if first_slot is None:  # per-row slots = positions
            m = (slot[None, : int(next_pos.max()) + 1] <= next_pos[:, None])[:, None]  # (b, 1, w)
            logits = decode_one_token(model, nxt[:, None], next_pos[:, None], m, next_pos[:, None])
        else:
            cur = first_slot + i  # slot of the token just sampled
            m = valid[:, None, : cur + 1]  # (b, 1, cur+1)
            logits = decode_one_token(model, nxt[:, None], next_pos[:, None], m, slot[cur:cur + 1])
        next_pos = next_pos + 1
    return out_ids, out_lp


def _keep_token(r: int, t: int, lp: float, out_ids, out_lp, stop_ids: set, stop, tokenizer, on_token) -> bool:
    """Row r's new token t: kept unless a stop id; False once the row is done (a stop id, or a stop
    string in its decoded text, the token completing it kept)."""
    if t in stop_ids:
        return False
    out_ids[r].append(t)
    out_lp[r].append(lp)
    if on_token:
        on_token(r, t)
    return not (stop and any(s in tokenizer.decode(out_ids[r][-32:]) for s in stop))


def _compact_caches(model, idx: torch.Tensor, width: int) -> None:
    """Keep the batch rows idx of every cache, and its first `width` slots. Compacting copies every
    cache, so it waits until half the rows are done (COMPACT_AT): per finished row it cost more than
    decoding the finished rows on. A finished row's extra tokens go to its own slots only, which no
    live row attends to, and are never returned."""
    for c in model.caches:
        c.k, c.v = c.k[idx, :, :width], c.v[idx, :, :width]
        if getattr(c, "prefix", None) is not None:
            c.prefix = (*c.prefix[:2], c.prefix[2][idx])

# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="A chat completion from a checkpoint, streamed.")
    p.add_argument("--model", required=True, help="a Hugging Face-layout model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--context", type=int, default=0, help="load with this context in tokens (0: the model's own)")
    a = p.parse_args(argv)
    try:
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
    try:
        out, _ = generate(model, [ids], a.max_new_tokens, a.temperature, a.top_p, tokenizer=tok,
                          generator=torch.Generator().manual_seed(a.seed), on_token=stream)
    except ValueError as e:  # the prompt and --max_new_tokens do not fit the context
        sys.exit(f"error: {e}; shorten the prompt or --max_new_tokens, or load with a larger --context")
    dt = time.time() - t0
    print(f"\n[{len(out[0])} tokens in {dt:.1f}s, {len(out[0]) / dt:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
