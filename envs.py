"""Environments: the task protocol, trajectory files, and the command line.

The paper evaluates on WebShop, ALFWorld / ScienceWorld and HotpotQA. None of their data can be
downloaded here, so each family has an offline, generated version in its own file, in the same text
formats and action spaces as the original benchmark:

    env_webshop.py   web shopping (WebShop's text mode; loads the real data files when given)
    env_household.py embodied household tasks (ALFWorld's six task types and action set)
    env_hotpotqa.py  multi-hop QA in ReAct's search/lookup/finish format (loads real HotpotQA JSON)
    env_real.py      adapters for the real ScienceWorld and TextWorldExpress (optional extras)

This file holds what they share. The protocol, kept small on purpose:

    tasks = make(name, split, n=None, seed=0)    # list[Task]; splits train/dev/test(/test_unseen)
    env = load_env(name)                        # one env object per family, reusable across tasks
    obs = env.reset(task)                       # the first observation (task text included)
    obs, reward, done = env.step(turn)          # turn = the model's whole "Thought: ...\nAction: ..."
    turns = env.expert(task)                    # expert ReAct turns; replayed from reset -> reward 1

`env.max_steps` is the step limit and `env.prompt` the instruction text shown to the agent (what
the actions are). Model output never raises: a turn without a parseable action, or an impossible
action, gets an informative observation and costs a step; `env.INVALID` (a regex) matches the
start of exactly those observations, so evaluations can count invalid steps (`invalid()`).

    python envs.py dump --env webshop --split train --n 500 --out data/webshop_train.json
    python envs.py play --env household
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

SPLITS = ("train", "dev", "test", "test_unseen")


@dataclass
class Task:
    id: str  # unique across every split of the family, e.g. "webshop-test-17"
    env: str  # family name, as given to make() / load_env()
    split: str
    instruction: str  # the goal in words, as the agent sees it
    data: dict = field(default_factory=dict)  # JSON-serialisable; enough to rebuild the task exactly

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Task":
        return Task(**d)

    def fields(self, family: str, keys: tuple[str, ...]) -> dict:
        """The task's data; a one-line ValueError naming the task when it lacks any of `keys`."""
        d = self.data if isinstance(self.data, dict) else {}
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"task {self.id} (env {self.env!r}) is not a {family} task: its data has no "
                             f"{', '.join(map(repr, missing))}")
        return d


# name -> (module, class). Families are imported only when asked for, so the real environments'
# packages (and their Java runtime) are needed only by those who use them.
ENVS = {
    "webshop": ("env_webshop", "WebShopEnv"),
    "household": ("env_household", "HouseholdEnv"),
    "hotpotqa": ("env_hotpotqa", "HotpotQAEnv"),
    "scienceworld": ("env_real", "ScienceWorldEnv"),
    "textworld-express": ("env_real", "TextWorldExpressEnv"),
}


def env_class(name: str):
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; choose from {', '.join(ENVS)}")
    module, cls = ENVS[name]
    return getattr(importlib.import_module(module), cls)


def splits(name: str) -> tuple[str, ...]:
    """The splits family `name` has (the real simulators have no test_unseen)."""
    return getattr(env_class(name), "splits", SPLITS)


def load_env(name: str, **kwargs):
    """One environment object of family `name`; kwargs go to its constructor (e.g. data_dir=...)."""
    return env_class(name)(**kwargs)


def invalid(env, obs: str) -> bool:
    """Whether observation `obs` says the turn's action was not carried out: no parseable action,
    not a command, or impossible where the agent is (the family's `INVALID` pattern)."""
    pattern = getattr(env, "INVALID", None)
    return bool(pattern and pattern.match(obs))


def make(name: str, split: str, n: int | None = None, seed: int = 0, **kwargs) -> list[Task]:
    """Tasks of one split. Which tasks belong to which split never depends on `seed`; the seed only
    picks and orders the `n` tasks drawn from the split, so no task is in two splits for any seeds.
    An `n` larger than the split gives the whole split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"n={n!r}: expected a whole number >= 0, or None for the whole split")
    return env_class(name).make_tasks(split, n=n, seed=seed, **kwargs)


# ----------------------------------------------------------------------------- parsing the turn

# 'action:' in any case at a word start ("transaction:" is none), or 'Action:' glued to what precedes it,
# as small models write it ("I'll take it.2Action: take spoon 2")
_ACTION_RE = re.compile(r"(?:(?i:\baction)|Action)\s*:")


def parse_action(turn: str) -> str | None:
    """The action in a ReAct turn: the text after the last 'Action:' (first line of it; also when two
    are on one line); a bare turn with no 'Thought:'/'Action:' is taken as the action itself. None
    when nothing is left."""
    found = list(_ACTION_RE.finditer(turn))
    text = turn[found[-1].end():] if found else ("" if re.search(r"thought\s*:", turn, re.I) else turn)
    text = text.strip().split("\n")[0].strip()
    return text or None


def normalize_action(action: str | None) -> str:
    """Case, whitespace and bracket-content normalisation, for comparing agent and expert actions.
    (TextWorldExpress itself wants the exact lower-case text: a sampled "Take X" counts as a match
    here though the env would reject it; the models, trained on lower-case experts, rarely do that.)"""
    if not action:
        return ""
    a = action.strip().lower()
    a = re.sub(r"\s*\[\s*", "[", a)
    a = re.sub(r"\s*\]\s*", "]", a)
    return re.sub(r"\s+", " ", a).strip()


def react_turn(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}"


REACT_FORMAT = ("Answer each observation with one short thought and one action, in exactly this form:\n"
                "Thought: <your reasoning>\nAction: <one action>")
OBS = "Observation: "  # the head of every user turn after the first (expert files, rollouts, results' counts)


def instruction(env) -> str:
    """The agent's first-turn instruction: the env's action list, then the ReAct format. Expert
    files and the agent's prompts both use it, so SFT data and rollouts see the same text."""
    return f"{env.prompt}\n{REACT_FORMAT}"


# ----------------------------------------------------------------------------- trajectory files


def atomic_write(path: str, text: str) -> None:
    """Write text to path via a temp file in the same folder and a rename: a killed process never
    leaves a half-written file (no fsync: a power loss can still leave the old or an empty one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result gets ordinary modes
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def trajectory_record(task: Task, prompt: str, first_obs: str, turns: list[str], observations: list[str],
                      reward: float) -> dict:
    """One ETO/IPR-format record: human = prompt + first observation, then gpt/human alternating."""
    conv = [{"from": "human", "value": f"{prompt}\n\n{first_obs}" if prompt else first_obs}]
    for i, turn in enumerate(turns):
        conv.append({"from": "gpt", "value": turn})
        if i < len(observations):
            conv.append({"from": "human", "value": OBS + observations[i]})
    return {"id": task.id, "conversations": conv, "reward": float(reward), "task": task.to_json()}


def save_trajectories(path: str, records: list[dict]) -> None:
    write_json(path, records)


def load_trajectories(path: str) -> list[dict]:
    """Read an ETO/IPR-format file (ours or from elsewhere): a JSON list of {id, conversations, reward}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: trajectory file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of trajectories, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise ValueError(f"{path}: record {i} has no 'conversations' field")
        if not isinstance(rec["conversations"], list):
            raise ValueError(f"{path}: record {i} field 'conversations' should be a list of turns, "
                             f"got {type(rec['conversations']).__name__}")
        if not rec["conversations"]:
            raise ValueError(f"{path}: record {i} has an empty 'conversations' list")
        for j, turn in enumerate(rec["conversations"]):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or "value" not in turn:
                raise ValueError(f"{path}: record {i} turn {j}: expected {{'from': 'human'|'gpt', 'value': ...}}")
            if not isinstance(turn["value"], str):
                raise ValueError(f"{path}: record {i} turn {j}: 'value' should be a string, got "
                                 f"{type(turn['value']).__name__}")
            if turn["from"] != ("human" if j % 2 == 0 else "gpt"):  # a chat: the task's turn first, then by turns
                raise ValueError(f"{path}: record {i} turn {j}: a {turn['from']!r} turn where "
                                 f"{'human' if j % 2 == 0 else 'gpt'!r} belongs (turns alternate, a human turn first)")
        rec.setdefault("id", str(i))
        rec.setdefault("reward", None)
    return data


def run_expert(env, task: Task) -> dict:
    """Replay the expert from reset; returns the ETO record (with its final reward)."""
    first = env.reset(task)
    turns, observations, reward = env.expert(task), [], 0.0
    for turn in turns:
        obs, reward, done = env.step(turn)
        observations.append(obs)
        if done:
            break
    return trajectory_record(task, instruction(env), first, turns[: len(observations)], observations, reward)


# ----------------------------------------------------------------------------- command line


def _dump(args) -> None:
    from tqdm import tqdm

    env = load_env(args.env)
    tasks = make(args.env, args.split, n=args.n, seed=args.seed)
    records = [run_expert(env, t) for t in tqdm(tasks, desc=f"{args.env} experts")]
    solved = sum(r["reward"] >= 1.0 for r in records)
    save_trajectories(args.out, records)
    print(f"wrote {len(records)} expert trajectories ({solved} reach reward 1) to {args.out}")


def _play(args) -> None:
    env = load_env(args.env)
    task = make(args.env, args.split, n=1, seed=args.seed)[0]
    print(env.prompt, "\n")
    print(env.reset(task))
    plan = [parse_action(t) for t in env.expert(task)]  # fetched once, right after reset (as run_expert)
    taken: list[str] = []
    while len(taken) < env.max_steps:
        try:
            action = input(f"[{len(taken) + 1}/{env.max_steps}] > ").strip()
        except EOFError:
            return
        if action in ("expert", "?"):  # costs no step
            print(_expert_hint(plan, taken))
            continue
        taken.append(action)
        obs, reward, done = env.step(action)
        print(obs)
        if done:
            print(f"done: reward {reward:.3f}")
            return
    print("step limit reached")


def _expert_hint(plan: list[str], taken: list[str]) -> str:
    """The expert's actions from here while the player has followed it, else where the paths parted."""
    same = [normalize_action(parse_action(a)) == normalize_action(p) for a, p in zip(taken, plan)]
    if all(same) and len(taken) <= len(plan):
        return "expert, from here: " + (" | ".join(plan[len(taken):]) or "(its plan is done)")
    j = same.index(False) if not all(same) else len(plan)
    return (f"you left the expert's path at step {j + 1} (it has no plan from here); "
            f"its plan from the start: {' | '.join(plan)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write expert trajectories in the ETO format")
    d.add_argument("--env", default="webshop", choices=list(ENVS))
    d.add_argument("--split", default="train", choices=SPLITS)
    d.add_argument("--n", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    q = sub.add_parser("play", help="play one task in the terminal (type 'expert' for the expert's actions)")
    q.add_argument("--env", default="household", choices=list(ENVS))
    q.add_argument("--split", default="dev", choices=SPLITS)
    q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        {"dump": _dump, "play": _play}[args.cmd](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
