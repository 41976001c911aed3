"""The ReAct agent: conversations as chat prompts, rollouts of many tasks in lockstep, and the
evaluation (greedy play of held-out tasks from the start, paper §4).

Departure: a conversation longer than the model's context drops its oldest observation/action
pairs (`fit_context`); the task's first turn always stays.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

import envs
import generate as G
import model as M
import parallel as P
import runtime as RT
import tokenizer as T

if TYPE_CHECKING:
    from stepagent import Config


# ----------------------------------------------------------------------------- conversations


_noted: set[str] = set()  # the context notes already given (each said once a process)


CONTEXT_CUT = 0.25  # share of the prompt budget an overflowing conversation frees at once (0: a pair at a time)


def to_messages(record: dict) -> list[dict]:
    """ETO/IPR conversations -> chat messages (human -> user, gpt -> assistant)."""
    return [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]}
            for c in record["conversations"]]


def fit_context(tok: T.Tokenizer, messages: list[dict], budget: int, keep: int = 1, drop: int = 0):
    """(ids, drop): token ids of the chat (ending in a generation prompt) with `drop` assistant/user
    pairs left out after its first `keep` messages (the task's first user turn, and a one-shot
    example before it). When that is over `budget`, more pairs go at once: enough to bring it down
    to (1 - CONTEXT_CUT) of the budget, so the next turns append to an unchanged history and
    model.ChatCache re-prefills a conversation once per quarter-context of new turns, not at every
    turn. The caller keeps `drop` per conversation. Says once that it happened."""
    def chat(d):
        return tok.encode_chat(messages[:keep] + messages[keep + 2 * d:], add_generation_prompt=True)[0]
    ids, before = chat(drop), drop
    if len(ids) > budget:
        while len(ids) > int(budget * (1 - CONTEXT_CUT)) and keep + 2 * drop + 3 <= len(messages):
            drop += 1
            ids = chat(drop)
        if drop > before:
            _note_once("pairs", f"note: a conversation exceeded the context ({budget} tokens for the prompt); "
                                "dropping its oldest observation/action pairs (said once)")
        if len(ids) > budget:  # what must stay (the task's first turn) is longer than the budget itself
            _note_once("head", f"note: a task's first turn ({len(ids)} tokens with the prompt's frame) is longer "
                               f"than the {budget} tokens the context leaves beside --max_new_tokens; only its last "
                               f"{budget} are kept (raise --context or lower --max_new_tokens; said once)")
            ids = ids[-budget:]
    return ids, drop


def _note_once(kind: str, text: str) -> None:
    if kind not in _noted:
        _noted.add(kind)
        tqdm.write(text)


def turn_spans(tok: T.Tokenizer, messages: list[dict], max_len: int | None = None):
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


def turn_ids(tok: T.Tokenizer, text: str) -> list[int]:
    """The tokens an assistant turn `text` has inside a chat (content + end-of-turn), for scoring."""
    ids, mask = tok.encode_chat([{"role": "user", "content": "."}, {"role": "assistant", "content": text}])
    return [i for i, m in zip(ids, mask) if m]


# a turn is one thought and one action: text that starts another ends it (an undertrained model rambles)
STOP = ["\nObservation", "\nThought:"]


def clean_turn(text: str) -> str:
    """The model's turn as the env sees it: cut where a next observation or thought would start."""
    for cut in STOP + ["<|im_end|>"]:
        text = text.split(cut)[0]
    return text.strip()


# ----------------------------------------------------------------------------- rollouts and evaluation


def rollout(model: M.Transformer, tok: T.Tokenizer, env_name: str, tasks: list[envs.Task], temperature=0.0,
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
    budget = model.args.max_seq_len - max_new_tokens
    keep = len(one_shot or []) + 1  # the example and the task's first user turn always stay
    pool = [envs.load_env(env_name, **(env_kwargs or {})) for _ in range(min(batch, len(tasks)))]
    key = {"tasks": [t.id for t in tasks], "sampling": [temperature, top_p, max_new_tokens, batch]}
    kept = RT.Partial(partial, key, generator, desc, results=[None] * len(tasks))
    results = kept.results
    bar = tqdm(total=len(tasks), initial=kept.done, desc=desc, leave=False, dynamic_ncols=True,
               disable=not P.is_main())
    for lo in range(kept.done, len(tasks), batch):
        live = [_begin(env, tasks[i], i) for env, i in zip(pool, range(lo, min(lo + batch, len(tasks))))]
        cache = G.ChatCache(model, len(live)) if reuse_cache else None  # each turn prefills only its new tokens
        while live:
            prompts = []
            for s in live:
                ids, s["drop"] = fit_context(tok, (one_shot or []) + s["msgs"], budget, keep, s["drop"])
                prompts.append(ids)
            outs, _ = G.generate(model, prompts, max_new_tokens, temperature, top_p, tokenizer=tok,
                                 stop=STOP, generator=generator, cache=cache)
            going = []  # indices into live of the tasks still playing
            for j, (s, out) in enumerate(zip(live, outs)):
                if _step(s, clean_turn(tok.decode(out))):
                    going.append(j)
                else:
                    results[s["i"]] = _record(s, tasks[s["i"]])
                    bar.update(1)
            if cache is not None:
                cache.keep(going)
            live = [live[j] for j in going]
        kept.save(min(lo + batch, len(tasks)))
    for env in pool:
        getattr(env, "close", lambda: None)()
    bar.close()
    return P.gather(results)


def _begin(env, task: envs.Task, i: int) -> dict:
    """A task's live state: the env reset, the conversation opened with its instruction."""
    first = env.reset(task)  # (some envs set max_steps per task here)
    msgs = [{"role": "user", "content": f"{envs.instruction(env)}\n\n{first}"}]
    return {"i": i, "env": env, "msgs": msgs, "reward": 0.0, "steps": 0, "drop": 0, "invalid": []}


def _step(s: dict, turn: str) -> bool:
    """One turn of a live task: the env's reply appended to its conversation; False once it is over."""
    obs, reward, done = s["env"].step(turn)
    if envs.invalid(s["env"], obs):
        s["invalid"].append(s["steps"])
    s["steps"] += 1
    s["msgs"] += [{"role": "assistant", "content": turn}, {"role": "user", "content": envs.OBS + obs}]
    s["reward"] = reward
    return not (done or s["steps"] >= s["env"].max_steps)  # envs end at their limit; this is a guard


def _record(s: dict, task: envs.Task) -> dict:
    """A finished task as an ETO record, with reward, success, steps and invalid_steps added."""
    conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in s["msgs"]]
    return {"id": task.id, "conversations": conv, "reward": float(s["reward"]), "success": s["reward"] >= 1.0,
            "steps": s["steps"], "invalid_steps": s["invalid"], "task": task.to_json()}


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
    t0 = time.time() - (RT.partial_seconds(partial) if partial else 0.0)
    was_training = model.training
    model.eval()
    recs = rollout(model, tok, cfg.env, tasks, 0.0, 1.0, cfg.max_new_tokens, cfg.eval_batch, one_shot=shot,
                   desc=f"{desc} {split}", partial=partial)
    model.train(was_training)
    per, steps, bad = max(1, len(recs)), sum(r["steps"] for r in recs), sum(len(r["invalid_steps"]) for r in recs)
    summary = {"env": cfg.env, "split": split, "n": len(recs), "seed": cfg.seed,
               "avg_reward": sum(r["reward"] for r in recs) / per, "success_rate": sum(r["success"] for r in recs) / per,
               "avg_steps": steps / per, "invalid_steps": bad, "invalid_share": bad / max(1, steps),
               "seconds": time.time() - t0, "machine": RT.machine()}
    if out_dir and P.is_main():
        envs.save_trajectories(os.path.join(out_dir, "trajectories.json"), recs)
        envs.write_json(os.path.join(out_dir, "summary.json"), summary)
    if partial:
        RT.drop_partial(partial)
    return summary


def cached_evaluate(get_model, cfg: Config, split: str, n: int, out_dir: str, desc: str) -> dict:
    """evaluate(), unless out_dir already holds a summary of the same split, size and seed
    (get_model is called only when it evaluates)."""
    path = os.path.join(out_dir, "summary.json")
    if os.path.exists(path):
        s = RT.read_json(path, "delete it to evaluate again")
        if isinstance(s, dict) and (s.get("split"), s.get("n"), s.get("seed")) == (split, n, cfg.seed):
            return s
    model, tok = get_model()
    return evaluate(model, tok, cfg, split, n, out_dir, desc=desc)
