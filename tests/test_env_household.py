"""The ALFWorld-style household family: experts, splits, ALFWorld's texts and rules, step limit."""
import collections

import pytest

import env_household as H
from envs import Task, load_env, make, parse_action, react_turn

ALL = {split: make("household", split) for split in H.SPLITS}


def play(env, task, turns):
    first, out = env.reset(task), []
    for turn in turns:
        out.append(env.step(turn))
        if out[-1][2]:
            break
    return first, out


def handmade(kind, obj, target, contents, closed=(), room="kitchen"):
    """An env whose room is replaced by a hand-written one: {receptacle: [objects]}."""
    data = {"room": room, "layout": 0, "kind": kind, "obj": obj, "target": target, "template": 0, "seed": 0}
    env = H.HouseholdEnv()
    env.reset(Task("household-hand-0", "household", "dev", "hand-made", data))
    env.recs, env.objs = {}, {}
    for r, objs in contents.items():
        env.recs[r] = H._Rec(r.rsplit(" ", 1)[0])
        env.recs[r].open = env.recs[r].openable and r not in closed
        env.recs[r].contents = list(objs)
        for o in objs:
            env.objs[o] = H._Obj(o.rsplit(" ", 1)[0])
    return env


# ----------------------------------------------------------------------------- experts


def test_every_expert_solves_every_task_of_every_split():
    env = load_env("household")
    lengths = collections.defaultdict(list)
    for split, tasks in ALL.items():
        assert len(tasks) >= 200
        for task in tasks:
            turns = env.expert(task)
            first, out = play(env, task, turns)
            assert task.instruction in first and first.startswith("You are in the middle of a room.")
            assert len(out) == len(turns), f"{task.id}: episode ended before the expert's last turn"
            assert out[-1][1:] == (1.0, True), f"{task.id}: expert failed"
            assert all(r == 0.0 and not d for _, r, d in out[:-1])
            assert not any(o == H.NOTHING or "not a command" in o for o, _, _ in out), task.id
            lengths[task.data["kind"]].append(len(turns))
    assert set(lengths) == set(H.KINDS)
    assert max(max(v) for v in lengths.values()) <= 30  # comfortably inside the 40-step limit


def test_expert_searches_and_explains_itself():
    env = load_env("household")
    tasks = ALL["dev"]
    searched, thoughts = 0, set()
    for task in tasks:
        turns = env.expert(task)
        actions = [parse_action(t) for t in turns]
        first_take = next(i for i, a in enumerate(actions) if a.startswith("take "))
        searched += sum(a.startswith("go to ") for a in actions[:first_take]) > 1
        mine = [t.split("\n")[0] for t in turns]
        assert all(t.startswith("Thought: ") and "\nAction: " in t for t in turns)
        assert len(set(mine)) == len(mine), task.id  # each thought says something about its own step
        thoughts.update(mine)
    # It does not walk straight to the hidden object every time, and its thoughts vary by situation.
    assert 0.3 * len(tasks) < searched < len(tasks)
    assert len(thoughts) > 3 * len(tasks)


def test_expert_turns_are_deterministic():
    env = load_env("household")
    for task in ALL["test"][:50]:
        assert env.expert(task) == load_env("household").expert(task)


# ----------------------------------------------------------------------------- splits


def _content(env, task):
    env.reset(task)
    rooms = tuple(sorted((r, tuple(sorted(rec.contents))) for r, rec in env.recs.items()))
    return task.instruction, rooms


def test_splits_are_disjoint_by_id_and_content():
    env = load_env("household")
    ids = [t.id for ts in ALL.values() for t in ts]
    assert len(ids) == len(set(ids))
    contents = {split: {_content(env, t) for t in ts} for split, ts in ALL.items()}
    for split, ts in ALL.items():
        assert len(contents[split]) == len(ts)  # no two tasks alike, even within a split
    splits = list(contents)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not contents[a] & contents[b], (a, b)


def test_make_is_deterministic_and_the_partition_ignores_the_seed():
    a = make("household", "train", n=40, seed=7)
    assert [t.to_json() for t in a] == [t.to_json() for t in make("household", "train", n=40, seed=7)]
    assert [t.id for t in a] != [t.id for t in make("household", "train", n=40, seed=8)]
    for split in H.SPLITS:
        full = {t.id: t.to_json() for t in ALL[split]}
        for seed in (0, 1, 123):
            for t in make("household", split, n=30, seed=seed):
                assert t.split == split and full[t.id] == t.to_json()
    assert len(make("household", "dev", n=10_000)) == len(ALL["dev"])
    with pytest.raises(ValueError, match="split"):
        H.HouseholdEnv.make_tasks("valid_seen")


def test_task_data_rebuilds_the_room():
    env = load_env("household")
    for task in ALL["dev"][:30]:
        copy = Task.from_json(task.to_json())
        assert _content(env, task) == _content(env, copy)


def test_unseen_split_holds_out_layouts_and_object_kinds():
    env = load_env("household")
    for split in ("train", "dev", "test"):
        for task in ALL[split]:
            assert task.data["obj"] not in H.HELD_OUT and task.data["layout"] < H.N_SEEN_LAYOUTS
        for task in ALL[split][:150]:  # held-out kinds are not even distractors in seen rooms
            env.reset(task)
            assert not {o.type for o in env.objs.values()} & H.HELD_OUT
    for task in ALL["test_unseen"]:
        assert task.data["obj"] in H.HELD_OUT and task.data["layout"] >= H.N_SEEN_LAYOUTS
    assert {t.data["kind"] for t in ALL["test_unseen"]} == set(H.KINDS)
    for room, layouts in H.LAYOUTS.items():
        assert not set(layouts[: H.N_SEEN_LAYOUTS]) & set(layouts[H.N_SEEN_LAYOUTS:]), room


# ----------------------------------------------------------------------------- ALFWorld's texts and rules


def test_observation_texts_follow_alfworld():
    env = handmade("clean", "apple", "fridge", {"countertop 1": ["apple 1", "knife 2"], "fridge 1": ["egg 1"],
                                                "sinkbasin 1": [], "cabinet 1": [], "cabinet 2": []},
                   closed=("fridge 1", "cabinet 1", "cabinet 2"))
    assert env._room_view() == ("You are in the middle of a room. Looking quickly around you, you see a cabinet 2, "
                                "a cabinet 1, a countertop 1, a fridge 1, and a sinkbasin 1.")
    expected = [
        ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a knife 2."),
        ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1."),
        ("take knife 2 from countertop 1", "Nothing happens."),  # one object at a time
        ("inventory", "You are carrying: a apple 1."),
        ("examine apple 1", "There's nothing special about apple 1."),
        ("clean apple 1 with sinkbasin 1", "Nothing happens."),  # not at the sinkbasin yet
        ("go to sinkbasin 1", "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing."),
        ("clean apple 1 with sinkbasin 1", "You clean the apple 1 using the sinkbasin 1."),
        ("examine apple 1", "This is a clean apple 1."),
        ("look", "You are facing the sinkbasin 1. Next to it, you see nothing."),
        ("go to fridge 1", "You arrive at fridge 1. The fridge 1 is closed."),
        ("put apple 1 in/on fridge 1", "Nothing happens."),  # closed
        ("open fridge 1", "You open the fridge 1. The fridge 1 is open. In it, you see a egg 1."),
        ("Thought: done soon.\nAction: put apple 1 in/on fridge 1", "You put the apple 1 in/on the fridge 1."),
    ]
    for i, (action, obs) in enumerate(expected):
        out = env.step(action)
        assert out == (obs, 1.0 if i == len(expected) - 1 else 0.0, i == len(expected) - 1), action


def test_success_needs_the_goal_condition_not_just_the_put():
    # A dirty apple in the fridge is not a clean one: no success, the episode goes on.
    env = handmade("clean", "apple", "fridge", {"countertop 1": ["apple 1"], "fridge 1": [], "sinkbasin 1": []})
    for a in ("go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1"):
        env.step(a)
    assert env.step("put apple 1 in fridge 1") == ("You put the apple 1 in/on the fridge 1.", 0.0, False)
    # Heating then cooling leaves it cool, not hot; "on" is accepted as well as "in" and "in/on".
    env = handmade("heat", "potato", "countertop", {"countertop 1": [], "fridge 1": ["potato 1"], "microwave 1": []})
    steps = ["go to fridge 1", "take potato 1 from fridge 1", "go to microwave 1", "heat potato 1 with microwave 1",
             "go to fridge 1", "cool potato 1 with fridge 1", "go to countertop 1", "put potato 1 on countertop 1"]
    assert [env.step(a)[1] for a in steps] == [0.0] * 8
    assert env.step("examine potato 1")[0] == "This is a cold potato 1."
    steps = ["take potato 1 from countertop 1", "go to microwave 1", "heat potato 1 with microwave 1",
             "go to countertop 1", "put potato 1 on countertop 1"]
    assert [env.step(a)[1] for a in steps] == [0.0] * 4 + [1.0]


def test_pick_two_needs_both_in_one_receptacle():
    env = handmade("two", "cd", "shelf", {"desk 1": ["cd 1", "cd 2"], "shelf 1": [], "shelf 2": []}, room="bedroom")
    steps = ["go to desk 1", "take cd 1 from desk 1", "go to shelf 1", "put cd 1 in/on shelf 1", "go to desk 1",
             "take cd 2 from desk 1", "go to shelf 2", "put cd 2 in/on shelf 2", "take cd 2 from shelf 2",
             "go to shelf 1", "put cd 2 in/on shelf 1"]
    assert [env.step(a)[1] for a in steps] == [0.0] * 10 + [1.0]


def test_look_needs_the_object_in_hand_beside_a_lit_lamp():
    env = handmade("look", "book", None, {"bed 1": ["book 1"], "desk 1": ["desklamp 1"]}, room="bedroom")
    steps = ["go to desk 1", "use desklamp 1", "go to bed 1", "take book 1 from bed 1", "go to desk 1"]
    out = [env.step(a) for a in steps]
    assert out[1][0] == "You turn on the desklamp 1."
    assert [r for _, r, _ in out] == [0.0] * 4 + [1.0]  # lamp already on: arriving with the book succeeds
    env = handmade("look", "book", None, {"bed 1": ["book 1"], "desk 1": ["desklamp 1"]}, room="bedroom")
    steps = ["go to bed 1", "take book 1 from bed 1", "use desklamp 1", "go to desk 1", "use desklamp 1"]
    assert [env.step(a)[1] for a in steps] == [0.0] * 4 + [1.0]


def test_bad_and_impossible_actions_are_informative_and_cost_a_step():
    env = load_env("household")
    task = ALL["dev"][0]
    env.reset(task)
    obs, r, d = env.step("Thought: I am not sure what to do.")
    assert "No action found" in obs and "go to X" in obs and "put X in/on Y" in obs and (r, d) == (0.0, False)
    obs, _, _ = env.step("Thought: x\nAction: pick up the apple")
    assert "not a command" in obs and "take X from Y" in obs
    for bad in ("", "   ", "Action:", "go to", "go to kitchen", "take from", "open apple 1", "use fridge 1",
                "put nothing in/on nowhere 9", "clean x with y", "examine ghost 3", "\x00\u2603" * 50, "a" * 5000):
        obs, r, d = env.step(bad)
        assert isinstance(obs, str) and obs and (r, d) == (0.0, False)
    assert env.steps == 2 + 13
    assert env.step("go to kitchen")[0] == H.NOTHING


def test_step_before_reset_and_foreign_tasks_raise_one_line_errors():
    with pytest.raises(RuntimeError, match=r"reset\(task\) before step"):  # as the other families
        H.HouseholdEnv().step("Action: look")
    env = load_env("household")
    for task in (make("webshop", "dev", n=1)[0], make("hotpotqa", "dev", n=1)[0],
                 Task("household-x", "household", "dev", "x", {"room": "kitchen"})):
        for call in (env.reset, env.expert):
            with pytest.raises(ValueError, match=f"task {task.id} .* is not a household task: its data has no "
                                                 "('room', )?'layout', 'kind', 'obj', 'target', 'seed'$") as err:
                call(task)
            assert "\n" not in str(err.value)


def test_step_limit_ends_the_episode():
    env = load_env("household")
    task = ALL["test"][3]
    env.reset(task)
    assert env.max_steps == 40
    for i in range(39):
        assert env.step(react_turn("Waiting.", "inventory")) == ("You are not carrying anything.", 0.0, False)
    assert env.step("inventory") == ("You are not carrying anything.", 0.0, True)
    obs, r, d = env.step(env.expert(task)[0])  # after the end: no crash, still done
    assert (r, d) == (0.0, True) and "over" in obs
    # A fresh reset starts a new episode; an expert finishing on the very last step still gets reward 1.
    turns = env.expert(task)
    env.reset(task)
    for _ in range(env.max_steps - len(turns)):
        env.step("look")
    out = [env.step(t) for t in turns]
    assert out[-1][1:] == (1.0, True) and not any(d for _, _, d in out[:-1])
