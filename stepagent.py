"""StepAgent (Deng et al., arXiv 2411.03817, "From Novice to Expert"): inspection, step scoring and
the iteration loop that both reflection strategies share.

  * the novice: behaviour cloning on expert trajectories, L_SFT = -sum_t log pi(a_t|s_t)   `sft.train_sft`
  * inspection: from the expert's own state s_t the agent practises K actions
    b_t^1..K ~ pi(.|s_t), each compared with the expert's action a_t                          `inspect`
  * step scoring: log pi(a_t|s_t) and log pi(b|s_t) for every expert action and practice,
    one forward per trajectory, what both reflections (train_implicit.py, train_irl.py) use `score_packed`
  * for i in 1..I: inspection -> reflection -> evaluation (agent.py) -> checkpoint    `train_iterations`

Departures: the paper does not fix how a practice is compared with the expert; we parse the
`Action:` line of both and compare after normalising case, whitespace and brackets
(envs.normalize_action). A state longer than the model's context is skipped in inspection (counted
in the log).

Speed: the K practices of every state of one trajectory are sampled together from one prefill of
the whole expert trajectory (`sample_practice`), and scoring packs the trajectory and all its
candidates into one row (`pack_row`); the naive versions are kept as references. Rows far shorter
than a batch's longest get a forward of their own (`length_groups`). Under torchrun each rank
inspects its shard of the trajectories and every optimiser step takes the one-process global batch
(parallel.py).

    python stepagent.py sft                          # tiny preset on webshop: tokenizer, model, SFT
    python stepagent.py eval --model runs/webshop-tiny/sft --split test --n_test 200
    python stepagent.py inspect --model runs/webshop-tiny/sft --k 4
    python stepagent.py sft --preset smollm2 --sft_lr 1e-5 --out runs/webshop-smollm2
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

import agent as AG
import attention as AT
import envs
import generate as G
import model as M
import parallel as P
import runtime as RT
import sft as SFT
from runtime import opt


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    env: str = opt("webshop", "envs.ENVS name")
    preset: str = opt("tiny", "tiny | smollm2 | path of a Hugging Face-layout model folder")
    out: str = opt("runs/webshop-tiny", "run folder: base model, data, checkpoints, metrics, evaluations")
    model: str = opt("", "inspect/eval: model folder (default: <out>/sft)")
    seed: int = 0
    device: str = opt("auto", "auto | cpu | cuda")
    dtype: str = opt("fp32", "weights: fp32 | bf16 | fp16 (GPU training uses fp32 weights + bf16 autocast)")
    context: int = opt(0, "load models with this context in tokens, not their own (0); Mistral-7B-v0.1: 4096, its "
                          "window")
    n_train: int = opt(1000, "expert trajectories from the train split (the paper's expert data)")
    n_dev: int = opt(20, "dev tasks evaluated after each SFT epoch / iteration")
    n_test: int = opt(100, "test tasks in each final evaluation (the results tables use 200+)")
    split: str = opt("test", "eval: which split")
    # tiny preset (a from-scratch Llama on the env's text): 2.06M parameters; the results tables use 4.24M
    vocab_size: int = 2048
    dim: int = 192
    n_layers: int = 3
    n_heads: int = 3
    max_seq_len: int = opt(2048, "tiny preset only: a checkpoint's context is its own")
    # SFT (the novice)
    sft_epochs: int = 4
    pretrain_epochs: int = opt(2, "tiny preset only: next-token epochs on every token first (its \"pretraining\")")
    sft_lr: float = 3e-3
    batch_size: int = opt(8, "trajectories per micro-batch")
    grad_accum: int = 1
    warmup: float = opt(0.05, "fraction of steps with linear warmup, then cosine to 10%")
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    whole_ids: bool = opt(True, "tiny preset: each opaque ID in the train text (a webshop product ID) is one token")
    rename_ids: bool = opt(False, "SFT: rename the env's opaque IDs (webshop product IDs) afresh per trajectory and "
                                  "epoch")
    amp: str = opt("auto", "training forward/backward: bf16 autocast | none (fp32) | auto: bf16 where the device has "
                           "it natively")
    # acting
    max_new_tokens: int = opt(64, "per turn")
    eval_batch: int = opt(64, "tasks played in lockstep")
    one_shot: bool = opt(False, "prepend one train expert trajectory as an example")
    # inspection
    k: int = opt(4, "practice number K (IPR uses 5)")
    temperature: float = opt(1.0, "practice sampling temperature")
    top_p: float = 1.0
    n_inspect: int = opt(200, "expert trajectories inspected per iteration, a window moving each iteration (0 = all)")
    # the reflection loop (train_implicit.py, train_irl.py)
    iterations: int = opt(2, "inspection -> reflection -> evaluation rounds")
    save_every: int = opt(20, "optimiser steps between mid-reflection checkpoints (0: end of reflection only)")
    traj_batch: int = opt(8, "expert trajectories (with all their pairs / practices) or rollouts per update")
    log_every: int = opt(10, "SFT: optimiser steps between per-step metric lines")
    grad_ckpt: bool = opt(False, "training: recompute each block in backward instead of storing its activations (long "
                                 "contexts)")
    fsdp: bool = opt(False, "torchrun: shard the policy's weights, gradients and optimiser state over the ranks "
                            "(FSDP2)")
    # a str option's values (a subclass's entries add to or replace these; check_config refuses others)
    CHOICES: ClassVar[dict] = {"env": tuple(envs.ENVS), "amp": ("auto", "bf16", "none"), "dtype": tuple(M.DTYPES)}

    def check(self) -> None:
        """Refuse this class's options that cannot work (runtime.check_config calls it; subclasses add theirs)."""
        RT.at_least_1(self, "n_train", "n_dev", "n_test", "vocab_size", "dim", "n_layers", "n_heads", "max_seq_len",
                      "sft_epochs", "batch_size", "grad_accum", "max_new_tokens", "eval_batch", "k", "iterations",
                      "traj_batch", "log_every")
        RT.at_least(self, 0, "context", "pretrain_epochs", "weight_decay", "temperature", "n_inspect", "save_every")
        RT.positive(self, "sft_lr", "grad_clip")
        RT.within(self, "warmup", 0, 1)
        RT.within(self, "top_p", 0, 1)
        ctx = self.context or (self.max_seq_len if self.preset == "tiny" else 0)
        if ctx and ctx <= self.max_new_tokens:
            sys.exit(f"error: --{'context' if self.context else 'max_seq_len'} {ctx}: leaves no room for a prompt "
                     f"before --max_new_tokens {self.max_new_tokens}; make it larger than that")
        preset = self.preset if self.preset not in ("tiny", "smollm2") else ""
        for key, path in (("preset", preset), ("model", self.model)):
            if path and not os.path.isfile(os.path.join(path, "config.json")):
                sys.exit(f"error: --{key} {path!r}: no config.json there (a Hugging Face-layout model folder"
                         f"{'' if key == 'model' else ', or tiny or smollm2'})")
        if self.preset == "tiny" and self.dim % (2 * self.n_heads):
            sys.exit(f"error: --dim {self.dim}: must split into --n_heads {self.n_heads} heads of an even size "
                     "(RoPE rotates pairs)")
        try:
            torch.empty(0, device=P.get_device(self.device))
        except (RuntimeError, AssertionError) as e:
            sys.exit(f"error: --device {self.device!r}: {str(e).splitlines()[0]}")


# ----------------------------------------------------------------------------- inspection


@torch.no_grad()
def sample_practice(model, tok, ids: list[int], bounds: list[int], k: int, temperature=1.0, top_p=1.0,
                    max_new_tokens=64, generator=None):
    """K continuations from every state ids[:b] (b in bounds) of one trajectory, sharing its prefix:
    one causal prefill of ids[:max(bounds)] fills the caches and gives every state's first-token
    logits at column b-1; the T*K rows then decode together, each attending to the prefix up to
    its own boundary (PrefixKVCache) plus its own tokens. Returns (ids, logprobs) per row, row
    t*K + j being sample j of state t."""
    dev = model.device
    L = max(bounds)
    x = torch.tensor(ids[:L], device=dev)[None]
    model.setup_caches(1, L)
    try:
        with G.packed_weights(model):
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None]
            h = model.hidden(x, torch.arange(L, device=dev), causal)  # (1, L, dim)
            b = torch.tensor(bounds, device=dev).repeat_interleave(k)  # (R,) boundary of each row
            logits = model.lm_head(h[0, b - 1])  # (R, V)
            pmask = torch.arange(L, device=dev)[None] < b[:, None]  # (R, L)
            model.caches = [AT.PrefixKVCache(c.k, c.v, pmask, max_new_tokens) for c in model.caches]
            valid = torch.ones(len(b), max_new_tokens, dtype=torch.bool, device=dev)
            return G.decode(model, logits, b.clone(), valid, 0, max_new_tokens, temperature, top_p, 0,
                            AG.STOP, None, tok, generator)
    finally:
        model.caches = None


@torch.no_grad()
def sample_practice_naive(model, tok, ids, bounds, k, temperature=1.0, top_p=1.0, max_new_tokens=64, generator=None):
    """The reference: a fresh prefill of each state, K samples each, one state at a time."""
    out_ids, out_lp = [], []
    for b in bounds:
        i, lp = G.generate(model, [ids[:b]] * k, max_new_tokens, temperature, top_p, tokenizer=tok,
                           stop=AG.STOP, generator=generator)
        out_ids += i
        out_lp += lp
    return out_ids, out_lp


def practise(model, tok, rec: dict, sampler, k: int, temperature: float, top_p: float, max_new_tokens: int,
             generator=None) -> tuple[list[dict], int]:
    """One expert trajectory's inspection: K practices from each of its states s_t, each compared with
    the expert's action a_t. Returns its step records and the number of states skipped (too long for
    the context)."""
    msgs = AG.to_messages(rec)
    ids, spans = AG.turn_spans(tok, msgs)
    fits = [i for i, (s, _) in enumerate(spans) if s + max_new_tokens <= model.args.max_seq_len]
    if not fits:
        return [], len(spans)
    outs, lps = sampler(model, tok, ids, [spans[i][0] for i in fits], k, temperature, top_p, max_new_tokens, generator)
    experts = [m["content"] for m in msgs if m["role"] == "assistant"]
    steps = []
    for n, t in enumerate(fits):
        want = envs.normalize_action(envs.parse_action(experts[t]))
        agent = []
        for j in range(n * k, (n + 1) * k):  # row t*K + j: sample j of state t
            text = AG.clean_turn(tok.decode(outs[j]))
            act = envs.parse_action(text)
            agent.append({"text": text, "action": act, "match": envs.normalize_action(act) == want,
                          "logprob": float(sum(lps[j]))})
        steps.append({"traj_id": rec["id"], "step": t, "expert": experts[t],
                      "expert_action": envs.parse_action(experts[t]), "agent": agent})
    return steps, len(spans) - len(fits)


def inspect(model, tok, records: list[dict], k: int, temperature: float = 1.0, top_p: float = 1.0,
            max_new_tokens: int = 64, generator=None, out_path: str | None = None, shared: bool = True,
            log: RT.Log | None = None, partial: str | None = None) -> list[dict]:
    """The inspection stage: K practices from every expert state of every trajectory, each compared
    with the expert's action. Returns step records (and writes them as JSONL to out_path):
    {traj_id, step, expert, expert_action, agent: [{text, action, match, logprob}]}.
    Under torchrun each rank inspects its shard of the records; every rank gets all step records.
    partial: as rollout's, kept after every record (a kill loses only the record being inspected)."""
    sampler = sample_practice if shared else sample_practice_naive
    shard, desc = P.shard(records), f"inspect K={k}"
    key = {"records": [r["id"] for r in shard], "sampling": [k, temperature, top_p, max_new_tokens, shared]}
    kept = RT.Partial(partial, key, generator, desc, results=[[], 0])  # [each record's step records, states skipped]
    per_rec = kept.results[0]
    was_training = model.training
    model.eval()
    for r in tqdm(range(kept.done, len(shard)), desc=desc, initial=kept.done, total=len(shard), leave=False,
                  dynamic_ncols=True, disable=not P.is_main()):
        rec_steps, skipped = practise(model, tok, shard[r], sampler, k, temperature, top_p, max_new_tokens, generator)
        per_rec.append(rec_steps)
        kept.results[1] += skipped
        kept.save(r + 1)
    model.train(was_training)
    steps = [s for rec_steps in P.gather(per_rec) for s in rec_steps]
    skipped = P.all_sum({"skipped": kept.results[1]})["skipped"]
    if skipped:
        tqdm.write(f"note: {skipped} states longer than the context were not inspected")
    if out_path and P.is_main():
        envs.atomic_write(out_path, "".join(json.dumps(s) + "\n" for s in steps))
    if log is not None:
        rates = match_rates(steps)
        log(event="inspect", states=len(steps), match_rate=rates["all"],
            match_by_step=" ".join(f"{t}:{r:.2f}" for t, r in rates["by_step"].items()))
    return steps


def match_rates(steps: list[dict]) -> dict:
    """Expert-action match rate overall and per step index: the measured novice-expert gap."""
    by: dict[int, list[bool]] = {}
    for s in steps:
        by.setdefault(s["step"], []).extend(a["match"] for a in s["agent"])
    flat = [m for v in by.values() for m in v]
    return {"all": sum(flat) / max(1, len(flat)), "by_step": {t: sum(v) / len(v) for t, v in sorted(by.items())}}


# ----------------------------------------------------------------------------- packed scoring


def pack_row(traj: list[int], spans: list[tuple[int, int]], cands: list[tuple[int, list[int]]]):
    """One packed row (see Speed in the module docstring): the teacher-forced trajectory, then every candidate action.

    cands: (step t, token ids) pairs. A candidate for step t attends to trajectory columns before
    spans[t][0] (the state s_t) and causally to itself, with positions continuing from there; its
    first token is predicted by the trajectory's column spans[t][0] - 1. Returns tokens (N,),
    positions (N,), mask (N, N) bool, targets (N,) bool, src (N,), and the column ranges of the
    expert actions and of the candidates."""
    L = len(traj)
    tokens, pos, seg, limit, src = list(traj), list(range(L)), [-1] * L, list(range(1, L + 1)), list(range(-1, L - 1))
    targets = [False] * L
    expert_cols = []
    for s, e in spans:
        targets[s:e] = [True] * (e - s)
        expert_cols.append((s, e))
    cand_cols = []
    for c, (t, ids) in enumerate(cands):
        b, start = spans[t][0], len(tokens)
        tokens += ids
        pos += range(b, b + len(ids))
        seg += [c] * len(ids)
        limit += [b] * len(ids)
        src += [b - 1] + list(range(start, start + len(ids) - 1))
        targets += [True] * len(ids)
        cand_cols.append((start, start + len(ids)))
    N = len(tokens)
    seg_t, lim_t, col = torch.tensor(seg), torch.tensor(limit), torch.arange(N)
    in_traj = (col[None] < L) & (col[None] < lim_t[:, None])  # the state: trajectory columns before the limit
    own = (seg_t[:, None] == seg_t[None]) & (seg_t[:, None] >= 0) & (col[None] <= col[:, None])
    return (torch.tensor(tokens), torch.tensor(pos), in_traj | own, torch.tensor(targets), torch.tensor(src),
            expert_cols, cand_cols)


def length_groups(lens: list[int], slack: float = 0.5) -> list[list[int]]:
    """Which rows to forward together: all of them, in order, while padding each to the longest adds
    at most `slack` of their tokens (rows of similar length keep one batched forward, what a GPU
    wants); otherwise longest first, a row joining the open group while the group still pads within
    slack. A 7,000-token ScienceWorld trajectory then no longer pads a 700-token one to its length:
    fewer tokens, and less activation memory held for backward."""
    def fits(g: list[int]) -> bool:
        return len(g) * max(lens[i] for i in g) <= (1 + slack) * sum(lens[i] for i in g)
    rows = list(range(len(lens)))
    if not rows or fits(rows):
        return [rows]
    groups: list[list[int]] = []
    for i in sorted(rows, key=lambda i: -lens[i]):
        if groups and fits(groups[-1] + [i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def by_length(model, rows: list[tuple], forward, slack: float = 0.5) -> list:
    """forward(some rows) -> one output per row, run once per length_groups group of rows (token ids first);
    the outputs in the rows' order. Under --fsdp always one forward: every rank must make the same
    forwards, each of which gathers the weights with the other ranks."""
    out = [None] * len(rows)
    for g in length_groups([len(r[0]) for r in rows], math.inf if P.is_fsdp(model) else slack):
        for i, o in zip(g, forward([rows[i] for i in g])):
            out[i] = o
    return out


def score_packed(model, rows: list[tuple], slack: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Summed log-probs of every expert action and every candidate, one forward for all rows
    (right-padded to a common length; rows of very different lengths in separate forwards,
    `length_groups`; slack=math.inf: always one). Returns per row (expert (T,), candidates (C,)), with grad."""
    def forward(rows):
        lp = M.token_logprobs(model, *AT.pad_rows(rows, model.device, width=AT.attn_width(model)))
        out = []
        for i, (_, _, _, _, _, ecols, ccols) in enumerate(rows):
            e = torch.stack([lp[i, a:b].sum() for a, b in ecols]) if ecols else lp.new_zeros(0)
            c = torch.stack([lp[i, a:b].sum() for a, b in ccols]) if ccols else lp.new_zeros(0)
            out.append((e, c))
        return out
    return by_length(model, rows, forward, slack)


def score_naive(model, traj, spans, cands):
    """The reference for score_packed: one forward per expert action and per candidate."""
    def one(prefix, action):
        x = torch.tensor(prefix + action, device=model.device)[None]
        tm = torch.zeros_like(x, dtype=torch.bool)
        tm[0, len(prefix):] = True
        return M.token_logprobs(model, x, tm).sum()
    e = torch.stack([one(traj[:s], traj[s:t]) for s, t in spans])
    c = torch.stack([one(traj[:spans[t][0]], ids) for t, ids in cands]) if cands else torch.zeros(0)
    return e, c


# ----------------------------------------------------------------------------- the reflection loop


class Method:
    """What a reflection strategy gives `train_iterations` (train_implicit.py, train_irl.py):

    name     the run folder <out>/<name> and the table's row label
    lr       the policy optimiser's learning rate
    collect(model, tok, it, generator, partial) -> data
             this iteration's experience (inspection, or rollouts for the baselines) with whatever
             must be computed under the iteration's starting policy (pi_ref, pi_old); tensors and
             plain containers (read back with weights_only), cached in <run>/collect-<it>.pt so a
             resumed iteration trains on the same data;
             partial: a file for rollout() / inspect() to keep their finished part in (a killed collect resumes)
    n_updates(data) -> number of optimiser steps this iteration
    update(model, opt, data, b, it) -> metrics dict: the b-th update (forward, backward, step)
    state_dict() / load_state_dict(d): training state beyond the policy and its optimiser
             (train_irl.py's discriminator and its optimiser)
    """

    name, lr = "method", 1e-4

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def records(self, it: int) -> list[dict]:
        """The expert trajectories of iteration it: all, or a window of n_inspect moving each iteration."""
        recs = SFT.expert_data(self.cfg)
        n = self.cfg.n_inspect or len(recs)
        lo = (it * n) % len(recs)
        return (recs[lo:] + recs[:lo])[:n]

    def batch(self, n_items: int, b: int, it: int) -> list[int]:
        """Item indices of update b, traj_batch at a time: a fresh seeded shuffle per pass over the
        items, so a resumed run sees the same batches."""
        per = math.ceil(n_items / self.cfg.traj_batch)
        order = list(range(n_items))
        random.Random(self.cfg.seed * 1000 + it * 10 + b // per).shuffle(order)
        return order[(b % per) * self.cfg.traj_batch:(b % per + 1) * self.cfg.traj_batch]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


# changing these between a run and its resumption is harmless; anything else is a different run
RESUMABLE = {"n_test", "n_dev", "device", "eval_batch", "iterations", "split", "model", "save_every", "log_every",
             "grad_ckpt"}


def _check_run_config(run: str, cfg: Config) -> None:
    """<run>/config.json against this run's options (RESUMABLE aside). The tiny model's own options
    (sft.NOVICE_TINY) shape nothing with another preset, so there they are not compared: a table run
    records its own defaults for them, its cell's printed script command (without them) must resume it."""
    RT.check_run_config(run, cfg, RESUMABLE | (set() if cfg.preset == "tiny" else set(SFT.NOVICE_TINY)))


def train_iterations(cfg: Config, method: Method, title: str) -> list[tuple[str, dict]]:
    """The StepAgent loop, shared by both reflection strategies and their baselines:

        novice (SFT, cached) -> for it in 1..I: collect -> reflect -> dev + test evaluation -> checkpoint

    Rerunning the same command after a crash or kill -9 resumes (Run) and ends with the same numbers
    as an uninterrupted run. Under torchrun every rank runs this loop (collect shards and gathers,
    each update takes this rank's slice of the global batch, rank 0 writes). Returns the table rows."""
    RT.refuse_eval_options(cfg)
    RT.seed_all(cfg.seed)
    novice = SFT.train_sft(cfg)
    _check_run_config(os.path.join(cfg.out, method.name), cfg)
    table = [("novice (SFT)", AG.cached_evaluate(lambda: SFT.load(novice, cfg), cfg, "test", cfg.n_test,
                                                 os.path.join(cfg.out, "eval", "sft-test"), "novice"))]
    run = Run(cfg, method, novice)  # the policy and its optimiser, resumed from last/ if a run was killed
    for it in range(cfg.iterations):
        if run.begin(it):  # (False: this iteration's reflection finished before a restart)
            data = run.collect(it)  # inspection (or the baselines' rollouts) under the iteration's starting policy
            n = method.n_updates(data)
            for b in run.updates(it, n):  # reflection
                run.record(it, b, n, method.update(run.model, run.opt, data, b, it))
            run.end_reflection(it)
        table.append((f"{title} iter {it + 1}", run.evaluate(it)))  # dev + test; the policy saved as iter<it>/
    print(f"\n{cfg.env}, seed {cfg.seed}, {cfg.n_test} test tasks")
    print("| model | success | avg reward | avg steps |\n| --- | --- | --- | --- |")
    for name, s in table:
        print(f"| {name} | {s['success_rate']:.3f} | {s['avg_reward']:.3f} | {s['avg_steps']:.1f} |")
    print(f"checkpoints (Hugging Face layout): {run.dir}/iter<N>; evaluations: {run.dir}/eval-iter<N>-test; "
          f"per-step metrics: {run.metrics}")
    return table


class Run:
    """train_iterations' bookkeeping: the policy and its optimiser resumed from last/ with the loop's
    state, the metrics log, the wall times (restarts included). Files in <out>/<method.name>:
    metrics.jsonl, collect-<it>.pt (+ -seconds.json; a killed collect's part in -partial.pt),
    eval-iter<it>-{dev,test}/, iter<it>/ (the policy), last/ (policy, optimiser, method and loop state)."""

    def __init__(self, cfg: Config, method: Method, novice: str):
        self.cfg, self.method = cfg, method
        self.dir = os.path.join(cfg.out, method.name)
        last, self.metrics = self.path("last"), self.path("metrics.jsonl")
        M.restore_checkpoint(last)
        resumed = os.path.exists(os.path.join(last, "trainer_state.json"))
        self.model, self.tok = SFT.load(last if resumed else novice, cfg)
        if cfg.fsdp:
            P.fsdp_wrap(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=method.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.state = {"iteration": 0, "batch": 0, "step": 0, "done": False}
        if resumed:
            self.state = RT.read_json(os.path.join(last, "trainer_state.json"),
                                      f"delete {last} to rerun this method from the novice")
            P.load_optim_state(self.model, self.opt, os.path.join(last, "optimizer.pt"),
                               f"delete {last} to rerun this method from the novice")
            method.load_state_dict(RT.load_state(os.path.join(last, "method.pt"), f"delete {last} to rerun "
                                                 "this method from the novice", self.model.device))
            where = "after its reflection" if self.state["done"] else f"after update {self.state['batch']}"
            print(f"resuming {self.dir}: iteration {self.state['iteration'] + 1}, {where}")
        s = self.state
        pending = not os.path.exists(self.path(f"collect-{s['iteration'] + 1 + s['done']}.pt"))
        kept = RT.truncate_log(self.metrics, s["step"], pending)  # on a fresh start too (killed before its first save)
        # iterations with their line (a kill after iter<N>/ was saved and before its line: logged in evaluate)
        self.logged = {x["iteration"] for x in kept if x.get("event") == "iteration"}
        self.log = RT.Log(self.metrics)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def save(self) -> None:
        """last/: the policy, its optimiser, the method's state and the loop's (trainer_state.json)."""
        self.state["machines"] = RT.machines(self.state.get("machines"))  # every machine the run computed on
        full, opt_state = P.replica(self.model), P.optim_state(self.model, self.opt)
        if P.is_main():
            M.save_model(full, self.tok, self.path("last"), extra={
                "trainer_state.json": self.state, "optimizer.pt": opt_state, "method.pt": self.method.state_dict()})

    def begin(self, it: int) -> bool:
        """Start iteration it: its wall times so far (kept in last/ by a killed run); whether its
        collect or reflection is still to do."""
        s = self.state
        self.timed = dict(s.get("timed", {})) if it == s["iteration"] and s["step"] else {}
        return it > s["iteration"] or (it == s["iteration"] and not s["done"])

    def collect(self, it: int):
        """method.collect under the iteration's starting policy, cached in collect-<it>.pt with its wall
        time beside it; a killed collect keeps its finished part in collect-<it>-partial.pt."""
        path, took = self.path(f"collect-{it + 1}.pt"), self.path(f"collect-{it + 1}-seconds.json")
        if os.path.exists(path):
            if os.path.exists(took):
                self.timed.update(RT.read_json(took, "delete it (it only times the collect)"))
            return RT.load_state(path, "delete it to collect this iteration again")
        partial = self.path(f"collect-{it + 1}-partial.pt")
        t0 = time.time() - RT.partial_seconds(partial)
        RT.seed_all(self.cfg.seed * 1000 + it)
        g = torch.Generator(device=self.model.device).manual_seed(P.rank_seed(self.cfg.seed * 1000 + it))
        data = self.method.collect(P.replica(self.model), self.tok, it, g, partial)  # the same on every rank (gathered)
        self.timed["collect_seconds"] = round(time.time() - t0, 1)
        if P.is_main():
            RT.atomic_torch_save(data, path)
            envs.write_json(took, {"collect_seconds": self.timed["collect_seconds"]})
        P.barrier()  # collect-<it>.pt is written before any rank drops its rollouts
        RT.drop_partial(partial)
        return data

    def updates(self, it: int, n: int):
        """The updates of iteration it still to do (a resumed run: from where last/ left it), with a bar."""
        self.n, self.first = n, self.state["batch"] if self.state["iteration"] == it else 0
        self.t0, self.before = time.time(), (self.timed.get("reflect_seconds", 0.0), self.timed.get("timed_updates", 0))
        self.model.train()
        self.bar = tqdm(range(self.first, n), desc=f"reflect {it + 1}/{self.cfg.iterations}", dynamic_ncols=True,
                        disable=not P.is_main())
        return self.bar

    def clock(self, done: int) -> None:
        """The reflection's time and updates so far, restarts included."""
        self.timed.update(reflect_seconds=round(self.before[0] + time.time() - self.t0, 1),
                          timed_updates=self.before[1] + done - self.first)

    def record(self, it: int, b: int, n: int, m: dict) -> None:
        """After update b of n: the loop's state, its metrics line; last/ every save_every updates."""
        self.state = {"iteration": it, "batch": b + 1, "step": self.state["step"] + 1, "done": b + 1 == n,
                      "timed": self.timed, "machines": self.state.get("machines")}
        self.log.write(step=self.state["step"], iteration=it + 1, **m)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(m.items())[:2]})
        if b + 1 < n and self.cfg.save_every and (b + 1) % self.cfg.save_every == 0:
            self.clock(b + 1)
            self.save()

    def end_reflection(self, it: int) -> None:
        """The reflection done: its time, and last/ saved with the iteration marked done."""
        self.clock(self.n)
        self.state = {**self.state, "iteration": it, "done": True, "timed": self.timed}
        self.save()

    def evaluate(self, it: int) -> dict:
        """Iteration it's dev and test evaluations (cached in eval-iter<it>-{dev,test}/), its policy
        saved as iter<it>/, its metrics line; returns the test summary."""
        ckpt = self.path(f"iter{it + 1}")
        saved = os.path.exists(os.path.join(ckpt, "config.json"))
        P.barrier()  # every rank has looked before rank 0 writes it
        evaluated = []  # whether an evaluation ran now (cached_evaluate asked for the model)

        def get():  # the policy being trained, or an earlier iteration's checkpoint
            evaluated.append(True)
            return (P.replica(self.model), self.tok) if it == self.state["iteration"] else SFT.load(ckpt, self.cfg)
        cfg = self.cfg
        dev = AG.cached_evaluate(get, cfg, "dev", cfg.n_dev, self.path(f"eval-iter{it + 1}-dev"), f"iter {it + 1}")
        test = AG.cached_evaluate(get, cfg, "test", cfg.n_test, self.path(f"eval-iter{it + 1}-test"), f"iter {it + 1}")
        if not saved:
            full = P.replica(self.model)
            if P.is_main():
                M.save_model(full, self.tok, ckpt)
        if it + 1 not in self.logged or evaluated:  # a re-run evaluation of a logged iteration is logged as such
            self.log(event="iteration" if it + 1 not in self.logged else "reevaluation", iteration=it + 1,
                     step=self.state["step"], dev_success=dev["success_rate"], dev_reward=dev["avg_reward"],
                     test_success=test["success_rate"], test_reward=test["avg_reward"], **self.timed)
        return test


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("sft", "inspect", "eval"):
        usage = "usage: python stepagent.py sft|inspect|eval [--field value ...] (the options: sft --help)\n"
        if argv[:1] in (["-h"], ["--help"]):
            RT.print_help(usage + __doc__.split("\n\n")[-1])
        sys.exit(usage + __doc__.split("\n\n")[-1])
    cmd, cfg = argv[0], RT.parse_config(Config, argv[1:])
    P.dist_setup(cfg.device)
    RT.seed_all(cfg.seed)
    if cmd == "sft":
        ckpt = SFT.train_sft(cfg)
        model, tok = SFT.load(ckpt, cfg)
        s = AG.evaluate(model, tok, cfg, "test", cfg.n_test, os.path.join(cfg.out, "eval", "sft-test"))
        print(f"novice test: success {s['success_rate']:.3f}, reward {s['avg_reward']:.3f} on {s['n']} tasks "
              f"(seed {cfg.seed}); checkpoint {ckpt}")
        return
    model, tok = SFT.load(cfg.model or os.path.join(cfg.out, "sft"), cfg)
    if cmd == "eval":
        out = os.path.join(cfg.out, "eval", f"{os.path.basename(os.path.normpath(cfg.model or 'sft'))}-{cfg.split}")
        s = AG.evaluate(model, tok, cfg, cfg.split, cfg.n_test, out)
        print(json.dumps(s, indent=1))
        print(f"trajectories and summary in {out}")
    else:
        recs = SFT.expert_data(cfg)[: cfg.n_inspect or None]
        path = os.path.join(cfg.out, "inspect.jsonl")
        g = torch.Generator(device=model.device).manual_seed(P.rank_seed(cfg.seed))
        partial = os.path.join(cfg.out, "inspect-partial.pt")  # a killed inspection's finished records
        steps = inspect(model, tok, recs, cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, g, path,
                        log=RT.Log(os.path.join(cfg.out, "inspect_metrics.jsonl")), partial=partial)
        RT.drop_partial(partial)
        print(f"{len(steps)} step records in {path}")


if __name__ == "__main__":
    main()
    P.dist_end()  # torchrun: leave together (a no-op in one process)
