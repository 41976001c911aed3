"""Adapters for the real ScienceWorld and TextWorldExpress simulators (optional extras).

ScienceWorld (Wang et al. 2022; one of the paper's benchmarks, as in ETO/IPR) and TextWorldExpress
(Jansen & Cote 2022; its `twc` game is the commonsense household game closest to ALFWorld) are Scala
simulators driven from Python through py4j. They come from PyPI (`pip install scienceworld` /
`pip install textworld-express`) and need Java 17; both packages are imported only inside the
constructors, so the rest of the project runs without them. One JVM is started per env object and
reused across resets (starting it takes ~1 s, loading a ScienceWorld task up to a few seconds).

ScienceWorldEnv ("scienceworld")
    Tasks are (task type, variation) pairs in ScienceWorld's own train/dev/test variation split
    (contiguous variation ranges per task type; the table `SCIWORLD_TASK_TYPES` mirrors what
    `get_variations_train/dev/test` return in scienceworld 1.2.3, checked by the tests). There is no
    test_unseen split: ScienceWorld's test variations are already its held-out ones.
    The first observation is the task description, a blank line, then the `look around` output.
    Reward: 0 until done; at the end the score / 100, negatives (failed tasks) clipped to 0.
    Done on completion, on failure (score < 0) or at the step limit, which is per task:
    1.5 x the length of ScienceWorld's gold path, clipped to [30, 100], but never less than
    gold + 10 so that the gold path always fits.
    The expert is ScienceWorld's gold action sequence (from `load(..., generateGoldPath=True)`)
    with short thoughts derived from each action. ScienceWorld is not fully deterministic (the same
    actions can complete a task a tick earlier or later from one load to the next, and the gold
    path generated can differ by a step), so the expert is the gold path made with the episode's
    own load, kept whole. Gold paths go on past completion (usually 1-3 steps of `wait1` /
    `look around` / re-measuring; grow-plant 28, some boil variations ~60), so the episode ends
    where the task completes, often before the expert's last turn: replay it until done, as
    `envs.run_expert` does. The expert of a task other than the current episode's comes from a
    second simulator, started on first need, so that the episode in progress is not disturbed.
    Departures: the three task types whose gold paths are long throughout (mendelian genetics x2,
    ~145 steps; friction with unnamed surfaces, 60-225) are left out by default (`task_types=`
    brings them back): their trajectories are far beyond a small model's context. (Some variations
    of other types, e.g. boil, freeze, the inclined planes, also run past 100 steps; they keep
    their gold + 10 step limit.) No type is left out as unreliable:
    on 270 variations (9 per type, 3 from each split) every gold path, replayed through this
    adapter, completed the task with score 100 in scienceworld 1.2.3.
    Steps go to the Scala side directly (`server.step`), not through the Python wrapper's
    `step`, which also fetches every valid action (~0.1 s per step instead of ~10 ms).

TextWorldExpressEnv ("textworld-express")
    Games `twc` (default), `cookingworld`, `coin`, chosen with `game=` in make_tasks and the
    constructor; the game and its parameters are stored in Task.data and the game in the task id.
    Splits are the package's seed folds (train 0-999, dev 10000-10999, test 20000-20999, each
    played with its own gameFold; in twc the folds also hold different objects; coin's do not, and
    its 3 rooms repeat: 1000 train seeds make 134 distinct games and about half of its test tasks
    are train games, so coin measures memorisation, twc generalisation). Small game
    parameters (`TWX_GAMES`): twc 1 room and 2 items to put away; cookingworld 1 room, 2
    ingredients, 2 distractors; coin 3 rooms. No doors, unlimited inventory. Step limit 50.
    Reward: 1.0 on task success, 0.0 on task failure, else (step limit) the package's normalised
    score in [0, 1) as partial credit. The expert is the package's gold path without its leading
    `look around` (the first observation already is the room description).

Both: the first observation is "<task description>\n\n<room description>"; invalid actions get the
simulator's own message ("No known action matches that input." / "Unknown action: I'm not sure
what you mean.") and cost a step; a turn with no parseable action gets our own message and also
costs a step. `env.max_steps` and `env.prompt` are set per task by `reset` (the step limit depends
on the task in ScienceWorld, the prompt on the game in TextWorldExpress).
"""
from __future__ import annotations

import importlib
import math
import random
import re
import subprocess
import zlib

from envs import Task, parse_action, react_turn

_NO_ACTION = ("Invalid turn: no action found. End the turn with one line 'Action: <command>', "
              "e.g. 'Action: look around'.")
_EPISODE_OVER = "The episode is over. Reset the environment to start a new task."


def _import(module: str, pip_name: str, env_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the {env_name!r} env needs the {pip_name!r} package (and Java 17): "
                          f"pip install {pip_name}") from None


def _close_jvm(sim) -> None:
    """The package's close, then a wait for its JVM to exit (~30 ms): its __del__ closes again at
    garbage collection and, if the JVM is still shutting down then, prints a BrokenPipeError."""
    sim.close()
    proc = getattr(getattr(sim, "_gateway", None), "java_process", None)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _interleave(groups: list[list], rng: random.Random) -> list:
    """Round-robin over groups (each shuffled, group order shuffled): a drawn prefix of any length
    covers the task types evenly instead of being dominated by the types with most variations."""
    groups = [rng.sample(g, len(g)) for g in groups if g]
    rng.shuffle(groups)
    out, i = [], 0
    while groups:
        groups = [g for g in groups if len(g) > i]
        out.extend(g[i] for g in groups)
        i += 1
    return out


# ----------------------------------------------------------------------------- thoughts

_NUMERIC = re.compile(r"^\d+$")


def _thought(action: str, coin: bool = False) -> str:
    """A short reason for an expert action, from its verb and objects. The gold paths carry no
    reasoning; this gives the model a situational thought (naming the objects) without
    pretending to knowledge the action does not show."""
    a = action.strip()
    low = a.lower()
    m = None

    def obj(pattern: str) -> bool:
        nonlocal m
        m = re.match(pattern, low)
        return m is not None

    if _NUMERIC.match(low):
        return f"Several things match that name; option {low} is the one I mean."
    if low == "look around":
        return "I should look around to see what is here."
    if low == "inventory":
        return "Let me check what I am carrying."
    if re.match(r"^wait\d*$", low):
        return "Now I need to wait for the process to advance."
    if low == "prepare meal":
        return "I have all the ingredients prepared, so I can prepare the meal."
    if low == "eat meal":
        return "The meal is ready; eating it finishes the task."
    if obj(r"^open door to (.+)$"):
        return f"The door to the {m[1]} is closed, so I will open it."
    if obj(r"^go to (.+)$"):
        return f"I should go to the {m[1]}."
    if obj(r"^move (north|south|east|west)$"):
        return (f"The coin is not here, so I will move {m[1]} to keep searching." if coin
                else f"I should move {m[1]}.")
    if obj(r"^open (.+)$"):
        return f"I should open the {m[1]} to get at what is inside."
    if obj(r"^close (.+)$"):
        return f"I am done with the {m[1]}, so I will close it."
    if obj(r"^(?:pick up|take) (.+)$"):
        return ("There is the coin; I will take it." if coin and m[1] == "coin"
                else f"I need the {m[1]}, so I will pick it up.")
    if obj(r"^put down (.+)$"):
        return f"I no longer need to carry the {m[1]}, so I will put it down."
    if obj(r"^put (.+) (?:in|on) (.+)$"):
        return f"The {m[1]} belongs in the {m[2]}, so I will put it there."
    if obj(r"^move (.+) to (.+)$"):
        return f"I should move the {m[1]} to the {m[2]}."
    if obj(r"^(?:pour|dunk) (.+) (?:in|into) (.+)$"):
        return f"I should pour the {m[1]} into the {m[2]}."
    if obj(r"^focus on (.+)$"):
        return f"The {m[1]} is what the task is about, so I will focus on it."
    if obj(r"^activate (.+)$"):
        return f"I will turn on the {m[1]}."
    if obj(r"^deactivate (.+)$"):
        return f"That is enough; I will turn off the {m[1]}."
    if obj(r"^connect (.+) to (.+)$"):
        return f"To close the circuit I will connect the {m[1]} to the {m[2]}."
    if obj(r"^disconnect (.+)$"):
        return f"I should disconnect the {m[1]}."
    if obj(r"^mix (.+)$"):
        return f"Everything is in the {m[1]} now, so I will mix it."
    if obj(r"^examine (.+)$"):
        return f"Let me examine the {m[1]} to check its state."
    if obj(r"^look (?:at|in) (.+)$"):
        return f"Let me take a closer look at the {m[1]}."
    if obj(r"^read (.+)$"):
        return f"I should read the {m[1]} to learn what to do."
    if obj(r"^use (.+) on (.+)$"):
        return f"I will use the {m[1]} on the {m[2]}."
    if obj(r"^(slice|dice|chop) (.+)$"):
        past = {"slice": "sliced", "dice": "diced", "chop": "chopped"}[m[1]]
        return f"The recipe wants the {m[2]} {past}, so I will {m[1]} it."
    if obj(r"^cook (.+) (?:in|on|with) (.+)$"):
        how = {"oven": "roasted", "toaster": "grilled", "stove": "fried"}.get(m[2], "cooked")
        return f"The recipe wants the {m[1]} {how}, so I will cook it in the {m[2]}."
    if obj(r"^eat (.+)$"):
        return f"I will eat the {m[1]}."
    if obj(r"^flush (.+)$"):
        return f"I will flush the {m[1]}."
    return f"Next I should {a}."


# ----------------------------------------------------------------------------- ScienceWorld

# task type -> (number of variations, train variations, dev variations, short goal). Variations
# [0, train) are ScienceWorld's train split, the next `dev` its dev split, the rest its test split
# (as get_variations_train/dev/test report in scienceworld 1.2.3; tests/test_env_real.py checks it).
# The goal is only the Task.instruction summary: the agent sees the simulator's own description.
SCIWORLD_TASK_TYPES: dict[str, tuple[int, int, int, str]] = {
    "boil": (30, 14, 7, "Boil a substance."),
    "change-the-state-of-matter-of": (30, 14, 7, "Change the state of matter of a substance."),
    "chemistry-mix": (32, 16, 8, "Mix chemicals to make a new substance."),
    "chemistry-mix-paint-secondary-color": (36, 18, 9, "Mix paints to make a secondary colour."),
    "chemistry-mix-paint-tertiary-color": (36, 18, 9, "Mix paints to make a tertiary colour."),
    "find-animal": (300, 150, 75, "Find an animal."),
    "find-living-thing": (300, 150, 75, "Find a living thing."),
    "find-non-living-thing": (300, 150, 75, "Find a non-living thing."),
    "find-plant": (300, 150, 75, "Find a plant."),
    "freeze": (30, 14, 7, "Freeze a substance."),
    "grow-fruit": (126, 62, 31, "Grow a fruit."),
    "grow-plant": (126, 62, 31, "Grow a plant."),
    "identify-life-stages-1": (14, 6, 3, "Identify the life stages of a plant."),
    "identify-life-stages-2": (10, 4, 2, "Identify the life stages of an animal."),
    "inclined-plane-determine-angle": (168, 84, 42, "Compare the angles of inclined planes."),
    "inclined-plane-friction-named-surfaces": (1386, 692, 346, "Compare the friction of known surfaces."),
    "inclined-plane-friction-unnamed-surfaces": (162, 80, 40, "Compare the friction of unknown surfaces."),
    "lifespan-longest-lived": (125, 62, 31, "Find the longest-lived animal."),
    "lifespan-longest-lived-then-shortest-lived": (125, 62, 31, "Find the longest- then the shortest-lived animal."),
    "lifespan-shortest-lived": (125, 62, 31, "Find the shortest-lived animal."),
    "measure-melting-point-known-substance": (436, 218, 109, "Measure the melting point of a known substance."),
    "measure-melting-point-unknown-substance": (300, 150, 75, "Measure the melting point of an unknown substance."),
    "melt": (30, 14, 7, "Melt a substance."),
    "mendelian-genetics-known-plant": (120, 60, 30, "Find a dominant trait by breeding known plants."),
    "mendelian-genetics-unknown-plant": (480, 240, 120, "Find a dominant trait by breeding unknown plants."),
    "power-component": (20, 10, 5, "Build an electrical circuit."),
    "power-component-renewable-vs-nonrenewable-energy": (20, 10, 5, "Power a device from a renewable source."),
    "test-conductivity": (900, 450, 225, "Test the electrical conductivity of an object."),
    "test-conductivity-of-unknown-substances": (600, 300, 150, "Test the conductivity of an unknown substance."),
    "use-thermometer": (540, 270, 135, "Measure a temperature with a thermometer."),
}
# Gold paths of ~60-225 steps: far beyond a small model's context, so not drawn unless asked for.
SCIWORLD_LONG_TASK_TYPES = ("inclined-plane-friction-unnamed-surfaces", "mendelian-genetics-known-plant",
                            "mendelian-genetics-unknown-plant")

SCIWORLD_PROMPT = """You are in a science lab simulator. Actions (OBJ/LOC are names from the observations):
look around | look at OBJ | look in OBJ | go to LOC | open OBJ | close OBJ | pick up OBJ | put down OBJ
move OBJ to OBJ | pour OBJ in OBJ | mix OBJ | activate OBJ | deactivate OBJ | use OBJ on OBJ
connect OBJ to OBJ | disconnect OBJ | examine OBJ | read OBJ | eat OBJ | focus on OBJ | wait | wait1 | inventory
"focus on" only the object the task names: focusing on a wrong one fails the task.
When asked to choose between ambiguous objects, answer with the option's number."""


def sciworld_step_limit(gold_len: int) -> int:
    """1.5 x the gold path clipped to [30, 100], never less than gold + 10 (so the gold path fits)."""
    return max(min(100, max(30, math.ceil(1.5 * gold_len))), gold_len + 10)


class ScienceWorldEnv:
    """The real ScienceWorld through the `scienceworld` package; one JVM per object. Invalid steps
    (INVALID) are those the parser rejects; an action that parses but cannot be done ("The banana is
    not openable.") is not counted, so its invalid share is a lower bound, unlike the other envs'."""

    name = "scienceworld"
    splits = ("train", "dev", "test")
    INVALID = re.compile(r"Invalid turn: no action found|No known action matches that input")

    @classmethod
    def make_tasks(cls, split: str, n: int | None = None, seed: int = 0,
                   task_types: list[str] | tuple[str, ...] | None = None) -> list[Task]:
        if split == "test_unseen":
            raise ValueError("scienceworld has no test_unseen split (its test variations are the held-out "
                             "ones); use train, dev or test")
        if split not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {split!r} for scienceworld; choose from train, dev, test")
        if task_types is None:
            task_types = [t for t in SCIWORLD_TASK_TYPES if t not in SCIWORLD_LONG_TASK_TYPES]
        unknown = [t for t in task_types if t not in SCIWORLD_TASK_TYPES]
        if unknown:
            raise ValueError(f"unknown ScienceWorld task type(s) {unknown}; choose from {', '.join(SCIWORLD_TASK_TYPES)}")
        groups = []
        for t in sorted(set(task_types)):
            total, n_train, n_dev, _ = SCIWORLD_TASK_TYPES[t]
            lo, hi = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, total)}[split]
            groups.append([(t, v) for v in range(lo, hi)])
        pairs = _interleave(groups, random.Random(f"scienceworld-{split}-{seed}"))
        if n is not None:
            pairs = pairs[:n]
        return [Task(id=f"scienceworld-{split}-{t}-{v}", env=cls.name, split=split,
                     instruction=f"{SCIWORLD_TASK_TYPES[t][3]} (ScienceWorld {t}, variation {v})",
                     data={"task_name": t, "variation": v}) for t, v in pairs]

    def __init__(self, max_steps: int | None = None) -> None:
        """max_steps: a fixed step limit for every task instead of the per-task one."""
        self._sw = _import("scienceworld", "scienceworld", self.name)
        # The wrapper's own step limit and bookkeeping are bypassed: we count steps ourselves.
        self._sim = self._sw.ScienceWorldEnv("", envStepLimit=10**9)
        self._server = self._sim.server
        self._aux = None  # a second simulator, started only to fetch gold paths of other tasks
        self._fixed_max_steps = max_steps
        self.max_steps = max_steps or 100  # set per task by reset
        self.prompt = SCIWORLD_PROMPT
        self._gold: dict[tuple[str, int], list[str]] = {}  # the latest gold path of each task
        self._steps = 0
        self._done = True
        self._reward = 0.0

    @staticmethod
    def _key(task: Task) -> tuple[str, int]:
        return task.data["task_name"], int(task.data["variation"])

    def reset(self, task: Task) -> str:
        key = self._key(task)
        self._sim.load(key[0], key[1], "", generateGoldPath=True)
        self._gold[key] = self._sim.get_gold_action_sequence()
        look = self._server.step("look around")  # a freshly loaded task is at its first move
        self._steps, self._done, self._reward = 0, False, 0.0
        self.max_steps = self._fixed_max_steps or sciworld_step_limit(len(self._gold[key]))
        return f"{self._server.getTaskDescription().strip()}\n\n{look.strip()}"

    def step(self, turn: str) -> tuple[str, float, bool]:
        if self._done:
            return _EPISODE_OVER, self._reward, True
        self._steps += 1
        action = parse_action(turn)
        obs = _NO_ACTION if action is None else self._server.step(action).strip()
        score = self._server.getScore()  # 0..1; negative when the task has failed
        if self._server.getCompleted() or score < 0 or self._steps >= self.max_steps:
            self._done = True
            self._reward = max(0.0, round(100 * score) / 100)  # ScienceWorld's integer score / 100
        return obs, (self._reward if self._done else 0.0), self._done

    def expert(self, task: Task) -> list[str]:
        """The gold path generated with the task's latest load, whole. ScienceWorld is not fully
        deterministic across loads (electrical and thermal updates can land a tick apart, and the
        generated gold path can differ by a step or two), so the path made for the episode's own
        load is the one to follow, and its final steps ('wait1', 'look around', re-measuring) are
        slack: the episode ends where the task completes, which may be before the last turn."""
        key = self._key(task)
        if key not in self._gold:
            # Another task: reloading the shared simulator would change the episode in progress,
            # and it could not be replayed exactly; a second simulator fetches the path instead.
            if self._aux is None:
                self._aux = self._sw.ScienceWorldEnv("", envStepLimit=10**9)
            self._aux.load(key[0], key[1], "", generateGoldPath=True)
            self._gold[key] = self._aux.get_gold_action_sequence()
        return [react_turn(_thought(a), a) for a in self._gold[key]]

    def close(self) -> None:
        for sim in (self._sim, self._aux):
            if sim is not None:
                _close_jvm(sim)


# ----------------------------------------------------------------------------- TextWorldExpress

# game -> (small generation parameters, task description, step limit)
TWX_GAMES: dict[str, tuple[str, str, int]] = {
    "twc": ("numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0",
            "Your task is to pick up objects, then place them in their usual locations in the environment.", 50),
    "cookingworld": ("numLocations=1,numIngredients=2,numDistractorItems=2,includeDoors=0,limitInventorySize=0",
                     "You are hungry! Let's cook a delicious meal. Check the cookbook in the kitchen for the recipe. "
                     "Once done, enjoy your meal!", 50),
    "coin": ("numLocations=3,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
             "Your task is to search the environment and find the coin.  Once you find the coin, take it.", 50),
}
# The package's seed folds (identical for every game; tests check them against getValidSeeds*).
TWX_SEEDS = {"train": range(0, 1000), "dev": range(10000, 11000), "test": range(20000, 21000)}

_TWX_COMMON = "look around | inventory | examine OBJ | take OBJ | open OBJ | close OBJ"
TWX_PROMPTS = {
    "twc": "You are in a house. Actions (OBJ names come from the observations):\n"
           f"{_TWX_COMMON} | put OBJ in OBJ | put OBJ on OBJ | move DIRECTION",
    "cookingworld": "You are in a house with a kitchen. Actions (OBJ names come from the observations):\n"
                    f"{_TWX_COMMON} | read OBJ | slice OBJ | dice OBJ | chop OBJ | cook OBJ in APPLIANCE\n"
                    "prepare meal | eat meal | move DIRECTION\n"
                    "Slicing, dicing and chopping need the knife; cook in the stove (fry), oven (roast) or toaster (grill).",
    "coin": "You are in a house. Actions (OBJ names come from the observations):\n"
            f"{_TWX_COMMON} | move north | move south | move east | move west",
}


class TextWorldExpressEnv:
    """The real TextWorldExpress through the `textworld_express` package; one JVM per object."""

    name = "textworld-express"
    splits = ("train", "dev", "test")
    INVALID = re.compile(r"Invalid turn: no action found|Unknown action")

    @classmethod
    def make_tasks(cls, split: str, n: int | None = None, seed: int = 0, game: str = "twc",
                   params: str | None = None) -> list[Task]:
        """params: TextWorldExpress generation parameters replacing the game's default ones."""
        if game not in TWX_GAMES:
            raise ValueError(f"unknown TextWorldExpress game {game!r}; choose from {', '.join(TWX_GAMES)}")
        if split == "test_unseen":
            raise ValueError("textworld-express has no test_unseen split; use train, dev or test")
        if split not in TWX_SEEDS:
            raise ValueError(f"unknown split {split!r} for textworld-express; choose from train, dev, test")
        default_params, description, _ = TWX_GAMES[game]
        params = default_params if params is None else params
        # Non-default parameters make different games from the same seed: keep their ids apart.
        tag = "" if params == default_params else f"-p{zlib.crc32(params.encode()):08x}"
        seeds = list(TWX_SEEDS[split])
        random.Random(f"textworld-express-{game}-{split}-{seed}").shuffle(seeds)
        if n is not None:
            seeds = seeds[:n]
        return [Task(id=f"twx-{game}{tag}-{split}-{s}", env=cls.name, split=split, instruction=description,
                     data={"game": game, "params": params, "seed": s, "fold": split}) for s in seeds]

    def __init__(self, game: str = "twc", max_steps: int | None = None) -> None:
        """game: the game whose prompt is shown until the first reset (reset follows each task's game).
        max_steps: a fixed step limit instead of the game's."""
        if game not in TWX_GAMES:
            raise ValueError(f"unknown TextWorldExpress game {game!r}; choose from {', '.join(TWX_GAMES)}")
        twx = _import("textworld_express", "textworld-express", self.name)
        self._sim = twx.TextWorldExpressEnv(envStepLimit=10**9)  # we count steps ourselves
        self._fixed_max_steps = max_steps
        self._loaded: tuple[str, str] | None = None  # (game, params) the simulator holds
        self.max_steps = max_steps or TWX_GAMES[game][2]
        self.prompt = TWX_PROMPTS[game]
        self._expert: dict[str, list[str]] = {}
        self._task: Task | None = None
        self._actions: list[str] = []
        self._steps = 0
        self._done = True
        self._reward = 0.0

    def _start(self, task: Task) -> tuple[str, dict]:
        d = task.data
        if self._loaded != (d["game"], d["params"]):
            self._sim.load(d["game"], d["params"])
            self._loaded = (d["game"], d["params"])
        return self._sim.reset(seed=int(d["seed"]), gameFold=d["fold"], generateGoldPath=True)

    def reset(self, task: Task) -> str:
        obs, info = self._start(task)
        self._task, self._actions, self._steps, self._done, self._reward = task, [], 0, False, 0.0
        game = task.data["game"]
        self.max_steps = self._fixed_max_steps or TWX_GAMES[game][2]
        self.prompt = TWX_PROMPTS[game]
        return f"{info['taskDescription'].strip()}\n\n{obs.strip()}"

    def step(self, turn: str) -> tuple[str, float, bool]:
        if self._done:
            return _EPISODE_OVER, self._reward, True
        self._steps += 1
        action = parse_action(turn)
        if action is None:
            obs, success, failure, score = _NO_ACTION, False, False, self._sim.runHistory[-1]["score"]
        else:
            obs, _, _, info = self._sim.step(action)
            self._actions.append(action)
            success, failure, score = info["tasksuccess"], info["taskfailure"], info["score"]
        if success or failure or self._steps >= self.max_steps:
            self._done = True
            # score is the package's normalised score (scoreRaw / max score)
            self._reward = 1.0 if success else 0.0 if failure else min(max(float(score), 0.0), 1.0)
        return obs.strip(), (self._reward if self._done else 0.0), self._done

    def expert(self, task: Task) -> list[str]:
        if task.id not in self._expert:
            # The gold path comes with a fresh game; restart the episode in progress afterwards.
            self._start(task)
            gold = self._sim.getGoldActionSequence()
            if gold and gold[0] == "look around":  # the first observation already shows the room
                gold = gold[1:]
            coin = task.data["game"] == "coin"
            self._expert[task.id] = [react_turn(_thought(a, coin=coin), a) for a in gold]
            if self._task is not None:
                self._start(self._task)
                for action in self._actions:
                    self._sim.step(action)
        return list(self._expert[task.id])

    def close(self) -> None:
        _close_jvm(self._sim)
