"""Speed benchmarks. Every figure is a ratio against a named peer measured in the same run.

    python bench.py model      # ours vs transformers on SmolLM2-135M: decode b1/b8, train fwd+bwd, fp32/bf16
    python bench.py env        # built-in env step time and make() of 1,000 tasks
    python bench.py inspect    # prefix-shared practice sampling vs a fresh prefill per state
    python bench.py score      # packed scoring vs one forward per (state, action)
    python bench.py dpo        # one packed step-DPO optimiser step vs the per-pair formulation
    python bench.py pad        # a long and a short row in one update: one padded forward vs length groups
    python bench.py blocks     # one long packed row: attention by its BlockMask blocks vs one dense mask
    python bench.py rollout    # multi-turn rollouts with keys/values kept across turns vs re-prefilled
    python bench.py amp        # a training step under bf16 autocast vs fp32 on this CPU (what --amp auto picks)
    python bench.py denormals  # a won DPO pair's backward with denormal floats kept vs flushed (model.py's setting)
    python bench.py all        # everything above (docs/speed.md's tables)
    python bench.py train --shape 1b --batch 4 --seq 2048   # GPU: SFT / step-DPO tokens/s, MFU (bench_train.py)

Options: --threads N (default 2, as CI's machine), --smollm2 DIR (converted checkpoint; converted on
first use into checkpoints/smollm2-135m-instruct), --repeat N. Timings are the median of --repeat
runs after one warm-up. Absolute times are for this machine only; the ratios are the claim.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time

import torch

import agent as AG
import attention as AT
import convert_gguf as GG
import envs
import generate as G
import model as M
import runtime as RT
import sft as SFT
import stepagent as S
import tokenizer as T
import bench_train as BT


def timeit(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def header(*cells):
    """A markdown table's header row and its rule."""
    row(*cells)
    row(*["---"] * len(cells))


@contextlib.contextmanager
def patched(obj, **attrs):
    """obj's attributes set to attrs inside the block (a peer's module setting), put back after."""
    saved = {k: getattr(obj, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def smollm2_dir(path: str | None) -> str:
    path = path or os.path.join("checkpoints", "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(path, "config.json")):
        GG.convert_gguf(GG.find_smollm2_gguf(), path)
    return path


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s for streaming a buffer larger than any cache through a reduction (what batch-1
    decoding does with the weights)."""
    x = torch.ones(nbytes // 4)
    return nbytes / timeit(lambda: x.sum(), 5)


# ----------------------------------------------------------------------------- model vs transformers


def bench_model(a) -> None:
    from transformers import AutoModelForCausalLM

    path = smollm2_dir(a.smollm2)
    print(f"\n## model.py vs transformers (SmolLM2-135M, {torch.get_num_threads()} threads)\n")
    header("what", "dtype", "ours", "transformers", "ours / transformers")
    bw = read_bandwidth()
    for dtype in (torch.float32, torch.bfloat16):
        ours, tok = M.load_model(path, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        name = str(dtype).replace("torch.", "")
        g = torch.Generator().manual_seed(0)
        for B in (1, 8):
            prompt = torch.randint(100, 40000, (B, 128), generator=g)

            def ours_gen(n):
                return lambda: G.generate(ours, prompt.tolist(), n, stop_ids=[])

            def hf_gen(n):
                return lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           pad_token_id=0, attention_mask=torch.ones_like(prompt))

            with torch.no_grad():
                # decode rate = the 63 tokens after the first, so prefill cost cancels out
                t_ours = timeit(ours_gen(64), a.repeat) - timeit(ours_gen(1), a.repeat)
                t_hf = timeit(hf_gen(64), a.repeat) - timeit(hf_gen(1), a.repeat)
            r_ours, r_hf = 63 * B / t_ours, 63 * B / t_hf
            row(f"greedy decode, batch {B} (tokens/s)", name, f"{r_ours:.1f}", f"{r_hf:.1f}", f"{r_ours / r_hf:.2f}x")
            if B == 1:
                wbytes = sum(p.numel() * p.element_size() for p in ours.parameters())
                bound = bw / wbytes
                row("batch-1 bound: weight bytes / read bandwidth (tokens/s)", name, f"{bound:.1f}",
                    f"{r_ours / bound:.0%} of bound (ours)", f"{r_hf / bound:.0%} (transformers)")
        x = torch.randint(100, 40000, (4, 256), generator=g)

        def train_step(m, logits_fn):
            def f():
                m.zero_grad(set_to_none=True)
                logits_fn(x).float().log_softmax(-1).mean().backward()
            return f

        t_ours = timeit(train_step(ours, lambda x: ours(x)), a.repeat)
        t_hf = timeit(train_step(hf, lambda x: hf(x).logits), a.repeat)
        row("training forward+backward 4x256 (tokens/s)", name, f"{x.numel() / t_ours:.0f}",
            f"{x.numel() / t_hf:.0f}", f"{t_hf / t_ours:.2f}x")
        del ours, hf
    print(f"\nmeasured read bandwidth: {bw / 1e9:.1f} GB/s")


# ----------------------------------------------------------------------------- environments


def bench_env(a) -> None:
    print("\n## built-in environments\n")
    header("env", "make() 1,000 tasks, first call (s)", "step, median (ms)", "steps timed")
    for name in ("webshop", "household", "hotpotqa"):
        t0 = time.perf_counter()
        tasks = envs.make(name, "train", n=1000, seed=0)
        t_make = time.perf_counter() - t0
        env = envs.load_env(name)
        times = []
        for task in tasks[:200]:
            env.reset(task)
            for turn in env.expert(task):
                t0 = time.perf_counter()
                _, _, done = env.step(turn)
                times.append(time.perf_counter() - t0)
                if done:
                    break
        row(name, f"{t_make:.2f}", f"{1000 * statistics.median(times):.3f}", len(times))


# ----------------------------------------------------------------------------- inspection and scoring


def tiny_model(tok: T.Tokenizer) -> M.Transformer:
    """The tiny preset's shape (stepagent.Config defaults), random weights: speed does not depend on them."""
    return M.Transformer.from_args(SFT.tiny_args(S.Config(max_seq_len=4096), tok.vocab_size)).eval()


def ten_step_trajectories(n: int) -> list[dict]:
    """Household expert trajectories cut to their first 10 actions (ALFWorld-like lengths)."""
    env = envs.load_env("household")
    out = []
    for task in envs.make("household", "train", n=400, seed=0):
        rec = envs.run_expert(env, task)
        conv = rec["conversations"]
        if sum(c["from"] == "gpt" for c in conv) >= 10:
            rec["conversations"] = conv[:21]  # first human turn + 10 (action, observation) pairs -> 10 actions
            out.append(rec)
        if len(out) == n:
            return out
    return out


def bench_tokenizer(recs: list[dict], vocab_size: int, repeat: int = 1):
    """The tiny preset's tokenizer trained on the trajectories' text (its files go to a temporary
    folder, removed once the tokenizer is in memory)."""
    with tempfile.TemporaryDirectory() as d:
        return T.train_tokenizer([c["value"] for r in recs for c in r["conversations"]] * repeat, vocab_size, d)


def models_for_bench(a, as_paths: bool = False):
    """(name, model, tokenizer, trajectories) for the tiny preset and SmolLM2. as_paths: a checkpoint
    folder in place of the model, for benches that load it in a fresh process (the tiny model's
    folder is temporary; SmolLM2 is not loaded here)."""
    recs = ten_step_trajectories(a.n_traj)
    tok = bench_tokenizer(recs, 2048, repeat=3)
    with tempfile.TemporaryDirectory() as d:
        model = tiny_model(tok)
        if as_paths:
            M.save_model(model, tok, os.path.join(d, "tiny"))
            model = os.path.join(d, "tiny")
        yield "tiny preset (random init)", model, tok, recs
    if not a.no_smollm2:
        path = smollm2_dir(a.smollm2)
        yield "SmolLM2-135M", *((path, T.Tokenizer(path)) if as_paths else M.load_model(path)), recs[:2]


def adamw_step(model, state: dict, loss_fn):
    """A timed optimiser step (loss_fn(), backward, AdamW) that starts from the weights `state` each call."""
    def fn():
        model.load_state_dict(state)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return fn


def in_fresh_process(target, *args):
    """target(queue, *args) in a spawned process; returns what it put on the queue."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q, *args))
    p.start()
    out = q.get()
    p.join()
    return out


def bench_inspect(a) -> None:
    print(f"\n## inspection: K={a.k} practices from each of 10 states, {a.new_tokens} new tokens each\n")
    header("model", "trajectories", "prefix-shared (s)", "naive, fresh prefill per state (s)", "speed-up")
    for name, model, tok, recs in models_for_bench(a):
        items = []
        for r in recs:
            ids, spans = AG.turn_spans(tok, AG.to_messages(r))
            items.append((ids, [s for s, _ in spans]))

        def run(fn):
            # greedy, so both paths do the same work (every row decodes new_tokens tokens)
            return lambda: [fn(model, tok, ids, b, a.k, 0.0, 1.0, a.new_tokens) for ids, b in items]

        with torch.no_grad():
            t_shared = timeit(run(S.sample_practice), a.repeat)
            t_naive = timeit(run(S.sample_practice_naive), max(1, a.repeat - 1))
        row(name, len(recs), f"{t_shared:.2f}", f"{t_naive:.2f}", f"{t_naive / t_shared:.1f}x")


def score_jobs(tok, recs: list[dict], k: int) -> list[tuple]:
    """(ids, spans, candidates) per trajectory: K made-up candidate actions for every state."""
    jobs = []
    for r in recs:
        ids, spans = AG.turn_spans(tok, AG.to_messages(r))
        cands = [(t, AG.turn_ids(tok, f"Thought: candidate {j}.\nAction: go to drawer {j + 1}"))
                 for t in range(len(spans)) for j in range(k)]
        jobs.append((ids, spans, cands))
    return jobs


def bench_score(a) -> None:
    print(f"\n## scoring: 10 expert actions + {a.k} candidates per state, per trajectory\n")
    header("model", "pass", "packed, one row per trajectory (s)", "separate forwards (s)", "speed-up")
    for name, model, tok, recs in models_for_bench(a):
        jobs = score_jobs(tok, recs, a.k)
        for grad in ((False, True) if name.startswith("tiny") else (False,)):  # SmolLM2 backward x50: >10 min
            def packed():
                out = S.score_packed(model, [S.pack_row(*j) for j in jobs])
                if grad:
                    sum(e.sum() + c.sum() for e, c in out).backward()

            def naive():
                for j in jobs:
                    e, c = S.score_naive(model, *j)
                    if grad:
                        (e.sum() + c.sum()).backward()

            with torch.set_grad_enabled(grad):
                t_p, t_n = timeit(packed, a.repeat), timeit(naive, max(1, a.repeat - 1))
            model.zero_grad(set_to_none=True)
            row(name, "forward+backward" if grad else "forward", f"{t_p:.2f}", f"{t_n:.2f}", f"{t_n / t_p:.1f}x")


def _pad_step(q, path: str, jobs: list[tuple], slack: float, repeat: int, threads: int) -> None:
    """In a fresh process (so its peak RSS is its own): forward + backward of score_packed on jobs."""
    import resource

    torch.set_num_threads(threads)
    model, _ = M.load_model(path)
    model.train()
    rows = [S.pack_row(*j) for j in jobs]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    def fn():
        loss = sum(e.sum() - c.sum() for e, c in S.score_packed(model, rows, slack))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    t = timeit(fn, repeat)
    q.put((t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20, fn()))


def bench_pad(a) -> None:
    """The step-DPO scoring pass (forward + backward) on one long and one short packed row (ScienceWorld's
    traj_batch 2 mix): one padded forward vs score_packed's length groups, each in its own process."""
    print("\n## long and short rows in one update: one padded forward vs length groups (forward + backward)\n")
    header("model", "row tokens", "tokens forwarded, padded / grouped", "padded (s)", "grouped (s)", "speed-up",
           "peak RSS growth, padded / grouped (GiB)", "same loss")
    for name, path, tok, recs in models_for_bench(a, as_paths=True):
        ids, spans, cands = score_jobs(tok, recs[:1], a.k)[0]  # 10 states, K candidates each
        jobs = [(ids, spans, cands), (ids[:spans[0][1]], spans[:1], [c for c in cands if c[0] == 0])]
        lens = [len(S.pack_row(*j)[0]) for j in jobs]
        out = {slack: in_fresh_process(_pad_step, path, jobs, slack, a.repeat, a.threads) for slack in (math.inf, 0.5)}
        (tp, mp, lp), (tg, mg, lg) = out[math.inf], out[0.5]
        row(name, " + ".join(map(str, lens)), f"{len(lens) * max(lens)} / {sum(len(g) * max(lens[i] for i in g) for g in S.length_groups(lens))}", f"{tp:.2f}", f"{tg:.2f}",
            f"{tp / tg:.2f}x", f"{mp:.2f} / {mg:.2f}", "yes" if math.isclose(lp, lg, rel_tol=1e-5) else f"no: {lp} vs {lg}")


def _saturated_step(q, path: str, recs: list[dict], scale: float, flush: bool, repeat: int, threads: int) -> None:
    """In a fresh process (its worker threads start with `flush`): forward + backward of the summed
    log-probs of whole trajectories, scaled as a won DPO pair scales its gradient."""
    torch.set_flush_denormal(flush)  # before the first parallel op: the worker threads copy it then
    torch.set_num_threads(threads)
    model, tok = M.load_model(path)
    model.train()
    rows = [tok.encode_chat(AG.to_messages(r)) for r in recs]
    x, tm = SFT.collate(rows, tok.pad_id, model.device)

    def fn():
        model.zero_grad(set_to_none=True)
        (M.token_logprobs(model, x, tm).sum() * scale).backward()
        return math.sqrt(sum((p.grad.double() / scale).square().sum().item() for p in model.parameters()))

    q.put((timeit(fn, repeat), fn(), tuple(x.shape)))


def bench_denormals(a) -> None:
    """The backward pass of a DPO update whose pairs are long won (ETO on household, late in an
    iteration): denormal floats kept vs flushed to zero (model.py's setting), each in its own process."""
    z, beta = 70.0, 0.1
    scale = beta * torch.sigmoid(torch.tensor(-z, dtype=torch.float64)).item()  # d loss / d log-prob
    print(f"\n## a won DPO pair's backward (gradient scale beta * sigmoid(-{z:.0f}) = {scale:.1e}): "
          "denormals kept vs flushed\n")
    header("model", "batch x tokens", "kept (s)", "flushed (s)", "speed-up", "grad norm / scale, kept / flushed")
    for name, path, tok, recs in models_for_bench(a, as_paths=True):
        out = {flush: in_fresh_process(_saturated_step, path, recs[:1], scale, flush, a.repeat, a.threads)
               for flush in (False, True)}
        (tk, gk, shape), (tf, gf, _) = out[False], out[True]
        row(name, " x ".join(map(str, shape)), f"{tk:.2f}", f"{tf:.2f}", f"{tk / tf:.1f}x", f"{gk:.4e} / {gf:.4e}")


def bench_blocks(a) -> None:
    """The packed scoring pass (forward + backward) on one ScienceWorld-length row (40 steps, K candidates
    per state): attention by pad_rows' blocks vs the one dense (N, N) mask it replaced, on the same row."""
    print(f"\n## one long packed row (40 steps, K={a.k} candidates per state): block mask vs dense mask (forward + backward)\n")
    header("model", "trajectory + candidate tokens", "dense mask (s)", "blocks (s)", "speed-up", "attention scores, dense / blocks (a causal block counted whole)", "same loss")
    recs = ten_step_trajectories(4)  # four 10-step episodes end to end: one 40-step conversation
    long = {**recs[0], "conversations": [c for r in recs for c in r["conversations"][:20]]}
    for name, model, tok, _ in models_for_bench(a):
        ids, spans, cands = score_jobs(tok, [long], a.k)[0]
        r = S.pack_row(ids, spans, cands)
        tokens, targets, pos, bm, src = AT.pad_rows([r], model.device, width=AT.attn_width(model))
        model.train()
        model.grad_ckpt = not name.startswith("tiny")  # as the SmolLM2 ScienceWorld runs train
        out = {}

        def step(what, mask):
            def fn():
                lp = M.token_logprobs(model, tokens, targets, pos, mask, src)
                lp.sum().backward()
                model.zero_grad(set_to_none=True)
                out[what] = lp.sum().item()
            return fn

        t_d, t_b = timeit(step("dense", r[2][None].to(model.device)), a.repeat), timeit(step("blocks", bm), a.repeat)
        model.grad_ckpt = False
        n, L = len(r[0]), len(ids)
        same = math.isclose(out["dense"], out["blocks"], rel_tol=1e-5)
        row(name, f"{L} + {n - L}", f"{t_d:.2f}", f"{t_b:.2f}", f"{t_d / t_b:.2f}x", f"{n * n / 1e6:.1f}M / {BT.block_scores(bm) / 1e6:.1f}M",
            "yes" if same else f"no: {out['dense']} vs {out['blocks']}")


def bench_rollout(a) -> None:
    """Greedy webshop rollouts of a random tiny-preset model (every task runs to the step limit with
    long contexts, a weak novice's worst case): keys/values kept across turns vs re-prefilled."""
    n = 16
    print(f"\n## rollouts: {n} webshop test tasks in lockstep, greedy, tiny preset (random init)\n")
    header("what", "ChatCache (s)", "re-prefill every turn (s)", "speed-up", "same trajectories")
    env = envs.load_env("webshop")
    tasks = envs.make("webshop", "test", n=n, seed=0)
    recs = [envs.run_expert(env, t) for t in envs.make("webshop", "train", n=200, seed=0)]
    tok = bench_tokenizer(recs, 2048)
    model = tiny_model(tok)
    out = {}

    def play(reuse):
        def fn():
            out[reuse] = AG.rollout(model, tok, "webshop", tasks, max_new_tokens=32, batch=n, reuse_cache=reuse)
        return fn

    t_c, t_n = timeit(play(True), max(1, a.repeat - 2)), timeit(play(False), max(1, a.repeat - 2))
    same = [r["conversations"] for r in out[True]] == [r["conversations"] for r in out[False]]
    row("rollout to the step limit", f"{t_c:.2f}", f"{t_n:.2f}", f"{t_n / t_c:.1f}x", "yes" if same else "NO")

    # rows that finish at different steps (a trained agent's late turns): finished rows dropped at half vs each
    B, L = 64, 1500
    print(f"\n## decoding a turn of {B} cached {L}-token conversations, sampled, a token ending its row with p = 1/16\n")
    header("what", "drop finished rows at half (s)", "drop each as it finishes (s)", "speed-up", "same tokens")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, tok.vocab_size, (B, L), generator=g).tolist()
    stop = list(range(3, tok.vocab_size, 16))
    cache = G.ChatCache(model, B)
    G.generate(model, prompts, 1, stop_ids=[], cache=cache)  # fills the cache once; each call below reuses it
    got = {}

    def gen(at):
        def fn():
            got[at] = G.generate(model, prompts, 64, temperature=1.0, stop_ids=stop, cache=cache,
                                 generator=torch.Generator().manual_seed(1))[0]
        with patched(G, COMPACT_AT=at):
            return timeit(fn, a.repeat)

    t_half, t_each = gen(0.5), gen(1.0)
    lens = [len(x) for x in got[0.5]]
    row(f"one turn, {min(lens)}-{max(lens)} new tokens per row", f"{t_half:.2f}", f"{t_each:.2f}",
        f"{t_each / t_half:.1f}x", "yes" if got[0.5] == got[1.0] else "NO")

    # conversations past the context, whose every cut re-prefills: ours (agent.CONTEXT_CUT,
    # generate.PREFILL_SPREAD) vs dropping one pair a turn, and padding every row to the longest
    n = 16
    print(f"\n## rollouts past the context: {n} household test tasks to the 40-step limit, greedy, "
          "64-token turns, tiny preset (random init, 2,048-token context)\n")
    header("what", "time (s)", "vs ours", "same trajectories as the row above")
    recs = [envs.run_expert(envs.load_env("household"), t) for t in envs.make("household", "train", n=200, seed=0)]
    tok = bench_tokenizer(recs, 1024)
    model = M.Transformer.from_args(SFT.tiny_args(S.Config(), tok.vocab_size)).eval()
    tasks = envs.make("household", "test", n=n, seed=0)
    runs = [("ours: free a quarter, prefill in length groups", 0.25, 2.0),
            ("one pair a turn, prefill in length groups", 0.0, 2.0),
            ("one pair a turn, one padded prefill (the earlier code)", 0.0, float("inf"))]
    prev, t_ours = None, None
    for name, cut, spread in runs:
        with patched(AG, CONTEXT_CUT=cut), patched(G, PREFILL_SPREAD=spread):
            t = time.perf_counter()  # one run each (about a minute): the sections above warmed up
            played = AG.rollout(model, tok, "household", tasks, max_new_tokens=64, batch=n)
            t = time.perf_counter() - t
        t_ours = t_ours or t
        convs = [r["conversations"] for r in played]
        row(name, f"{t:.1f}", f"{t / t_ours:.1f}x", "-" if prev is None else ("yes" if convs == prev else "no"))
        prev = convs


def bench_dpo(a) -> None:
    """One step-DPO optimiser step (forward, loss, backward, AdamW) on the same batch: packed rows
    (train_implicit.StepDPO.update's path) vs two forwards per pair (the per-pair formulation)."""
    import train_implicit as TI

    print(f"\n## step-DPO optimiser step: {a.n_traj} trajectories x 10 states x K={a.k} rejected practices\n")
    header("model", "pairs", "packed (s)", "per pair (s)", "speed-up", "loss packed", "loss per pair")
    _, model, tok, recs = next(models_for_bench(a))  # the tiny preset only
    model.train()
    ref_model = M.Transformer.from_args(model.args, seed=7).eval()  # any other policy as pi_ref
    jobs = [(*j, [(t, i) for i, (t, _) in enumerate(j[2])]) for j in score_jobs(tok, recs, a.k)]  # all rejected
    with torch.no_grad():
        ref = TI.pair_logps(S.score_packed(ref_model, [S.pack_row(*j[:3]) for j in jobs]), jobs)[:2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = {}

    def opt_step(name, logps):
        step = adamw_step(model, state, lambda: TI.step_dpo_loss(*logps(), *ref, 0.1)[0].mean())

        def fn():
            losses[name] = step().item()
        return fn

    packed = opt_step("packed", lambda: TI.pair_logps(S.score_packed(model, [S.pack_row(*j[:3]) for j in jobs]), jobs)[:2])
    naive = opt_step("naive", lambda: TI.pair_logps_naive(model, jobs))
    t_p, t_n = timeit(packed, a.repeat), timeit(naive, max(1, a.repeat - 1))
    n_pairs = sum(len(j[3]) for j in jobs)
    row("tiny preset (random init)", n_pairs, f"{t_p:.2f}", f"{t_n:.2f}", f"{t_n / t_p:.1f}x",
        f"{losses['packed']:.6f}", f"{losses['naive']:.6f}")


def bench_amp(a) -> None:
    """An SFT optimiser step of the results tables' tiny shape on 8 x 512 tokens, bf16 autocast vs fp32 on
    this CPU: what --amp auto (runtime.resolve_amp) should pick, the faster only where bf16 is native."""
    dev = torch.device("cpu")
    cfg = S.Config(dim=256, n_layers=4, n_heads=4)
    print(f"\n## training precision on this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}; native "
          f"bf16: {', '.join(RT.cpu_native_bf16()) or 'none'}; --amp auto picks {RT.resolve_amp('auto', dev)})\n")
    header("step", "model", "bf16 autocast (s)", "fp32 (s)", "bf16 / fp32 time")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 2048, (8, 512), generator=g)
    tm = torch.ones_like(x, dtype=torch.bool)
    tm[:, 0] = False  # every token but the first a target
    model = M.Transformer.from_args(SFT.tiny_args(cfg, 2048)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def step(amp):
        def loss():
            with RT.autocast(dev, amp):
                return SFT.sft_loss(model, x, tm)
        return adamw_step(model, state, loss)

    t_bf16, t_fp32 = timeit(step("bf16"), a.repeat), timeit(step("none"), a.repeat)
    row("SFT, 8 x 512 tokens", "tiny, dim 256 x 4 layers (3.93M)", f"{t_bf16:.2f}", f"{t_fp32:.2f}", f"{t_bf16 / t_fp32:.1f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", default="all", choices=["model", "env", "inspect", "score", "dpo", "pad", "blocks", "rollout", "amp", "denormals", "train", "all"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--smollm2", default=None)
    p.add_argument("--no_smollm2", action="store_true", help="inspect/score: tiny preset only")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--n_traj", type=int, default=4)
    BT.add_args(p)  # train's options: --shape --batch --seq --device --compile --peak_tflops
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"bench.py {a.what}: torch {torch.__version__}, {torch.get_num_threads()} threads, repeat {a.repeat}")
    for name, fn in (("env", bench_env), ("model", bench_model), ("inspect", bench_inspect), ("score", bench_score),
                     ("dpo", bench_dpo), ("pad", bench_pad), ("blocks", bench_blocks), ("rollout", bench_rollout), ("amp", bench_amp),
                     ("denormals", bench_denormals), ("train", BT.bench_train)):
        if a.what == name or (a.what == "all" and name != "train"):  # train: a GPU bench
            fn(a)


if __name__ == "__main__":
    main()
