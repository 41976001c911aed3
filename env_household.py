"""Embodied household tasks in the style of ALFWorld (Shridhar et al., ICLR 2021), generated offline.

Mirrors the text (TextWorld) side of ALFWorld: a room of numbered receptacles (`countertop 1`,
`fridge 1`, `drawer 3`) holding numbered objects (`apple 1`); openable receptacles start closed and
hide their contents. ALFWorld's six task types with its goal phrasings (pick & place, examine in
light, clean / heat / cool & place, pick two & place), its action set (`go to X`, `take X from Y`,
`put X in/on Y`, `open X`, `close X`, `use X`, `clean/heat/cool X with Y`, `examine X`,
`inventory`, `look`), its observation texts ("You arrive at countertop 1. On the countertop 1, you
see a apple 1, and a knife 2.", "Nothing happens.") and its goal conditions (any object of the goal
type, in any receptacle of the target type; for examine-in-light, holding the object beside a lit
desklamp). Reward 1 on success, else 0; 40 steps (ReAct gives ALFWorld 50).

Departures: rooms are drawn from a small hand-written catalogue (4 room kinds, 20 receptacle layouts
each, ~60 object kinds with likely places) instead of ALFRED's 120 AI2-THOR scenes; no slicing,
no floor objects, no objects inside objects; the welcome banner is dropped (as ReAct does); a turn
with no recognisable command gets a message listing the commands (ALFWorld says "Nothing
happens."), while a well-formed but impossible command gets ALFWorld's "Nothing happens.".
`test_unseen` holds out both layouts and object kinds, like ALFWorld's valid_unseen holds out scenes.
train/dev/test are disjoint by task (its seed), not by scene: they share the 16 seen layouts per room
and the goal phrasings, so 221 of the 600 test tasks (dev: 227) open with the same first observation
(room view and task) as some train task, and 286 (dev: 272) have the same expert action sequence as
some train task (1 test and 2 dev episodes equal a train episode, observations included, their rooms
differing only where the expert never looks); no test_unseen task shares either with train.
The expert is a scripted planner that knows the room but searches like a person: it visits the
likely receptacles of the object in a fixed order of likelihood (opening closed ones) until it sees
one, then takes it, transforms it, and puts it at the first receptacle of the target kind. The
generator hides the goal object among the first eight receptacles of that order, so the expert always
succeeds (3-21 turns, 8.5 on average; ALFWorld's expert takes about 10-25).
"""
from __future__ import annotations

import collections
import random
import re
from functools import lru_cache

from envs import Task, parse_action, react_turn

MAX_STEPS = 40
N_LAYOUTS, N_SEEN_LAYOUTS = 20, 16  # per room kind; layouts 16..19 appear only in test_unseen
N_SEEN_TASKS, N_UNSEEN_TASKS = 6000, 600  # seen tasks split 8:1:1 into train/dev/test by index
SPLITS = ("train", "dev", "test", "test_unseen")

# Receptacles of each room kind as "type min-max": a layout draws every count once.
LAYOUT_SPEC = {
    "kitchen": "cabinet 2-6, countertop 1-3, drawer 1-4, fridge 1-1, microwave 1-1, sinkbasin 1-1, "
    "stoveburner 2-4, garbagecan 1-1, coffeemachine 1-1, diningtable 0-1, shelf 0-3, toaster 0-1, sidetable 0-1",
    "bathroom": "toilet 1-1, sinkbasin 1-2, countertop 1-1, garbagecan 1-1, towelholder 1-1, "
    "toiletpaperhanger 1-1, cabinet 1-4, bathtubbasin 0-1, drawer 0-4, shelf 0-2, handtowelholder 0-2, dresser 0-1",
    "bedroom": "bed 1-1, desk 0-1, sidetable 1-2, dresser 0-1, drawer 2-6, shelf 0-4, garbagecan 1-1, safe 0-1, "
    "armchair 0-1, laundryhamper 0-1, cabinet 0-2",
    "livingroom": "sofa 1-1, coffeetable 1-1, garbagecan 1-1, armchair 0-2, sidetable 1-2, diningtable 0-1, "
    "tvstand 0-1, shelf 0-4, drawer 0-4, cabinet 0-4, dresser 0-1, ottoman 0-1",
}
OPENABLE = {"fridge", "cabinet", "drawer", "microwave", "safe"}
IN_TYPES = OPENABLE | {"sinkbasin", "bathtubbasin", "garbagecan", "coffeemachine", "toaster", "laundryhamper"}
LAMP = "desklamp"
LAMP_HOLDERS = {"bedroom": ("desk", "sidetable", "dresser"), "livingroom": ("sidetable", "dresser")}
DEVICES = {"clean": "sinkbasin", "heat": "microwave", "cool": "fridge"}  # the receptacle each transform uses
STATE_WORD = {"clean": "clean", "heat": "hot", "cool": "cool"}

# Objects per room: "type | where it is likely found, most likely first | plausible targets | kinds".
# Every object supports pick & place and pick two; the last column adds the task kinds it also
# supports: c = clean, h = heat, k = cool, l = look at under the desklamp.
CATALOGUE = {
    "kitchen": """
apple | fridge countertop diningtable sinkbasin garbagecan | fridge countertop diningtable microwave garbagecan sidetable | chk
bread | countertop diningtable fridge cabinet | countertop diningtable fridge cabinet sidetable microwave | hk
egg | fridge countertop diningtable sinkbasin garbagecan | countertop diningtable fridge microwave garbagecan sidetable | chk
potato | fridge countertop diningtable sinkbasin garbagecan | countertop diningtable fridge microwave garbagecan sidetable | chk
tomato | fridge countertop diningtable sinkbasin garbagecan | countertop diningtable fridge microwave garbagecan sidetable | chk
lettuce | fridge countertop diningtable sinkbasin | countertop diningtable fridge sidetable | ck
mug | coffeemachine cabinet countertop diningtable sinkbasin shelf | coffeemachine cabinet countertop diningtable shelf sidetable | chk
cup | cabinet countertop diningtable fridge sinkbasin shelf | cabinet countertop diningtable shelf sidetable microwave | chk
plate | cabinet countertop diningtable fridge sinkbasin shelf | cabinet countertop diningtable shelf sidetable | chk
bowl | cabinet countertop diningtable fridge sinkbasin shelf | cabinet countertop diningtable shelf sidetable | ck
pan | stoveburner countertop cabinet diningtable sinkbasin | countertop diningtable stoveburner cabinet fridge | ck
pot | stoveburner countertop cabinet diningtable sinkbasin | countertop diningtable stoveburner cabinet fridge shelf | ck
knife | countertop drawer diningtable sinkbasin | countertop drawer diningtable sidetable | c
butterknife | drawer countertop diningtable | countertop drawer diningtable sidetable | c
fork | drawer countertop diningtable sinkbasin | drawer countertop diningtable sidetable | c
spoon | drawer countertop diningtable sinkbasin | drawer countertop diningtable sidetable | c
spatula | drawer countertop diningtable sinkbasin | drawer countertop diningtable sidetable | c
ladle | drawer countertop diningtable sinkbasin | drawer countertop diningtable sidetable | c
kettle | stoveburner countertop cabinet diningtable | stoveburner countertop cabinet diningtable | c
saltshaker | countertop cabinet shelf diningtable drawer | cabinet shelf countertop drawer diningtable |
peppershaker | countertop cabinet shelf diningtable drawer | cabinet shelf countertop drawer diningtable |
winebottle | countertop cabinet fridge diningtable shelf | diningtable countertop cabinet fridge shelf garbagecan | k
dishsponge | sinkbasin countertop cabinet drawer | cabinet countertop drawer diningtable | c
soapbottle | countertop cabinet sinkbasin shelf | cabinet countertop shelf garbagecan diningtable |""",
    "bathroom": """
cloth | countertop cabinet drawer bathtubbasin sinkbasin toilet shelf | countertop cabinet drawer bathtubbasin garbagecan toilet shelf | c
soapbar | countertop sinkbasin toilet bathtubbasin cabinet shelf | countertop cabinet toilet bathtubbasin garbagecan shelf | c
dishsponge | countertop cabinet bathtubbasin sinkbasin toilet | countertop cabinet toilet bathtubbasin garbagecan shelf | c
soapbottle | countertop toilet cabinet shelf | countertop cabinet toilet garbagecan shelf dresser |
spraybottle | countertop toilet cabinet shelf drawer | toilet cabinet countertop garbagecan drawer shelf |
toiletpaper | toiletpaperhanger toilet countertop cabinet shelf | toiletpaperhanger toilet cabinet countertop garbagecan shelf |
candle | countertop toilet shelf cabinet | countertop toilet cabinet shelf drawer dresser |
handtowel | handtowelholder countertop cabinet | countertop cabinet garbagecan bathtubbasin handtowelholder |
towel | towelholder countertop cabinet bathtubbasin | countertop cabinet bathtubbasin garbagecan |
tissuebox | countertop toilet shelf cabinet dresser | countertop toilet cabinet shelf dresser garbagecan |""",
    "bedroom": """
book | desk bed sidetable shelf drawer dresser | desk bed sidetable shelf dresser drawer | l
cellphone | bed desk sidetable dresser drawer | bed desk sidetable dresser drawer safe | l
creditcard | desk sidetable drawer dresser shelf | desk drawer dresser sidetable shelf safe armchair | l
keychain | desk sidetable drawer dresser shelf safe | desk drawer dresser sidetable shelf safe | l
pen | desk sidetable drawer shelf dresser | desk drawer shelf sidetable dresser | l
pencil | desk sidetable drawer shelf dresser | desk drawer shelf sidetable dresser | l
cd | desk sidetable drawer shelf safe garbagecan | desk drawer shelf safe sidetable garbagecan | l
alarmclock | desk sidetable dresser shelf | desk dresser shelf sidetable | l
laptop | bed desk sidetable dresser | bed desk sidetable dresser armchair | l
pillow | bed armchair | bed armchair | l
mug | desk shelf sidetable dresser | desk shelf sidetable dresser | l
bowl | desk shelf sidetable dresser | desk shelf sidetable dresser | l
vase | shelf dresser sidetable desk | shelf dresser sidetable desk safe | l
statue | shelf dresser sidetable desk | shelf dresser sidetable desk | l
teddybear | bed armchair dresser shelf | bed armchair dresser shelf | l
box | shelf dresser sidetable desk | shelf dresser sidetable desk bed |""",
    "livingroom": """
remotecontrol | sofa coffeetable armchair sidetable tvstand drawer | sofa coffeetable armchair sidetable tvstand drawer ottoman | l
newspaper | sofa coffeetable sidetable diningtable ottoman armchair | sofa coffeetable sidetable diningtable ottoman armchair | l
keychain | coffeetable sidetable drawer sofa dresser | coffeetable sidetable drawer sofa dresser armchair | l
creditcard | coffeetable sidetable sofa armchair drawer diningtable | coffeetable sidetable sofa armchair drawer diningtable | l
laptop | sofa coffeetable armchair diningtable sidetable | sofa coffeetable armchair diningtable sidetable ottoman | l
pillow | sofa armchair ottoman | sofa armchair ottoman | l
watch | coffeetable sidetable drawer shelf dresser tvstand | coffeetable sidetable drawer shelf dresser tvstand | l
statue | shelf coffeetable sidetable tvstand diningtable dresser | shelf coffeetable sidetable tvstand diningtable dresser | l
vase | shelf coffeetable sidetable tvstand diningtable cabinet | shelf coffeetable sidetable tvstand diningtable cabinet | l
box | coffeetable sidetable shelf sofa diningtable ottoman | coffeetable sidetable shelf sofa diningtable ottoman | l
tissuebox | coffeetable sidetable shelf dresser diningtable | coffeetable sidetable shelf dresser diningtable | l
cellphone | sofa coffeetable armchair sidetable diningtable | sofa coffeetable armchair sidetable diningtable drawer | l
plate | diningtable coffeetable sidetable shelf | diningtable coffeetable sidetable shelf cabinet | l""",
}
# Object kinds that are never a goal in train/dev/test: test_unseen's goals use only these.
HELD_OUT = frozenset({"tomato", "ladle", "soapbar", "spraybottle", "pencil", "alarmclock", "watch", "statue"})

KINDS = ("pick", "look", "clean", "heat", "cool", "two")
KIND_LETTER = {"clean": "c", "heat": "h", "cool": "k", "look": "l"}
# As in ALFWorld: lamps stand in bedrooms and living rooms; sinks in kitchens and bathrooms.
KIND_ROOMS = {"pick": tuple(LAYOUT_SPEC), "two": tuple(LAYOUT_SPEC), "look": ("bedroom", "livingroom"),
              "clean": ("kitchen", "bathroom"), "heat": ("kitchen",), "cool": ("kitchen",)}
# ALFWorld's goal phrasings; a task stores which variant it uses.
TEMPLATES = {
    "pick": ("put a {o} in {r}.", "put some {o} on {r}.", "find some {o} and put it in {r}."),
    "look": ("look at {o} under the desklamp.", "examine the {o} with the desklamp."),
    "clean": ("put a clean {o} in {r}.", "clean some {o} and put it in {r}."),
    "heat": ("put a hot {o} in {r}.", "heat some {o} and put it in {r}."),
    "cool": ("put a cool {o} in {r}.", "cool some {o} and put it in {r}."),
    "two": ("put two {o} in {r}.", "find two {o} and put them in {r}."),
}
COMMANDS = ("go to X, open X, close X, take X from Y, put X in/on Y, use X, clean X with Y, heat X with Y, "
            "cool X with Y, examine X, inventory, look")
PROMPT = (f"You are in a household and must complete the task. Commands (one per turn): {COMMANDS}. "
          "X and Y are exact names from the observations, e.g. apple 1, countertop 1. You hold one object at "
          "a time. Clean with a sinkbasin, heat with a microwave, cool with a fridge; to look at something "
          "under a desklamp, hold it and use the desklamp.")
NOTHING = "Nothing happens."


def _parse_catalogue() -> dict:
    rows = {}
    for room, text in CATALOGUE.items():
        for line in text.strip().splitlines():
            name, found, targets, kinds = (part.strip() for part in line.split("|"))
            rows.setdefault(room, {})[name] = (tuple(found.split()), tuple(targets.split()), kinds)
    return rows


ROWS = _parse_catalogue()


def _make_layouts() -> dict:
    """N_LAYOUTS distinct receptacle layouts per room kind, the same on every run (string-seeded rng)."""
    layouts = {}
    for room, spec in LAYOUT_SPEC.items():
        ranges = [(t, int(lo), int(hi)) for t, lo, hi in re.findall(r"(\w+) (\d+)-(\d+)", spec)]
        rng, found = random.Random(f"layouts:{room}"), []
        while len(found) < N_LAYOUTS:
            layout = tuple((t, n) for t, lo, hi in sorted(ranges) if (n := rng.randint(lo, hi)) > 0)
            if layout not in found:
                found.append(layout)
        layouts[room] = found
    return layouts


LAYOUTS = _make_layouts()


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _prep(rtype: str) -> str:
    return "in" if rtype in IN_TYPES else "on"


def _listing(names: list[str]) -> str:
    """ALFWorld's list: "nothing", "a x 1", "a x 1, and a y 2", "a x 1, a y 2, and a z 1"."""
    items = [f"a {n}" for n in names]  # ALFWorld writes "a" before every name, vowel or not
    if not items:
        return "nothing"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _number(name: str) -> int:
    return int(name.rsplit(" ", 1)[1])


def _goal_params(index: int, unseen: bool) -> dict:
    """The goal of seen task `index` (or unseen task `index`): room, layout, kind, object, target."""
    rng = random.Random(f"household:{'unseen' if unseen else 'seen'}:{index}")
    while True:  # rejection sampling; nearly every draw is accepted
        kind = rng.choice(KINDS)
        room = rng.choice(KIND_ROOMS[kind])
        layout = N_SEEN_LAYOUTS + rng.randrange(N_LAYOUTS - N_SEEN_LAYOUTS) if unseen else rng.randrange(N_SEEN_LAYOUTS)
        present = {t for t, _ in LAYOUTS[room][layout]}
        objs = [o for o, (_, _, kinds) in ROWS[room].items() if (o in HELD_OUT) == unseen
                and (kind in ("pick", "two") or KIND_LETTER[kind] in kinds)]
        if not objs:
            continue
        obj = rng.choice(objs)
        found, targets, _ = ROWS[room][obj]
        target = None
        if kind != "look":
            targets = [t for t in targets if t in present and t != DEVICES.get(kind)]
            if not targets:
                continue
            target = rng.choice(targets)
        if not any(t in present and t != target for t in found):
            continue
        return {"room": room, "layout": layout, "kind": kind, "obj": obj, "target": target,
                "template": rng.randrange(len(TEMPLATES[kind]))}


def _instruction(p: dict) -> str:
    return TEMPLATES[p["kind"]][p["template"]].format(o=p["obj"], r=p["target"])


@lru_cache(maxsize=None)
def _split_params(split: str) -> tuple:
    if split == "test_unseen":
        return tuple((i, {**_goal_params(i, True), "seed": 1_000_000 + i}) for i in range(N_UNSEEN_TASKS))
    buckets = {"train": range(8), "dev": (8,), "test": (9,)}[split]  # fixed by index, never by seed
    return tuple((i, {**_goal_params(i, False), "seed": i}) for i in range(N_SEEN_TASKS) if i % 10 in buckets)


class _Rec:
    __slots__ = ("type", "openable", "open", "contents")

    def __init__(self, rtype: str):
        self.type, self.openable, self.open, self.contents = rtype, rtype in OPENABLE, False, []

    def visible(self) -> bool:
        return self.open or not self.openable


class _Obj:
    __slots__ = ("type", "clean", "hot", "cool", "on")

    def __init__(self, otype: str):
        self.type, self.clean, self.hot, self.cool, self.on = otype, False, False, False, False


def _search_order(recs: dict, found: tuple, skip: str | None) -> list[str]:
    """Receptacles where an object is likely, most likely kind first, then by number."""
    rank = {t: i for i, t in enumerate(found) if t != skip}
    return sorted((r for r, rec in recs.items() if rec.type in rank), key=lambda r: (rank[recs[r].type], _number(r)))


def _check_task(task: Task) -> dict:
    """The task's data; a one-line ValueError naming the task when it cannot be a household task."""
    d = task.fields("household", ("room", "layout", "kind", "obj", "target", "seed"))
    if d["obj"] not in ROWS.get(d["room"], ()):
        raise ValueError(f"task {task.id}: unknown room {d['room']!r} or object {d['obj']!r}")
    return d


def _build_room(data: dict) -> tuple[dict, dict]:
    """Receptacles and objects of a task, regenerated from its data (layout + seed) deterministically."""
    rng = random.Random(data["seed"])
    room, goal, target = data["room"], data["obj"], data["target"]
    recs = {f"{t} {k}": _Rec(t) for t, n in LAYOUTS[room][data["layout"]] for k in range(1, n + 1)}
    order = _search_order(recs, ROWS[room][goal][0], target)
    # The goal objects sit near the front of the search order, so a methodical search finds them well
    # within the step limit; none starts in a target receptacle, so the goal never holds at the start.
    placed = [(goal, rng.choices(order[:8], weights=(2, 2, 2, 2, 1, 1, 1, 1)[: len(order[:8])])[0])]
    extra = (1 if data["kind"] == "two" else 0) + rng.choice((0, 0, 1))
    placed += [(goal, rng.choice(order[:8])) for _ in range(extra)]
    # Held-out object kinds appear only in test_unseen rooms (held-out layouts), never before.
    unseen = data["layout"] >= N_SEEN_LAYOUTS
    others = [o for o in ROWS[room] if o != goal and (o not in HELD_OUT or unseen)]
    for _ in range(rng.randint(6, 12)):
        otype = rng.choice(others)
        spots = [r for r, rec in recs.items() if rec.type in ROWS[room][otype][0]]
        if spots:
            placed.append((otype, rng.choice(spots)))
    objs = {}
    for otype in dict.fromkeys(t for t, _ in placed):
        spots = [r for t, r in placed if t == otype]
        numbers = rng.sample(range(1, len(spots) + 1), len(spots))
        for num, r in zip(numbers, spots):
            objs[f"{otype} {num}"] = _Obj(otype)
            recs[r].contents.append(f"{otype} {num}")
    if room in LAMP_HOLDERS:  # every bedroom and living room has one desklamp standing on a table
        objs[f"{LAMP} 1"] = _Obj(LAMP)
        recs[rng.choice([r for r, rec in recs.items() if rec.type in LAMP_HOLDERS[room]])].contents.append(f"{LAMP} 1")
    for rec in recs.values():
        rng.shuffle(rec.contents)
    return recs, objs


class HouseholdEnv:
    """ALFWorld-style household tasks; see the module docstring."""

    INVALID = re.compile(r"Nothing happens\.|No action found\.|'.*' is not a command\.", re.S)

    def __init__(self, max_steps: int = MAX_STEPS, **kwargs):  # kwargs (e.g. data_dir): nothing to load
        self.max_steps, self.prompt = max_steps, PROMPT
        self.task: Task | None = None
        self._commands = [(re.compile(p), f) for p, f in (
            (r"go to (.+)", self._go), (r"take (.+?) from (.+)", self._take),
            (r"put (.+?) (?:in/on|in|on|into|onto) (.+)", self._put), (r"open (.+)", self._open),
            (r"close (.+)", self._close), (r"use (.+)", self._use), (r"(clean|heat|cool) (.+?) with (.+)", self._transform),
            (r"examine (.+)", self._examine), (r"inventory", self._inventory), (r"look", self._look))]

    @classmethod
    def make_tasks(cls, split: str, n: int | None = None, seed: int = 0, **kwargs) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"household has no split {split!r}; choose from {', '.join(SPLITS)}")
        tasks = [Task(f"household-{split}-{i}", "household", split, _instruction(p), dict(p))
                 for i, p in _split_params(split)]
        return tasks if n is None else random.Random(seed).sample(tasks, min(n, len(tasks)))

    # ------------------------------------------------------------------ playing

    def reset(self, task: Task) -> str:
        self.task, d = task, _check_task(task)
        self.recs, self.objs = _build_room(d)
        self.kind, self.goal, self.target = d["kind"], d["obj"], d["target"]
        self.loc: str | None = None
        self.held: str | None = None
        self.steps, self.done, self.reward = 0, False, 0.0
        return f"{self._room_view()}\n\nYour task is to: {task.instruction}"

    def step(self, turn: str) -> tuple[str, float, bool]:
        if self.task is None:  # a caller's mistake, not the model's: raised, as in the other families
            raise RuntimeError("call reset(task) before step()")
        if self.done:
            return "The episode is over: call reset(task) to start a new one.", self.reward, True
        self.steps += 1
        obs = self._act(parse_action(str(turn)))
        if self._goal_met():
            self.done, self.reward = True, 1.0
        elif self.steps >= self.max_steps:
            self.done = True
        return obs, self.reward, self.done

    def _act(self, action: str | None) -> str:
        if action is None:
            return f"No action found. End your turn with 'Action: <command>', one of: {COMMANDS}."
        text = re.sub(r"\s+", " ", action.lower()).strip(" .'\"`")
        for pattern, handler in self._commands:
            m = pattern.fullmatch(text)
            if m:
                return handler(*m.groups())
        return f"'{action}' is not a command. Use one of: {COMMANDS}."

    def _goal_met(self) -> bool:
        objs, recs, goal = self.objs, self.recs, self.goal
        if self.kind == "look":
            return (self.held is not None and objs[self.held].type == goal and self.loc is not None
                    and any(objs[o].type == LAMP and objs[o].on for o in recs[self.loc].contents))
        need = STATE_WORD.get(self.kind)  # also the _Obj attribute that holds the state
        for rec in recs.values():
            if rec.type == self.target:
                good = [o for o in rec.contents if objs[o].type == goal and (need is None or getattr(objs[o], need))]
                if len(good) >= (2 if self.kind == "two" else 1):
                    return True
        return False

    # ------------------------------------------------------------------ observations

    def _room_view(self) -> str:
        names = sorted(self.recs, key=lambda r: (r.rsplit(" ", 1)[0], -_number(r)))  # ALFWorld's order
        return f"You are in the middle of a room. Looking quickly around you, you see {_listing(names)}."

    def _view(self, r: str) -> str:
        rec = self.recs[r]
        if rec.openable:
            return f"The {r} is open. In it, you see {_listing(rec.contents)}." if rec.open else f"The {r} is closed."
        return f"On the {r}, you see {_listing(rec.contents)}."

    def _here(self, r: str) -> bool:
        return r in self.recs and self.loc == r

    # ------------------------------------------------------------------ commands (ALFWorld's preconditions)

    def _go(self, r: str) -> str:
        if r not in self.recs or self.loc == r:
            return NOTHING
        self.loc = r
        return f"You arrive at {r}. {self._view(r)}"

    def _take(self, o: str, r: str) -> str:
        if self.held or not self._here(r) or not self.recs[r].visible() or o not in self.recs[r].contents \
                or self.objs[o].type == LAMP:
            return NOTHING
        self.recs[r].contents.remove(o)
        self.held = o
        return f"You pick up the {o} from the {r}."

    def _put(self, o: str, r: str) -> str:
        if self.held != o or not self._here(r) or not self.recs[r].visible():
            return NOTHING
        self.recs[r].contents.append(o)
        self.held = None
        return f"You put the {o} in/on the {r}."

    def _open(self, r: str) -> str:
        if not self._here(r) or not self.recs[r].openable or self.recs[r].open:
            return NOTHING
        self.recs[r].open = True
        return f"You open the {r}. {self._view(r)}"

    def _close(self, r: str) -> str:
        if not self._here(r) or not self.recs[r].open:
            return NOTHING
        self.recs[r].open = False
        return f"You close the {r}."

    def _use(self, o: str) -> str:
        if self.loc is None or not self.recs[self.loc].visible() or o not in self.recs[self.loc].contents \
                or self.objs[o].type != LAMP:
            return NOTHING
        lamp = self.objs[o]
        lamp.on = not lamp.on
        return f"You turn {'on' if lamp.on else 'off'} the {o}."

    def _transform(self, verb: str, o: str, r: str) -> str:
        if self.held != o or not self._here(r) or self.recs[r].type != DEVICES[verb]:
            return NOTHING
        obj = self.objs[o]
        if verb == "clean":
            obj.clean = True
        else:  # heating undoes cooling and vice versa
            obj.hot, obj.cool = verb == "heat", verb == "cool"
        return f"You {verb} the {o} using the {r}."

    def _examine(self, x: str) -> str:
        if self._here(x):
            return self._view(x)
        here = self.loc is not None and self.recs[self.loc].visible() and x in self.recs[self.loc].contents
        if x not in self.objs or not (self.held == x or here):
            return NOTHING
        obj = self.objs[x]
        if obj.type == LAMP:
            return f"This {x} is {'on' if obj.on else 'off'}."
        if obj.clean and (obj.hot or obj.cool):
            return f"This is a {'hot' if obj.hot else 'cool'} and clean {x}."
        for flag, word in (("hot", "hot"), ("clean", "clean"), ("cool", "cold")):
            if getattr(obj, flag):
                return f"This is a {word} {x}."
        return f"There's nothing special about {x}."

    def _inventory(self) -> str:
        return f"You are carrying: a {self.held}." if self.held else "You are not carrying anything."

    def _look(self) -> str:
        return self._room_view() if self.loc is None else f"You are facing the {self.loc}. Next to it, you see nothing."

    # ------------------------------------------------------------------ expert

    def expert(self, task: Task) -> list[str]:
        """A planner that knows the room but searches like a person (see the module docstring); its
        turns are produced by playing a private copy of the task, so they replay exactly."""
        sim = HouseholdEnv(self.max_steps)
        sim.reset(task)
        kind, goal, target_type = sim.kind, sim.goal, sim.target
        room = task.data["room"]
        found = ROWS[room][goal][0]
        order = _search_order(sim.recs, found, target_type)
        lamp_order = _search_order(sim.recs, LAMP_HOLDERS.get(room, ()), None)
        target = _search_order(sim.recs, (target_type,), None)[0] if target_type else None
        count = collections.Counter(rec.type for rec in sim.recs.values())

        def where(rtype: str) -> str:  # "in the fridge", "on a countertop"
            return f"{_prep(rtype)} {'the' if count[rtype] == 1 else 'a'} {rtype}"

        def at(r: str) -> str:  # "in the fridge 1", "on the countertop 2"
            return f"{_prep(sim.recs[r].type)} the {r}"

        def likely(otype: str, places: list[str]) -> str:
            kinds = list(dict.fromkeys(sim.recs[r].type for r in places))[:3]
            spots = [where(t) for t in kinds]
            joined = spots[0] if len(spots) == 1 else ", ".join(spots[:-1]) + " or " + spots[-1]
            return f"{_article(otype).capitalize()} is likely {joined}."

        put = f"put it {where(target_type)}" if target else ""
        plan = {"pick": f", then {put}", "look": ", then look at it under the desklamp",
                "two": f", {put}, then do the same with a second {goal}",
                **{verb: f", {verb} it with the {dev}, then {put}" for verb, dev in DEVICES.items()}}
        seen: set[str] = set()
        turns: list[str] = []
        last = ""  # the previous command's verb, to phrase the next thought

        def move() -> tuple[str, str]:
            loc, held = sim.loc, sim.held
            if held is not None:
                obj = sim.objs[held]
                if kind in DEVICES and not getattr(obj, STATE_WORD[kind]):
                    dev = loc if loc and sim.recs[loc].type == DEVICES[kind] else f"{DEVICES[kind]} 1"
                    if loc != dev:
                        return f"Now I'm holding the {held}; next I need to {kind} it with the {dev}.", f"go to {dev}"
                    if last == "take":
                        return f"The {dev} is right here, so I'll {kind} the {held} now.", f"{kind} {held} with {dev}"
                    return f"I'm at the {dev}; I'll {kind} the {held} with it.", f"{kind} {held} with {dev}"
                if kind == "look":
                    lamp_at = next((r for r in seen if f"{LAMP} 1" in sim.recs[r].contents), None)
                    if lamp_at == loc:
                        return f"The {LAMP} 1 is here; I'll turn it on to look at the {held} under it.", f"use {LAMP} 1"
                    if lamp_at:
                        return f"I saw the {LAMP} 1 {at(lamp_at)}; I'll take the {held} there.", f"go to {lamp_at}"
                    nxt = next(r for r in lamp_order if r not in seen)
                    if last == "take":
                        return (f"Now I have the {held}. Next I need a desklamp. {likely(LAMP, lamp_order)} "
                                f"I'll check the {nxt}."), f"go to {nxt}"
                    return f"There is no desklamp {at(loc)}. I'll try the {nxt}.", f"go to {nxt}"
                if loc != target:
                    if kind in DEVICES:
                        return f"The {held} is {STATE_WORD[kind]} now. Next I'll put it {at(target)}.", f"go to {target}"
                    return f"Now I have the {held}; next I'll put it {at(target)}.", f"go to {target}"
                if not sim.recs[target].visible():
                    return f"The {target} is closed; I'll open it first.", f"open {target}"
                return f"I'm at the {target}; I'll put the {held} {_prep(target_type)} it.", f"put {held} in/on {target}"
            # Empty-handed: look for an object of the goal kind.
            if loc is not None and not sim.recs[loc].visible():
                return f"The {loc} is closed; I'll open it to look for {_article(goal)}.", f"open {loc}"
            spots = sorted(seen, key=lambda r: (r != loc, order.index(r) if r in order else len(order), r))
            hits = [(r, o) for r in spots if sim.recs[r].type != target_type
                    for o in sim.recs[r].contents if sim.objs[o].type == goal]
            one_done = "One {g} is {a}. ".format(g=goal, a=at(target)) if last == "put" else ""
            if hits:
                r, o = hits[0]
                if r == loc:
                    return f"I found the {o} {at(r)}; I'll take it.", f"take {o} from {r}"
                return f"{one_done}I saw the {o} {at(r)} earlier, so I'll go back for it.", f"go to {r}"
            nxt = next((r for r in order if r not in seen), None)
            if nxt is None:
                raise RuntimeError(f"household expert found no {goal} in task {task.id}")
            if not turns:
                return (f"To solve the task, I need to find {_article(goal)}{plan[kind]}. {likely(goal, order)} "
                        f"I'll check the {nxt} first."), f"go to {nxt}"
            if one_done:
                return f"{one_done}Now I need a second {goal}; I'll check the {nxt}.", f"go to {nxt}"
            return f"There is no {goal} {at(loc)}. Next I'll check the {nxt}.", f"go to {nxt}"

        while not sim.done:
            thought, action = move()
            turns.append(react_turn(thought, action))
            sim.step(action)
            last = action.split(" ", 1)[0]
            if sim.loc is not None and sim.recs[sim.loc].visible():
                seen.add(sim.loc)
        return turns
