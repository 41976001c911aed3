"""StepAgent's shared core: prompts, rollouts and evaluation, the SFT novice, and inspection.

Paper parts (Deng et al., arXiv 2411.03817, "From Novice to Expert"):
  * the novice, behaviour cloning on expert trajectories:  L_SFT = -sum_t log pi(a_t | s_t)   `train_sft`
  * inspection: from the expert's own state s_t, the agent practises K actions b_t^1..K ~ pi(.|s_t),
    each compared with the expert's action a_t                                            `inspect`
  * evaluation: greedy play of held-out tasks from the start                               `evaluate`
  * the step-level scoring that both reflection strategies (train_implicit.py, train_irl.py) build
    on: log pi(a_t|s_t) and log pi(b|s_t) for every expert action and practice in one forward
    per trajectory                                                                          `score_packed`
  * the iterations, for i in 1..I: inspection -> reflection -> evaluation -> checkpoint, shared by
    both strategies and their baselines, resumable after a kill                      `train_iterations`

Departures: the paper does not fix how a practice is compared with the expert; we parse the
`Action:` line of both and compare after normalising case, whitespace and brackets
(envs.normalize_action). A state longer than the model's context is skipped in inspection (counted
in the log); in rollouts the oldest observation/action pairs are dropped instead.

Speed: the K practices of every state of one trajectory are sampled together from a
single prefill of the whole expert trajectory (`sample_practice`), and scoring packs the expert
trajectory and all candidates into one row (`pack_row`); the naive versions are kept as references.
Rows of similar length are forwarded as one padded batch; a row far shorter than the batch's
longest gets a forward of its own (`length_groups`), so it is not padded to thousands of tokens.

Several processes (`torchrun --nproc_per_node N`, any script; the helpers are in parallel.py): each
rank plays its shard of the evaluation tasks and rollouts and inspects its shard of the
trajectories; the results are gathered, so every summary is over all tasks. Each optimiser step
takes the same global batch as one process (batch_size trajectories for SFT, traj_batch for a
reflection update), each rank its slice `batch[rank::world]`; a rank's loss is its part of the
global mean (its local mean times its share of the global count, `shares`), the gradients are summed
over the ranks (`allreduce_grads`) and clipped after that, so N processes take the one-process step
up to float rounding. Only rank 0 writes files and prints; the others wait at a barrier where they
need what it wrote. Without torchrun none of this runs (no process group, the same numbers bit for
bit).

    python stepagent.py sft                          # tiny preset on webshop: tokenizer, model, SFT
    python stepagent.py eval --model runs/webshop-tiny/sft --split test --n_test 200
    python stepagent.py inspect --model runs/webshop-tiny/sft --k 4
    python stepagent.py sft --preset smollm2 --lr 1e-5 --out runs/webshop-smollm2
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from inspect import getsource
from typing import ClassVar

import torch
from tqdm import tqdm

import envs
import model as M
import parallel as P

# ----------------------------------------------------------------------------- config and logging


@dataclass
class Config:
    env: str = "webshop"  # envs.ENVS name
    preset: str = "tiny"  # tiny | smollm2 | path of a Hugging Face-layout model folder
    out: str = "runs/webshop-tiny"  # run folder: base model, data, checkpoints, metrics, evaluations
    model: str = ""  # inspect/eval: model folder (default: <out>/sft)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # weights: fp32 | bf16 | fp16 (GPU training uses fp32 weights + bf16 autocast)
    context: int = 0  # load models with this context in tokens, not their own (0); Mistral-7B-v0.1: 4096, its window
    n_train: int = 1000  # expert trajectories from the train split (the paper's expert data)
    n_dev: int = 20  # dev tasks evaluated after each SFT epoch / iteration
    n_test: int = 100  # test tasks in each final evaluation (the results tables use 200+)
    split: str = "test"  # eval: which split
    # tiny preset (a from-scratch Llama on the env's own text): 2.06M parameters by default, sized for
    # the main job's 10 minutes on 2 cores; the results tables use dim 256, 4 layers, 4 heads (4.24M)
    vocab_size: int = 2048
    dim: int = 192
    n_layers: int = 3
    n_heads: int = 3
    max_seq_len: int = 2048  # tiny preset only: a checkpoint's context is its own
    # SFT (the novice)
    sft_epochs: int = 4
    pretrain_epochs: int = 2  # tiny preset only: next-token epochs on every token first (its "pretraining")
    sft_lr: float = 3e-3
    batch_size: int = 8  # trajectories per micro-batch
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of steps with linear warmup, then cosine to 10%
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    whole_ids: bool = True  # tiny preset: each opaque ID in the train text (a webshop product ID) is one token
    rename_ids: bool = False  # SFT: rename the env's opaque IDs (webshop product IDs) afresh per trajectory and epoch
    amp: str = "auto"  # training forward/backward: bf16 autocast | none (fp32) | auto: bf16 where the device has it natively
    # acting
    max_new_tokens: int = 64  # per turn
    eval_batch: int = 64  # tasks played in lockstep
    one_shot: bool = False  # prepend one train expert trajectory as an example
    # inspection
    k: int = 4  # practice number K (IPR uses 5)
    temperature: float = 1.0  # practice sampling temperature
    top_p: float = 1.0
    n_inspect: int = 200  # expert trajectories inspected per iteration, a window moving each iteration (0 = all)
    # the reflection loop (train_implicit.py, train_irl.py)
    iterations: int = 2  # inspection -> reflection -> evaluation rounds
    save_every: int = 20  # optimiser steps between mid-reflection checkpoints (0: end of reflection only)
    traj_batch: int = 8  # expert trajectories (with all their pairs / practices) or rollouts per update
    log_every: int = 10  # SFT: optimiser steps between per-step metric lines
    grad_ckpt: bool = False  # training: recompute each block in backward instead of storing its activations (long contexts)
    fsdp: bool = False  # torchrun: shard the policy's weights, gradients and optimiser state over the ranks (FSDP2)
    # the values a str option may take (a subclass's entries add to or replace these; check_config refuses others)
    CHOICES: ClassVar[dict] = {"env": tuple(envs.ENVS), "amp": ("auto", "bf16", "none"), "dtype": tuple(M.DTYPES)}


def parse_config(cls, argv: list[str]):
    """`--field value` for every dataclass field; prints and returns the resolved config (-h / --help:
    the options, then exit)."""
    cfg, i = cls(), 0
    fields = {f.name: f for f in dataclasses.fields(cls)}
    while i < len(argv):
        if argv[i] in ("-h", "--help"):
            print_help(config_help(cls))
        key = argv[i].lstrip("-").replace("-", "_")
        if not argv[i].startswith("--") or key not in fields:
            sys.exit(f"error: unknown option {argv[i]!r}; options: " + " ".join(f"--{k}" for k in fields))
        if i + 1 >= len(argv):
            sys.exit(f"error: --{key} needs a value")
        raw, default = argv[i + 1], getattr(cfg, key)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                val = raw.lower() in ("true", "1")
            else:
                val = type(default)(raw)
        except ValueError:
            sys.exit(f"error: --{key} expects a {type(default).__name__}, got {raw!r}")
        setattr(cfg, key, val)
        i += 2
    check_config(cfg)
    cfg.amp = resolve_amp(cfg.amp, P.get_device(cfg.device))  # the precision this run trains in, in its config.json
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 only (parsing comes before dist_setup)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
    return cfg


AT_LEAST_1 = ("n_train", "vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "batch_size", "grad_accum",
              "max_new_tokens", "eval_batch", "k", "traj_batch", "log_every", "disc_epochs", "pg_epochs")  # the last two: IRLConfig's


def check_config(cfg) -> None:
    """Refuse options that cannot work, before any work, with one line naming the option."""
    small = [k for k in AT_LEAST_1 if getattr(cfg, k, 1) < 1]
    if small:
        sys.exit(f"error: --{small[0]} {getattr(cfg, small[0])}: must be at least 1")
    if not 0 < getattr(cfg, "clip_eps", 0.5) < 1:
        sys.exit(f"error: --clip_eps {cfg.clip_eps}: must be in (0, 1)")
    choices = {}
    for c in reversed(type(cfg).__mro__):  # the base's first, so a subclass's entry wins
        choices.update(vars(c).get("CHOICES", {}))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key} {getattr(cfg, key)!r}: choose {', '.join(allowed)}")
    for key, path in (("preset", cfg.preset if cfg.preset not in ("tiny", "smollm2") else ""), ("model", cfg.model)):
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            sys.exit(f"error: --{key} {path!r}: no config.json there (a Hugging Face-layout model folder"
                     f"{'' if key == 'model' else ', or tiny or smollm2'})")
    if cfg.preset == "tiny" and cfg.dim % (2 * cfg.n_heads):
        sys.exit(f"error: --dim {cfg.dim}: must split into --n_heads {cfg.n_heads} heads of an even size (RoPE rotates pairs)")
    try:
        torch.empty(0, device=P.get_device(cfg.device))
    except (RuntimeError, AssertionError) as e:
        sys.exit(f"error: --device {cfg.device!r}: {str(e).splitlines()[0]}")


def print_help(text: str) -> None:
    """Print text and exit 0, quietly when the reader has gone (`--help | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:  # send what Python flushes at exit to /dev/null, not a second traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def config_help(cls) -> str:
    """Every option of config class cls, its default and the comment beside its field in the source
    (a subclass's comment over its base's)."""
    notes = {}
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            for line in getsource(c).splitlines():
                m = re.match(r"\s+(\w+): [^=]+= .*?  # (.*)", line)
                if m:
                    notes[m[1]] = m[2]
    defaults = dataclasses.asdict(cls())
    shown = {k: str(v).lower() if isinstance(v, bool) else str(v) or "''" for k, v in defaults.items()}
    w = max(len(k) + len(v) for k, v in shown.items()) + 4
    return "\n".join([f"options (--field value; the default, then what it sets) of {cls.__name__}:"] +
                      [f"  {f'--{k} {v}':<{w}} {notes.get(k, '')}".rstrip() for k, v in shown.items()])


class Log:
    """One JSON line per event in <out>/<name>.jsonl and a short line on stdout."""

    def __init__(self, path: str):
        self.f = None  # torchrun: only rank 0 writes
        if P.is_main():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "a")

    def write(self, **kv):
        """The JSON line only (per-step metrics; the progress bar shows them)."""
        if self.f:
            self.f.write(json.dumps(kv) + "\n")
            self.f.flush()

    def __call__(self, **kv):
        self.write(**kv)
        if self.f:
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kv.items()))


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- conversations

_warned_overflow = False
CONTEXT_CUT = 0.25  # share of the prompt budget an overflowing conversation frees at once (0: a pair at a time)


def to_messages(record: dict) -> list[dict]:
    """ETO/IPR conversations -> chat messages (human -> user, gpt -> assistant)."""
    return [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]}
            for c in record["conversations"]]


def fit_context(tok: M.Tokenizer, messages: list[dict], budget: int, keep: int = 1, drop: int = 0):
    """(ids, drop): token ids of the chat (ending in a generation prompt) with `drop` assistant/user
    pairs left out after its first `keep` messages (the task's first user turn, and a one-shot
    example before it). When that is over `budget`, more pairs go at once: enough to bring it down
    to (1 - CONTEXT_CUT) of the budget, so the next turns append to an unchanged history and
    model.ChatCache re-prefills a conversation once per quarter-context of new turns, not at every
    turn. The caller keeps `drop` per conversation. Says once that it happened."""
    global _warned_overflow
    def chat(d):
        return tok.encode_chat(messages[:keep] + messages[keep + 2 * d:], add_generation_prompt=True)[0]
    ids = chat(drop)
    if len(ids) > budget:
        if not _warned_overflow:
            tqdm.write(f"note: a conversation exceeded the context ({budget} tokens for the prompt); "
                       "dropping its oldest observation/action pairs (said once)")
            _warned_overflow = True
        while len(ids) > int(budget * (1 - CONTEXT_CUT)) and keep + 2 * drop + 3 <= len(messages):
            drop += 1
            ids = chat(drop)
    return (ids[-budget:] if len(ids) > budget else ids), drop


# a turn is one thought and one action: text that starts another ends it (an undertrained model rambles)
STOP = ["\nObservation", "\nThought:"]


def clean_turn(text: str) -> str:
    """The model's turn as the env sees it: cut where a next observation or thought would start."""
    for cut in STOP + ["<|im_end|>"]:
        text = text.split(cut)[0]
    return text.strip()


# ----------------------------------------------------------------------------- rollouts and evaluation


def rollout(model: M.Transformer, tok: M.Tokenizer, env_name: str, tasks: list[envs.Task], temperature=0.0,
            top_p=1.0, max_new_tokens=64, batch=64, generator=None, one_shot: list[dict] | None = None,
            desc="rollout", env_kwargs: dict | None = None, reuse_cache: bool = True,
            partial: str | None = None) -> list[dict]:
    """Play tasks in lockstep, one batched `generate` per step for every live task (`batch` at a
    time; env objects are reused, which matters for the JVM-backed real envs). Each task's keys and
    values stay cached between its turns (model.ChatCache; reuse_cache=False re-prefills every turn,
    the reference bench.py compares with). Returns one ETO record per task with reward, success and
    steps added, and invalid_steps: the 0-based steps whose action was not carried out (envs.invalid).
    Under torchrun each rank plays its shard of the tasks; every rank gets all records.

    partial: a file (one per rank under torchrun) that keeps the records of every finished batch
    and the generator's state after it. A rerun with the same file, tasks and sampling settings
    skips those batches and plays the rest exactly as an uninterrupted run would (a batch's draws
    depend only on the generator's state when it starts); other tasks or settings stop the run with an
    error naming the file. The caller deletes the file once it has kept the records (drop_partial)."""
    tasks = P.shard(tasks)
    results = [None] * len(tasks)
    budget = model.args.max_seq_len - max_new_tokens
    keep = len(one_shot or []) + 1  # the example and the task's first user turn always stay
    pool = [envs.load_env(env_name, **(env_kwargs or {})) for _ in range(min(batch, len(tasks)))]
    bar = tqdm(total=len(tasks), desc=desc, leave=False, dynamic_ncols=True, disable=not P.is_main())
    key = {"tasks": [t.id for t in tasks], "sampling": [temperature, top_p, max_new_tokens, batch]}
    t0, mine = time.time(), partial and _rank_path(partial)
    start, results, earlier = _resumed(mine, key, generator, desc) or (0, results, 0.0)
    bar.update(start)
    for lo in range(start, len(tasks), batch):
        live = []
        for env, i in zip(pool, range(lo, min(lo + batch, len(tasks)))):
            first = env.reset(tasks[i])  # (some envs set max_steps per task here)
            msgs = [{"role": "user", "content": f"{envs.instruction(env)}\n\n{first}"}]
            live.append({"i": i, "env": env, "msgs": msgs, "reward": 0.0, "steps": 0, "drop": 0, "invalid": []})
        cache = M.ChatCache(model, len(live)) if reuse_cache else None  # each turn prefills only its new tokens
        while live:
            prompts = []
            for s in live:
                ids, s["drop"] = fit_context(tok, (one_shot or []) + s["msgs"], budget, keep, s["drop"])
                prompts.append(ids)
            outs, _ = M.generate(model, prompts, max_new_tokens, temperature, top_p, tokenizer=tok,
                                 stop=STOP, generator=generator, cache=cache)
            kept = []  # indices into live of the tasks still playing
            for j, (s, out) in enumerate(zip(live, outs)):
                turn = clean_turn(tok.decode(out))
                obs, reward, done = s["env"].step(turn)
                if envs.invalid(s["env"], obs):
                    s["invalid"].append(s["steps"])
                s["steps"] += 1
                s["msgs"] += [{"role": "assistant", "content": turn}, {"role": "user", "content": envs.OBS + obs}]
                s["reward"] = reward
                if done or s["steps"] >= s["env"].max_steps:  # envs end at their limit; this is a guard
                    _finish(results, s, tasks, bar)
                else:
                    kept.append(j)
            if cache is not None:
                cache.keep(kept)
            live = [live[j] for j in kept]
        if mine:
            _keep(mine, key, min(lo + batch, len(tasks)), results, generator, earlier + time.time() - t0)
    for env in pool:
        getattr(env, "close", lambda: None)()
    bar.close()
    return P.gather(results)


# A partial file keeps the finished part of a long sampling loop (rollout's batches, inspect's records):
# their results and the generator's state after them, so that a rerun plays only the rest, with the
# same draws as an uninterrupted run. key names the work; a file written for other work stops the run.


def _rank_path(path: str) -> str:
    return path if P.world() == 1 else f"{path}.rank{P.rank()}"


def _resumed(mine: str | None, key: dict, generator, desc: str):
    """(items done, results, seconds) kept in the partial file `mine` for the same key, with the
    generator set to its state after them; None without such a file. A file kept for other work (another
    key) stops the run rather than be overwritten."""
    if not mine or not os.path.exists(mine):
        return None
    saved = torch.load(mine, weights_only=False)
    if saved["key"] != key:  # never overwrite kept work silently (nor count its seconds as this work's)
        differ = ", ".join(f for f in key if saved["key"].get(f) != key[f])
        sys.exit(f"error: {mine} keeps part of other work (different {differ}); rerun with the settings "
                 f"that wrote it, or delete the file to start over")
    if generator is not None:
        generator.set_state(saved["generator"])
    tqdm.write(f"{desc}: resuming after {saved['done']} of {len(next(iter(key.values())))}, kept in {mine}")
    return saved["done"], saved["results"], saved["seconds"]


def _keep(mine: str, key: dict, done: int, results, generator, seconds: float) -> None:
    os.makedirs(os.path.dirname(mine) or ".", exist_ok=True)
    atomic_torch_save({"key": key, "done": done, "results": results, "seconds": seconds,
                       "generator": None if generator is None else generator.get_state()}, mine)


def _scores_path(partial: str) -> str:  # kept_map's file beside a collect's partial file
    return os.path.join(os.path.dirname(partial), "scores-" + os.path.basename(partial))


def partial_seconds(partial: str) -> float:
    """Wall seconds of the work a partial file (and kept_map's beside it) kept from earlier runs (0 if none)."""
    mine = [_rank_path(p) for p in (partial, _scores_path(partial))]
    return sum(torch.load(m, weights_only=False)["seconds"] for m in mine if os.path.exists(m))


def drop_partial(partial: str) -> None:
    for mine in (_rank_path(partial), _rank_path(_scores_path(partial))):
        if os.path.exists(mine):
            os.remove(mine)


def kept_map(fn, items: list, partial: str | None = None, desc: str = "scoring") -> list:
    """[fn(x) for x in items], each rank its shard, gathered: a collect's scoring pass (the reference or
    old log-probs of every trajectory: one forward each). partial: the collect's partial
    file; the finished results are kept beside it (scores-<name>) about 50 times a pass, so a killed pass
    reruns only the rest. Items are keyed by their text (token ids): other items stop the run."""
    shard, mine = P.shard(items), partial and _rank_path(_scores_path(partial))
    key = {"items": [hashlib.sha1(repr(x).encode()).hexdigest()[:16] for x in shard]}
    t0, every = time.time(), max(1, len(shard) // 50)
    start, out, earlier = _resumed(mine, key, None, desc) or (0, [], 0.0)
    for i in tqdm(range(start, len(shard)), desc=desc, initial=start, total=len(shard), leave=False,
                  disable=not P.is_main()):
        out.append(fn(shard[i]))
        if mine and ((i + 1) % every == 0 or i + 1 == len(shard)):
            _keep(mine, key, i + 1, out, None, earlier + time.time() - t0)
    return P.gather(out)


def _finish(results, s, tasks, bar):
    task = tasks[s["i"]]
    conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in s["msgs"]]
    results[s["i"]] = {"id": task.id, "conversations": conv, "reward": float(s["reward"]),
                       "success": s["reward"] >= 1.0, "steps": s["steps"], "invalid_steps": s["invalid"],
                       "task": task.to_json()}
    bar.update(1)


def one_shot_example(env_name: str) -> list[dict]:
    """The first train expert trajectory as a worked example, turned into chat messages."""
    env = envs.load_env(env_name)
    rec = envs.run_expert(env, envs.make(env_name, "train", n=1, seed=12345)[0])
    msgs = to_messages(rec)
    return msgs[:-1] if msgs[-1]["role"] == "user" else msgs  # ends on the expert's last action


def evaluate(model, tok, cfg: Config, split: str, n: int, out_dir: str | None = None, desc: str = "eval") -> dict:
    """Greedy play of `n` tasks of `split`; writes trajectories.json and summary.json to out_dir."""
    tasks = envs.make(cfg.env, split, n=n, seed=cfg.seed)
    shot = one_shot_example(cfg.env) if cfg.one_shot else None
    partial = out_dir and os.path.join(out_dir, "partial.pt")  # finished batches of a killed evaluation
    t0 = time.time() - (partial_seconds(partial) if partial else 0.0)
    was_training = model.training
    model.eval()
    recs = rollout(model, tok, cfg.env, tasks, 0.0, 1.0, cfg.max_new_tokens, cfg.eval_batch, one_shot=shot,
                   desc=f"{desc} {split}", partial=partial)
    model.train(was_training)
    per, steps, bad = max(1, len(recs)), sum(r["steps"] for r in recs), sum(len(r["invalid_steps"]) for r in recs)
    summary = {"env": cfg.env, "split": split, "n": len(recs), "seed": cfg.seed,
               "avg_reward": sum(r["reward"] for r in recs) / per, "success_rate": sum(r["success"] for r in recs) / per,
               "avg_steps": steps / per, "invalid_steps": bad, "invalid_share": bad / max(1, steps),
               "seconds": time.time() - t0, "machine": machine()}
    if out_dir and P.is_main():
        envs.save_trajectories(os.path.join(out_dir, "trajectories.json"), recs)
        envs.write_json(os.path.join(out_dir, "summary.json"), summary)
    if partial:
        drop_partial(partial)
    return summary


# ----------------------------------------------------------------------------- data and models


def expert_data(cfg: Config) -> list[dict]:
    """Expert trajectories of n_train train tasks (cached in <out>/data as an ETO file; under
    torchrun rank 0 makes it and the others read it)."""
    path = os.path.join(cfg.out, "data", f"{cfg.env}_train_{cfg.n_train}_seed{cfg.seed}.json")
    made = None
    if P.is_main() and not os.path.exists(path):
        made = _make_expert_data(cfg, path)
    P.barrier()
    return made or envs.load_trajectories(path)


def _make_expert_data(cfg: Config, path: str) -> list[dict]:
    env = envs.load_env(cfg.env)
    tasks = envs.make(cfg.env, "train", n=cfg.n_train, seed=cfg.seed)
    if len(tasks) < cfg.n_train:
        print(f"note: --n_train {cfg.n_train}: {cfg.env}'s train split has {len(tasks)} tasks; using all of them")
    recs = [envs.run_expert(env, t) for t in tqdm(tasks, desc="expert trajectories", leave=False)]
    # a real simulator's gold path can miss (ScienceWorld's timing varies between loads): such a
    # trajectory is no expert demonstration, so it is left out, named, rather than trained on
    bad = [r["id"] for r in recs if r["reward"] < 1.0]
    if len(bad) == len(recs):
        raise RuntimeError(f"{cfg.env}: the expert failed all {len(bad)} train tasks (e.g. {bad[:3]})")
    if bad:
        print(f"note: the expert failed {len(bad)} of {len(recs)} {cfg.env} train tasks, left out: {', '.join(bad)}")
    recs = [r for r in recs if r["reward"] >= 1.0]
    envs.save_trajectories(path, recs)
    return recs


def tiny_args(cfg: Config, vocab_size: int) -> M.ModelArgs:
    """The tiny preset's Llama shape: multi-head attention, SwiGLU width 3 * dim, tied embeddings."""
    return M.ModelArgs(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_heads, head_dim=cfg.dim // cfg.n_heads, intermediate_size=cfg.dim * 3,
                       max_seq_len=cfg.max_seq_len, tie_embeddings=True, rope_theta=10000.0)


def prepare_base(cfg: Config, records: list[dict]) -> str:
    """The model SFT starts from: a folder in the Hugging Face layout (under torchrun made by rank 0)."""
    if cfg.preset == "smollm2":
        path = os.path.join("checkpoints", "smollm2-135m-instruct")
        if P.is_main() and not os.path.exists(os.path.join(path, "config.json")):
            M.convert_gguf(M.find_smollm2_gguf(), path)
        P.barrier()
        return path
    if cfg.preset != "tiny":
        if not os.path.exists(os.path.join(cfg.preset, "config.json")):
            raise FileNotFoundError(f"--preset {cfg.preset!r}: not tiny/smollm2 and no config.json there")
        return cfg.preset
    path = os.path.join(cfg.out, "base")
    if P.is_main() and not os.path.exists(os.path.join(path, "config.json")):
        _make_tiny_base(cfg, records, path)
    P.barrier()
    return path


def _make_tiny_base(cfg: Config, records: list[dict], path: str) -> None:
    # a byte-level BPE trained on the env's own text, then a small Llama from scratch
    # (with whole_ids, each opaque ID seen in that text is one token: see the note in train_sft)
    tok_dir = os.path.join(cfg.out, "tokenizer")
    texts = [c["value"] for r in records for c in r["conversations"]]
    pattern = getattr(envs.env_class(cfg.env), "opaque_ids", None) if cfg.whole_ids else None
    whole = sorted({m for t in texts for m in re.findall(pattern, t)}) if pattern else []
    tok = M.train_tokenizer(texts, cfg.vocab_size, tok_dir, whole)
    model = M.Transformer.from_args(tiny_args(cfg, tok.vocab_size), seed=cfg.seed)
    M.save_model(model, tok, path)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny preset: {n / 1e6:.2f}M parameters, vocab {tok.vocab_size} ({len(whole)} whole IDs), "
          f"saved to {path} (tokenizer from {tok_dir})")


def load(path: str, cfg: Config):
    model, tok = M.load_model(path, device=P.get_device(cfg.device), dtype=cfg.dtype,
                              max_seq_len=cfg.context or None)
    model.grad_ckpt = cfg.grad_ckpt
    return model, tok


# ----------------------------------------------------------------------------- SFT (the novice)


def encode_records(tok: M.Tokenizer, records: list[dict], max_len: int):
    """(ids, assistant mask) per trajectory; trajectories longer than max_len are left out (counted)."""
    out, skipped = [], 0
    for r in records:
        ids, mask = tok.encode_chat(to_messages(r))
        if len(ids) > max_len:
            skipped += 1
            continue
        out.append((ids, mask))
    if skipped:
        print(f"note: {skipped} of {len(records)} trajectories exceed {max_len} tokens and are not trained on")
    return out


def length_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding): shuffle, sort within windows of
    32 batches, cut, shuffle the batches. Deterministic in the seed, so an epoch can be resumed."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    w = 32 * batch_size
    order = [i for lo in range(0, len(order), w) for i in sorted(order[lo:lo + w], key=lambda i: lengths[i])]
    out = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    rng.shuffle(out)
    return out


def rename_ids(record: dict, pattern: str, rng: random.Random) -> dict:
    """A copy of an expert trajectory with every opaque identifier (a match of `pattern`, e.g. a
    webshop product ID) renamed to a fresh random one of the same shape, consistently within the
    trajectory. Training on renamed IDs leaves copying them from the page as the only way to
    predict them; memorising the train catalogue's IDs no longer pays."""
    names: dict[str, str] = {}

    def new(m):
        old = m.group(0)
        if old not in names:
            names[old] = old[:2] + "".join(rng.choice(_ID_CHARS) for _ in old[2:])
        return names[old]
    conv = [{**c, "value": re.sub(pattern, new, c["value"])} for c in record["conversations"]]
    return {**record, "conversations": conv}


_ID_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def collate(examples, pad_id: int, device, all_tokens: bool = False):
    """Right-padded (B, T) tokens and (B, T) bool target mask: the assistant tokens, or with
    all_tokens every real token (next-token pretraining); padding is never a target."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tm = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, mask) in enumerate(examples):
        x[b, : len(ids)] = torch.tensor(ids)
        tm[b, : len(ids)] = True if all_tokens else torch.tensor(mask, dtype=torch.bool)
    tm[:, 0] = False
    return x.to(device), tm.to(device)


def n_targets(example, all_tokens: bool = False) -> int:
    """How many target tokens collate gives an (ids, mask) example: tm's count for its row."""
    ids, mask = example
    return len(ids) - 1 if all_tokens else sum(mask) - bool(mask[0])


def sft_loss(model, x, tm) -> torch.Tensor:
    """Mean negative log-likelihood of the assistant tokens (the paper's L_SFT, per token)."""
    lp = M.token_logprobs(model, x, tm)
    return -lp.sum() / tm.sum().clamp(min=1)


def lr_at(step: int, total: int, warmup: float, lr: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine from lr down to lr/10."""
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto -> bf16 where the device computes bf16 natively (a CUDA GPU that has it; a CPU with
    AVX512-BF16 or AMX), else none. A CPU without them emulates bf16: on an AVX2-only CPU an SFT
    step of the tables' tiny model took 20x as long under bf16 autocast as in fp32 (`python bench.py
    amp`), where the AVX512-BF16 CPU of the README's speed table trained SmolLM2 2.9x faster in bf16."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if cpu_native_bf16() else "none"
    return "none"


def mkl_code() -> int | None:
    """The code path MKL picked for this CPU (`mkl_serv_cpu_detect` in torch's libtorch_cpu, which links
    MKL in); None where torch has no MKL. MKL picks it by CPU vendor, not by torch's kernel level: 0 is
    its generic path (the AMD CPUs we ran on, AVX512 or not), 7 the highest it accepts (AVX-512), so two
    CPUs with the same `kernels` can still sum fp32 matmuls differently (EXPERIMENTS, household seed 2)."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return int(lib.mkl_serv_cpu_detect()) if torch.backends.mkl.is_available() else None
    except (OSError, AttributeError):  # another platform's library name, or no MKL symbol in it
        return None


def machine() -> dict:
    """What this process computes on, kept beside what it makes (a novice's trainer_state.json, an
    evaluation's summary.json, a run's last/): the CPU (name, family and model), the kernels torch
    picked for it (fp32 sums differ between AVX2 and AVX512 kernels, so the same command's weights do
    too), MKL's code path (mkl_code), threads, torch, and the GPU if any."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(), "mkl": mkl_code(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def machines(seen: list | None) -> list[dict]:
    """seen (the machines a resumed run computed on so far), this one added if it differs from the last."""
    seen, here = list(seen or []), machine()
    return seen if seen and seen[-1] == here else seen + [here]


def cpu_native_bf16() -> list[str]:
    """The features of this CPU that compute bf16 natively (AVX512-BF16, AMX tiles), as torch reports them.
    STEPAGENT_NATIVE_BF16=1 or 0 overrides the probe (so --amp auto picks bf16 or fp32 on any CPU):
    how the test suite is checked for both kinds of CPU on one machine."""
    forced = os.environ.get("STEPAGENT_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return ["STEPAGENT_NATIVE_BF16"] if forced == "1" else []
    if forced:
        sys.exit(f"error: STEPAGENT_NATIVE_BF16={forced!r}: set it to 1 or 0, or unset it")
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return [name for name, f in probes.items() if getattr(torch.cpu, f, lambda: False)()]


def autocast(device: torch.device, amp: str):
    """bf16 autocast for training passes (weights and optimizer stay fp32), or nothing; auto as resolve_amp."""
    amp = resolve_amp(amp, device)
    if amp not in ("bf16", "none"):
        raise ValueError(f"--amp {amp!r}: choose auto, bf16 or none")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def train_sft(cfg: Config) -> str:
    """Behaviour cloning; a checkpoint per epoch in <out>/sft (resumed if interrupted; returned at
    once if already complete: the cached novice). Returns the checkpoint folder.

    The tiny preset's model starts from random weights, so it first gets `pretrain_epochs` of
    next-token loss on every token of the same trajectories (observations too): it stands in for
    the language pretraining a real checkpoint brings. SFT proper is assistant tokens only.

    Whole IDs (`whole_ids`, tiny preset): a from-scratch model given a few minutes never learns to
    copy a 10-character product ID off the results page (a pretrained one does): spelled out in
    characters, the step-1 ID was right under teacher forcing on 0-1% of dev states through 750
    steps. With each ID seen in the train text as one token (1,200 of them) the novice can at least
    name a real product, which is where a pretrained checkpoint starts (README, "The novice")."""
    if cfg.rename_ids and cfg.whole_ids and cfg.preset == "tiny":
        sys.exit("error: --rename_ids true draws IDs the tiny tokenizer has never seen; add --whole_ids false")
    seed_all(cfg.seed)
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, P.get_device(cfg.device)))  # recorded as trained
    ckpt = os.path.join(cfg.out, "sft")
    M.restore_checkpoint(ckpt)  # a save killed between its renames
    state_path = os.path.join(ckpt, "trainer_state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {"epoch": 0, "step": 0}
    n_pre = cfg.pretrain_epochs if cfg.preset == "tiny" else 0
    n_epochs = n_pre + cfg.sft_epochs
    pending = state.get("dev", {}) is None  # saved, then stopped in its dev evaluation
    _check_novice_options(cfg, state, finished=state["epoch"] >= n_epochs)
    if state["epoch"] >= n_epochs and not pending:
        print(f"novice already trained: {ckpt} ({state['epoch']} epochs)")
        return ckpt
    records = expert_data(cfg)
    base = prepare_base(cfg, records)
    model, tok = load(ckpt if state["epoch"] else base, cfg)
    if cfg.fsdp:
        P.fsdp_wrap(model)
    device = model.device
    pattern = getattr(envs.env_class(cfg.env), "opaque_ids", None) if cfg.rename_ids else None

    def epoch_data(epoch: int):  # renamed IDs are drawn per trajectory and epoch (seeded: resumable)
        recs = records if not pattern else [rename_ids(r, pattern, random.Random(f"{cfg.seed}-{epoch}-{i}"))
                                            for i, r in enumerate(records)]
        return encode_records(tok, recs, model.args.max_seq_len)
    data = epoch_data(state["epoch"])
    first = data if not pattern or not state["epoch"] else epoch_data(0)  # the schedule's length, as first run
    total = math.ceil(math.ceil(len(first) / cfg.batch_size) / cfg.grad_accum) * n_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if state["epoch"]:
        P.load_optim_state(model, opt, os.path.join(ckpt, "optimizer.pt"))
        print(f"resuming SFT from {ckpt} after epoch {state['epoch']}")
    step = state["step"]
    _truncate_log(os.path.join(cfg.out, "sft_metrics.jsonl"), step, False)  # an epoch killed before its save
    log = Log(os.path.join(cfg.out, "sft_metrics.jsonl"))  # (its lines are written again below)

    def dev_epoch(st: dict) -> None:
        """The dev evaluation of the epoch just saved (st: its trainer state), its log line, the state
        completed. The checkpoint is written first, so a crash in the evaluation loses no training."""
        dev = evaluate(P.replica(model), tok, cfg, "dev", cfg.n_dev, desc="sft dev")
        log(event="sft_epoch", epoch=st["epoch"], step=st["step"], loss=st["loss"],
            dev_success=dev["success_rate"], dev_reward=dev["avg_reward"], tokens_per_s=st["tokens_per_s"])
        if P.is_main():
            envs.write_json(state_path, {**st, "dev": dev})

    if pending:
        print(f"SFT epoch {state['epoch']} was saved before its dev evaluation: evaluating it now")
        dev_epoch(state)
    model.train()
    for epoch in range(state["epoch"], n_epochs):
        pre = epoch < n_pre
        if pattern and epoch != state["epoch"]:
            data = epoch_data(epoch)
        batches = length_batches([len(d[0]) for d in data], cfg.batch_size, cfg.seed * 1000 + epoch)
        n_batches, ga = len(batches), cfg.grad_accum
        # target tokens of each global batch (every rank's part): a step's loss is the mean over all of
        # its tokens, whichever micro-batch and rank they fall in, as one batch of ga * batch_size would be
        counts = [sum(n_targets(data[i], pre) for i in batch) for batch in batches]
        desc = f"{'pretrain' if pre else 'sft'} epoch {epoch + 1}/{n_epochs}"
        bar = tqdm(range(n_batches), desc=desc, dynamic_ncols=True, disable=not P.is_main())
        t0, tokens, part = time.time(), 0, 0.0
        for b in bar:
            mine, live = P.shard_batch(batches[b])  # this rank's slice of the global batch (all of it in one process)
            x, tm = collate([data[i] for i in mine], tok.pad_id, device, all_tokens=pre)
            with autocast(device, cfg.amp):
                loss = sft_loss(model, x, tm)  # the mean over this rank's target tokens
            group = max(1, sum(counts[b - b % ga:b - b % ga + ga]))  # the step's target tokens, all ranks
            w = int(tm.sum()) * live / group  # this rank's share of them
            (loss * w).backward()
            part += loss.item() * w
            tokens += x.numel() * live
            if (b + 1) % ga == 0 or b == n_batches - 1:
                loss_all, part = P.all_sum({"loss": part})["loss"], 0.0  # the step's mean over its tokens
                lr = lr_at(step, total, cfg.warmup, cfg.sft_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                P.allreduce_grads(model)
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(loss=f"{loss_all:.3f}", lr=f"{lr:.2e}")
                if step % cfg.log_every == 0:
                    log.write(step=step, loss=loss_all, lr=lr, grad_norm=gn.item())
        speed = P.all_sum({"tokens": tokens})["tokens"] / (time.time() - t0)
        state["machines"] = machines(state.get("machines"))  # every machine an epoch of it trained on
        st = {"epoch": epoch + 1, "step": step, "loss": loss_all, "tokens_per_s": speed, "dev": {} if pre else None,
              "amp": cfg.amp,  # the precision it trained in (resolve_amp; novice.json has every option)
              "machines": state["machines"]}
        full, opt_state = P.replica(model), P.optim_state(model, opt)
        if P.is_main():
            M.save_model(full, tok, ckpt, extra={"trainer_state.json": st, "optimizer.pt": opt_state})
        if pre:
            log(event="pretrain_epoch", epoch=epoch + 1, step=step, loss=loss_all, tokens_per_s=speed)
        else:
            dev_epoch(st)
        model.train()
    P.barrier()  # the other ranks go on to read the novice rank 0 wrote
    print(f"novice saved to {ckpt}")
    return ckpt


# the options that shape the novice (its data, base model and SFT); the tiny preset's own ones only there
NOVICE = ("env", "preset", "seed", "dtype", "n_train", "sft_epochs", "sft_lr", "batch_size", "grad_accum",
          "warmup", "weight_decay", "grad_clip", "rename_ids", "amp", "fsdp",  # fsdp: its optimiser state's layout
          "context")
NOVICE_TINY = ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "pretrain_epochs", "whole_ids")


def _check_novice_options(cfg: Config, state: dict, finished: bool) -> None:
    """<out>/novice.json records the options the novice in <out> is made with; a later run in the same
    --out with other ones is refused, the option named, instead of silently reusing or resuming a
    novice (or a tiny base, or expert data) made otherwise. A finished novice is reused whatever this
    run's --amp (the precision of what trains next; --amp auto differs between machines) and --fsdp
    (which only a resumed SFT's optimiser state cares about).
    A novice from before novice.json is checked on the precision its trainer_state.json recorded."""
    path = os.path.join(cfg.out, "novice.json")
    now = {k: getattr(cfg, k) for k in NOVICE + (NOVICE_TINY if cfg.preset == "tiny" else ())}
    old = json.load(open(path)) if os.path.exists(path) else {k: state[k] for k in ("amp",) if k in state}
    diff = [k for k in now if k in old and old[k] != now[k] and not (finished and k in ("amp", "fsdp"))]
    if diff:
        k = diff[0]
        sys.exit(f"error: {cfg.out} holds a novice made with --{k} {old[k]}, not {now[k]}; rerun with "
                 f"--{k} {old[k]} to go on with it, or choose another --out")
    if finished and old.get("amp", now["amp"]) != now["amp"]:
        print(f"note: the novice in {cfg.out} trained with --amp {old['amp']}; this run trains with --amp {now['amp']}")
    if not os.path.exists(path) and not state["epoch"] and P.is_main():  # a novice begun now
        envs.write_json(path, now)


# ----------------------------------------------------------------------------- inspection


def turn_spans(tok: M.Tokenizer, messages: list[dict], max_len: int | None = None):
    """(ids, spans): the chat's token ids and, per assistant turn, (start, end) token columns of
    its action (content and end-of-turn token). ids[:start] is the state s_t, ending in the
    generation prompt, so the agent continues from exactly where the expert acted. max_len: cut to
    the first max_len tokens and the turns that end within them (the context: a rollout never puts a
    turn past it, fit_context), so no action is scored at positions the model never acts at."""
    ids, mask = tok.encode_chat(messages)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
        while mask and mask[-1]:  # a turn cut part-way is left out whole
            ids, mask = ids[:-1], mask[:-1]
    spans, t = [], 0
    while t < len(mask):
        if mask[t]:
            s = t
            while t < len(mask) and mask[t]:
                t += 1
            spans.append((s, t))
        else:
            t += 1
    return ids, spans


def turn_ids(tok: M.Tokenizer, text: str) -> list[int]:
    """The tokens an assistant turn `text` has inside a chat (content + end-of-turn), for scoring."""
    ids, mask = tok.encode_chat([{"role": "user", "content": "."}, {"role": "assistant", "content": text}])
    return [i for i, m in zip(ids, mask) if m]


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
        with M.packed_weights(model):
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None]
            h = model.hidden(x, torch.arange(L, device=dev), causal)  # (1, L, dim)
            b = torch.tensor(bounds, device=dev).repeat_interleave(k)  # (R,) boundary of each row
            logits = model.lm_head(h[0, b - 1])  # (R, V)
            pmask = torch.arange(L, device=dev)[None] < b[:, None]  # (R, L)
            model.caches = [M.PrefixKVCache(c.k, c.v, pmask, max_new_tokens) for c in model.caches]
            valid = torch.ones(len(b), max_new_tokens, dtype=torch.bool, device=dev)
            return M.decode(model, logits, b.clone(), valid, 0, max_new_tokens, temperature, top_p, 0,
                            STOP, None, tok, generator)
    finally:
        model.caches = None


@torch.no_grad()
def sample_practice_naive(model, tok, ids, bounds, k, temperature=1.0, top_p=1.0, max_new_tokens=64, generator=None):
    """The reference: a fresh prefill of each state, K samples each, one state at a time."""
    out_ids, out_lp = [], []
    for b in bounds:
        i, lp = M.generate(model, [ids[:b]] * k, max_new_tokens, temperature, top_p, tokenizer=tok,
                           stop=STOP, generator=generator)
        out_ids += i
        out_lp += lp
    return out_ids, out_lp


def inspect(model, tok, records: list[dict], k: int, temperature: float = 1.0, top_p: float = 1.0,
            max_new_tokens: int = 64, generator=None, out_path: str | None = None, shared: bool = True,
            log: Log | None = None, partial: str | None = None) -> list[dict]:
    """The inspection stage: K practices from every expert state of every trajectory, each compared
    with the expert's action. Returns step records (and writes them as JSONL to out_path):
    {traj_id, step, expert, expert_action, agent: [{text, action, match, logprob}]}.
    Under torchrun each rank inspects its shard of the records; every rank gets all step records.
    partial: as rollout's, kept after every record (a kill loses only the record being inspected)."""
    sampler = sample_practice if shared else sample_practice_naive
    mine, t0, shard, desc = partial and _rank_path(partial), time.time(), P.shard(records), f"inspect K={k}"
    key = {"records": [r["id"] for r in shard], "sampling": [k, temperature, top_p, max_new_tokens, shared]}
    # per_rec: the step records of each of this rank's records
    start, (per_rec, skipped), earlier = _resumed(mine, key, generator, desc) or (0, ([], 0), 0.0)
    was_training = model.training
    model.eval()
    for r, rec in enumerate(tqdm(shard, desc=desc, leave=False, dynamic_ncols=True, disable=not P.is_main())):
        if r < start:
            continue
        if mine and r > start:  # records 0..r-1 done
            _keep(mine, key, r, (per_rec, skipped), generator, earlier + time.time() - t0)
        msgs = to_messages(rec)
        ids, spans = turn_spans(tok, msgs)
        fits = [i for i, (s, _) in enumerate(spans) if s + max_new_tokens <= model.args.max_seq_len]
        skipped += len(spans) - len(fits)
        rec_steps = []
        per_rec.append(rec_steps)
        if not fits:
            continue
        outs, lps = sampler(model, tok, ids, [spans[i][0] for i in fits], k, temperature, top_p,
                            max_new_tokens, generator)
        experts = [m["content"] for m in msgs if m["role"] == "assistant"]
        for n, t in enumerate(fits):
            want = envs.normalize_action(envs.parse_action(experts[t]))
            agent = []
            for j in range(n * k, (n + 1) * k):
                text = clean_turn(tok.decode(outs[j]))
                act = envs.parse_action(text)
                agent.append({"text": text, "action": act, "match": envs.normalize_action(act) == want,
                              "logprob": float(sum(lps[j]))})
            rec_steps.append({"traj_id": rec["id"], "step": t, "expert": experts[t],
                              "expert_action": envs.parse_action(experts[t]), "agent": agent})
    if mine and len(shard) > start:
        _keep(mine, key, len(shard), (per_rec, skipped), generator, earlier + time.time() - t0)
    model.train(was_training)
    steps = [s for rec_steps in P.gather(per_rec) for s in rec_steps]
    skipped = P.all_sum({"skipped": skipped})["skipped"]
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


def pad_rows(rows: list[tuple], device, block: int = 256, width: int | None = None):
    """pack_row rows as one batch, right-padded to (B, N), in token_logprobs' argument order: tokens,
    targets, positions, mask, predicting columns. score_packed and train_irl's discriminator and
    per-token policy scoring share it. The mask is an M.BlockMask: the trajectory one causal block,
    its candidates in blocks of about `block` tokens (whole candidates, in order), each seeing the
    trajectory up to its last candidate's state and itself; padding is in no block. width: the
    model's attention width, which picks how a GPU attends (M.BlockMask)."""
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
    return (tokens.to(device), targets.to(device), pos.to(device), M.BlockMask(mask, blocks, device, width),
            src.clamp(min=0).to(device))


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
        lp = M.token_logprobs(model, *pad_rows(rows, model.device, width=M.attn_width(model)))
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
             must be computed under the iteration's starting policy (pi_ref, pi_old); picklable,
             cached in <run>/collect-<it>.pt so a resumed iteration trains on the same data;
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
        recs = expert_data(self.cfg)
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


def _check_run_config(run: str, cfg) -> None:
    """<run>/config.json records the run's options; resuming it with others (RESUMABLE aside) is refused,
    the option named. The tiny model's own options (NOVICE_TINY) shape nothing with another preset, so
    there they are not compared: a table run records its own defaults for them, its cell's printed
    script command (without them) must resume it."""
    path = os.path.join(run, "config.json")
    now = dataclasses.asdict(cfg)
    if os.path.exists(path):
        old = {**dataclasses.asdict(type(cfg)()), **json.load(open(path))}  # an option added since: its default
        skip = RESUMABLE | (set() if cfg.preset == "tiny" else set(NOVICE_TINY))
        diff = [k for k in now if k not in skip and old[k] != now[k]]
        if diff:
            k = diff[0]
            sys.exit(f"error: {run} holds a run with --{k} {old[k]!r}, not {now[k]!r}; "
                     f"rerun with the same options to resume, or choose another --out")
    if P.is_main():
        envs.write_json(path, now)


def _truncate_log(path: str, step: int, collect_pending: bool) -> list[dict]:
    """Drop per-step metric lines past the checkpoint (a killed run wrote them; the resumed run
    writes them again), so the file reads as one uninterrupted run. collect_pending: the next
    collect has no saved collect-<it>.pt, so the step-less event lines at the end (inspect, explore)
    came from a collect killed before its save, and the rerun logs them again. Returns the lines
    kept (rank 0; [] on the others, which write no log)."""
    if not (os.path.exists(path) and P.is_main()):
        return []
    raw = open(path).readlines()
    rows = [json.loads(x) for x in raw]
    keep = [i for i, x in enumerate(rows) if x.get("step", 0) <= step]
    while collect_pending and keep and "step" not in rows[keep[-1]]:
        keep.pop()
    envs.atomic_write(path, "".join(raw[i] for i in keep))
    return [rows[i] for i in keep]


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cached_evaluate(get_model, cfg: Config, split: str, n: int, out_dir: str, desc: str) -> dict:
    """evaluate(), unless out_dir already holds a summary of the same split, size and seed
    (get_model is called only when it evaluates)."""
    path = os.path.join(out_dir, "summary.json")
    if os.path.exists(path):
        s = json.load(open(path))
        if (s.get("split"), s.get("n"), s.get("seed")) == (split, n, cfg.seed):
            return s
    model, tok = get_model()
    return evaluate(model, tok, cfg, split, n, out_dir, desc=desc)


def train_iterations(cfg: Config, method: Method, title: str) -> list[tuple[str, dict]]:
    """The StepAgent loop, shared by both reflection strategies and their baselines:

        novice (SFT, cached) -> for it in 1..I: collect -> reflect -> dev + test evaluation -> checkpoint

    Files in <out>/<method.name>: metrics.jsonl (one line per optimiser step, plus iteration events, and a
    reevaluation event when a saved iteration's evaluation is re-run), collect-<it>.pt (and its
    wall time, collect-<it>-seconds.json; collect-<it>-partial.pt keeps a killed collect's finished
    rollout batches or inspected records until collect-<it>.pt is written),
    eval-iter<it>-{dev,test}/ (summary.json, trajectories.json), iter<it>/ (the policy in the Hugging
    Face layout), last/ (policy + optimiser + method state + trainer_state.json, written every
    save_every steps). Rerunning the same command after a crash or kill -9 resumes
    from last/ and ends with the same numbers as an uninterrupted run. Returns the table rows.

    Under torchrun every rank runs this loop: collect shards its inspection / rollouts and gathers
    them, each update takes this rank's slice of the global batch, rank 0 writes every file, and
    all ranks read last/ and collect-<it>.pt to resume."""
    seed_all(cfg.seed)
    novice = train_sft(cfg)
    run = os.path.join(cfg.out, method.name)
    _check_run_config(run, cfg)
    table = [("novice (SFT)", cached_evaluate(lambda: load(novice, cfg), cfg, "test", cfg.n_test,
                                              os.path.join(cfg.out, "eval", "sft-test"), "novice"))]
    last, metrics = os.path.join(run, "last"), os.path.join(run, "metrics.jsonl")
    M.restore_checkpoint(last)
    resumed = os.path.exists(os.path.join(last, "trainer_state.json"))
    model, tok = load(last if resumed else novice, cfg)
    if cfg.fsdp:
        P.fsdp_wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=method.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = {"iteration": 0, "batch": 0, "step": 0, "done": False}
    if resumed:
        state = json.load(open(os.path.join(last, "trainer_state.json")))
        P.load_optim_state(model, opt, os.path.join(last, "optimizer.pt"))
        method.load_state_dict(torch.load(os.path.join(last, "method.pt"), map_location=model.device,
                                          weights_only=False))
        where = "after its reflection" if state["done"] else f"after update {state['batch']}"
        print(f"resuming {run}: iteration {state['iteration'] + 1}, {where}")
    pending = not os.path.exists(os.path.join(run, f"collect-{state['iteration'] + 1 + state['done']}.pt"))
    kept = _truncate_log(metrics, state["step"], pending)  # on a fresh start too (a run killed before its first save)
    # iterations with their line (a kill after iter<N>/ was saved and before its line: logged below)
    logged = {x["iteration"] for x in kept if x.get("event") == "iteration"}
    log = Log(metrics)

    def save():
        state["machines"] = machines(state.get("machines"))  # every machine the run computed on
        full, opt_state = P.replica(model), P.optim_state(model, opt)
        if P.is_main():
            M.save_model(full, tok, last, extra={"trainer_state.json": state, "optimizer.pt": opt_state,
                                                 "method.pt": method.state_dict()})

    for it in range(cfg.iterations):
        # wall seconds of this iteration's collect / reflect, kept in last/'s trainer_state.json so that a
        # resumed run's iteration line counts the time before the restart too
        timed = dict(state.get("timed", {})) if it == state["iteration"] and state["step"] else {}
        if it > state["iteration"] or (it == state["iteration"] and not state["done"]):
            path = os.path.join(run, f"collect-{it + 1}.pt")
            t0, took = time.time(), os.path.join(run, f"collect-{it + 1}-seconds.json")  # its time beside it
            if os.path.exists(path):
                data = torch.load(path, weights_only=False)
                if os.path.exists(took):
                    timed.update(json.load(open(took)))
            else:
                partial = os.path.join(run, f"collect-{it + 1}-partial.pt")  # a killed collect's finished part
                t0 -= partial_seconds(partial)
                seed_all(cfg.seed * 1000 + it)
                g = torch.Generator(device=model.device).manual_seed(P.rank_seed(cfg.seed * 1000 + it))
                data = method.collect(P.replica(model), tok, it, g, partial)  # the same on every rank (gathered)
                timed["collect_seconds"] = round(time.time() - t0, 1)
                if P.is_main():
                    atomic_torch_save(data, path)
                    envs.write_json(took, {"collect_seconds": timed["collect_seconds"]})
                P.barrier()  # collect-<it>.pt is written before any rank drops its rollouts
                drop_partial(partial)
            n = method.n_updates(data)
            first = state["batch"] if state["iteration"] == it else 0
            t0, before = time.time(), (timed.get("reflect_seconds", 0.0), timed.get("timed_updates", 0))

            def clock(done: int) -> None:  # the reflection's time and updates so far, restarts included
                timed.update(reflect_seconds=round(before[0] + time.time() - t0, 1), timed_updates=before[1] + done - first)
            model.train()
            bar = tqdm(range(first, n), desc=f"reflect {it + 1}/{cfg.iterations}", dynamic_ncols=True,
                       disable=not P.is_main())
            for b in bar:
                m = method.update(model, opt, data, b, it)
                state = {"iteration": it, "batch": b + 1, "step": state["step"] + 1, "done": b + 1 == n, "timed": timed,
                         "machines": state.get("machines")}
                log.write(step=state["step"], iteration=it + 1, **m)
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(m.items())[:2]})
                if b + 1 < n and cfg.save_every and (b + 1) % cfg.save_every == 0:
                    clock(b + 1)
                    save()
            clock(n)
            state = {**state, "iteration": it, "done": True, "timed": timed}
            save()
        ckpt = os.path.join(run, f"iter{it + 1}")
        saved = os.path.exists(os.path.join(ckpt, "config.json"))
        P.barrier()  # every rank has looked before rank 0 writes it
        evaluated = []  # whether an evaluation ran now (cached_evaluate asked for the model)

        def get():  # the policy being trained, or an earlier iteration's checkpoint
            evaluated.append(True)
            return (P.replica(model), tok) if it == state["iteration"] else load(ckpt, cfg)
        dev = cached_evaluate(get, cfg, "dev", cfg.n_dev, os.path.join(run, f"eval-iter{it + 1}-dev"), "dev")
        test = cached_evaluate(get, cfg, "test", cfg.n_test, os.path.join(run, f"eval-iter{it + 1}-test"), "test")
        table.append((f"{title} iter {it + 1}", test))
        if not saved:
            full = P.replica(model)
            if P.is_main():
                M.save_model(full, tok, ckpt)
        if it + 1 not in logged or evaluated:  # a re-run evaluation of a logged iteration is logged as such
            log(event="iteration" if it + 1 not in logged else "reevaluation", iteration=it + 1, step=state["step"],
                dev_success=dev["success_rate"], dev_reward=dev["avg_reward"],
                test_success=test["success_rate"], test_reward=test["avg_reward"], **timed)
    print(f"\n{cfg.env}, seed {cfg.seed}, {cfg.n_test} test tasks")
    print("| model | success | avg reward | avg steps |\n| --- | --- | --- | --- |")
    for name, s in table:
        print(f"| {name} | {s['success_rate']:.3f} | {s['avg_reward']:.3f} | {s['avg_steps']:.1f} |")
    print(f"checkpoints (Hugging Face layout): {run}/iter<N>; evaluations: {run}/eval-iter<N>-test; "
          f"per-step metrics: {metrics}")
    return table


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("sft", "inspect", "eval"):
        usage = "usage: python stepagent.py sft|inspect|eval [--field value ...] (the options: sft --help)\n"
        if argv[:1] in (["-h"], ["--help"]):
            print_help(usage + __doc__.split("\n\n")[-1])
        sys.exit(usage + __doc__.split("\n\n")[-1])
    cmd, cfg = argv[0], parse_config(Config, argv[1:])
    P.dist_setup(cfg.device)
    seed_all(cfg.seed)
    if cmd == "sft":
        ckpt = train_sft(cfg)
        model, tok = load(ckpt, cfg)
        s = evaluate(model, tok, cfg, "test", cfg.n_test, os.path.join(cfg.out, "eval", "sft-test"))
        print(f"novice test: success {s['success_rate']:.3f}, reward {s['avg_reward']:.3f} on {s['n']} tasks "
              f"(seed {cfg.seed}); checkpoint {ckpt}")
        return
    model, tok = load(cfg.model or os.path.join(cfg.out, "sft"), cfg)
    if cmd == "eval":
        out = os.path.join(cfg.out, "eval", f"{os.path.basename(os.path.normpath(cfg.model or 'sft'))}-{cfg.split}")
        s = evaluate(model, tok, cfg, cfg.split, cfg.n_test, out)
        print(json.dumps(s, indent=1))
        print(f"trajectories and summary in {out}")
    else:
        recs = expert_data(cfg)[: cfg.n_inspect or None]
        path = os.path.join(cfg.out, "inspect.jsonl")
        g = torch.Generator(device=model.device).manual_seed(P.rank_seed(cfg.seed))
        partial = os.path.join(cfg.out, "inspect-partial.pt")  # a killed inspection's finished records
        steps = inspect(model, tok, recs, cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, g, path,
                        log=Log(os.path.join(cfg.out, "inspect_metrics.jsonl")), partial=partial)
        drop_partial(partial)
        print(f"{len(steps)} step records in {path}")


if __name__ == "__main__":
    main()
    P.dist_end()  # torchrun: leave together (a no-op in one process)
