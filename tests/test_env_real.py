"""Tests of the real ScienceWorld / TextWorldExpress adapters (env_real.py).

Each simulator runs in a JVM that is slow to start, so one env object per family serves the whole
module. Tests that need a simulator skip when its package is absent (it is installed in our CI).
"""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs  # noqa: E402
import env_real  # noqa: E402
from envs import Task, parse_action  # noqa: E402

SW_INVALID = "No known action matches that input."
TWX_INVALID = "Unknown action: I'm not sure what you mean."


@pytest.fixture(scope="module")
def sw():
    pytest.importorskip("scienceworld")
    env = envs.load_env("scienceworld")
    yield env
    env.close()


@pytest.fixture(scope="module")
def twx():
    pytest.importorskip("textworld_express")
    env = envs.load_env("textworld-express")
    yield env
    env.close()


def sw_task(name: str, variation: int, split: str = "train") -> Task:
    return Task(f"scienceworld-{split}-{name}-{variation}", "scienceworld", split, "", {"task_name": name, "variation": variation})


def twx_task(game: str, seed: int) -> Task:
    split = {0: "train", 1: "dev", 2: "test"}[seed // 10000]
    return next(t for t in envs.make("textworld-express", split, game=game) if t.data["seed"] == seed)


def replay(env, task: Task) -> tuple[list[str], list[tuple[str, float, bool]]]:
    env.reset(task)
    turns = env.expert(task)
    return turns, [env.step(t) for t in turns]


def check_expert(env, task: Task, exact_end: bool = True) -> list[str]:
    """Replayed from reset, the expert ends the episode with reward 1 within the step limit: on its
    last turn, or (ScienceWorld, whose gold paths go on past completion) earlier."""
    turns, results = replay(env, task)
    assert turns and len(turns) <= env.max_steps, task.id
    dones = [done for _, _, done in results]
    assert True in dones, task.id
    end = dones.index(True)
    assert results[end][1] == 1.0, task.id
    assert [r for _, r, _ in results[:end]] == [0.0] * end, task.id
    assert end == len(turns) - 1 or not exact_end, task.id
    for turn in turns:
        assert turn.startswith("Thought: ") and "\nAction: " in turn
    return turns


# ----------------------------------------------------------------------------- ScienceWorld


def test_sciworld_experts_reach_reward_1_across_task_types(sw):
    # one variation of every task type (the long ones included), the splits taken in turn
    splits = ("train", "dev", "test")
    tasks = [envs.make("scienceworld", splits[i % 3], n=1, seed=4, task_types=[name])[0]
             for i, name in enumerate(env_real.SCIWORLD_TASK_TYPES)]
    for task in tasks:
        first = sw.reset(task)
        # the first observation: the simulator's task description, then the look-around
        desc = sw._server.getTaskDescription().strip()
        assert re.match(re.escape(desc) + r"\n\nThis (room|outside location) is called the ", first), first[:300]
        turns = check_expert(sw, task, exact_end=False)
        thoughts = {t.split("\n")[0] for t in turns}
        assert len(thoughts) > 1 or len(turns) == 1


def test_sciworld_splits_are_the_packages(sw):
    """Our variation table equals what ScienceWorld itself reports for every task type."""
    assert sorted(env_real.SCIWORLD_TASK_TYPES) == sorted(sw._sim.get_task_names())
    for name, (total, n_train, n_dev, _) in env_real.SCIWORLD_TASK_TYPES.items():
        sw._sim.load(name, 0, "")
        assert sw._sim.get_max_variations(name) == total, name
        assert sw._sim.get_variations_train() == list(range(0, n_train)), name
        assert sw._sim.get_variations_dev() == list(range(n_train, n_train + n_dev)), name
        assert sw._sim.get_variations_test() == list(range(n_train + n_dev, total)), name


def test_sciworld_splits_disjoint_and_deterministic():
    everything = list(env_real.SCIWORLD_TASK_TYPES)
    by_split = {s: envs.make("scienceworld", s, task_types=everything) for s in ("train", "dev", "test")}
    ids = [t.id for ts in by_split.values() for t in ts]
    pairs = [(t.data["task_name"], t.data["variation"]) for ts in by_split.values() for t in ts]
    assert len(ids) == len(set(ids)) == len(set(pairs)) == sum(v[0] for v in env_real.SCIWORLD_TASK_TYPES.values())
    for s, ts in by_split.items():
        assert all(t.split == s and t.env == "scienceworld" for t in ts)
        # the partition does not depend on the seed; the seed only picks and orders
        assert {t.id for t in envs.make("scienceworld", s, seed=7, task_types=everything)} == {t.id for t in ts}
        a, b = envs.make("scienceworld", s, n=20, seed=3), envs.make("scienceworld", s, n=20, seed=3)
        assert a == b and {t.id for t in a} <= {t.id for t in ts}
        assert [t.id for t in envs.make("scienceworld", s, n=20, seed=4)] != [t.id for t in a]
    # the long task types are drawn only when asked for
    default = {t.data["task_name"] for t in envs.make("scienceworld", "dev")}
    assert default == set(everything) - set(env_real.SCIWORLD_LONG_TASK_TYPES)
    # a drawn sample covers the task types evenly
    assert len({t.data["task_name"] for t in envs.make("scienceworld", "train", n=27)}) == 27
    with pytest.raises(ValueError, match="test_unseen"):
        envs.make("scienceworld", "test_unseen")
    with pytest.raises(ValueError, match="task type"):
        envs.make("scienceworld", "train", task_types=["boil", "juggle"])


def test_sciworld_invalid_and_unparseable_cost_a_step(sw):
    task = sw_task("find-animal", 0)
    sw.reset(task)
    obs, reward, done = sw.step("Thought: I want to fly.\nAction: fly to the moon")
    assert (obs, reward, done) == (SW_INVALID, 0.0, False) and envs.invalid(sw, obs)
    obs, reward, done = sw.step("Thought: I am not sure what to do.")
    assert "no action found" in obs and "Action:" in obs and (reward, done) == (0.0, False)
    assert envs.invalid(sw, obs)
    sw.max_steps = 3  # two steps are spent: the third ends the episode
    obs, reward, done = sw.step("Action: look around")
    assert obs.startswith("This room is called the hallway") and (reward, done) == (0.0, True)
    assert not envs.invalid(sw, obs)
    assert sw.step("Action: look around") == (env_real._EPISODE_OVER, 0.0, True)  # no raise after the end


def test_sciworld_partial_and_failed_rewards(sw):
    task = sw_task("boil", 0)
    first = sw.reset(task)
    assert first.startswith("Your task is to boil water.")
    assert sw.max_steps == env_real.sciworld_step_limit(len(sw.expert(task)))
    # Hand-made: fill the pot with water and focus on it. ScienceWorld's boil scorecard gives
    # 70 of 100 points by then; the step limit ends the episode on the focus step.
    actions = ["open door to kitchen", "go to kitchen", "pick up thermometer", "open cupboard", "pick up metal pot",
               "move metal pot to sink", "activate sink", "deactivate sink", "pick up metal pot",
               "focus on substance in metal pot"]
    sw.max_steps = len(actions)
    results = [sw.step(f"Thought: ok\nAction: {a}") for a in actions]
    assert [d for _, _, d in results] == [False] * 9 + [True]
    assert results[-1][1] == 0.7
    # focusing on the wrong object fails the task at once: score < 0, reward clipped to 0
    sw.reset(task)
    obs, reward, done = sw.step("Action: focus on picture")
    assert (reward, done) == (0.0, True)


def test_sciworld_step_limit_formula():
    assert env_real.sciworld_step_limit(5) == 30
    assert env_real.sciworld_step_limit(40) == 60
    assert env_real.sciworld_step_limit(80) == 100
    assert env_real.sciworld_step_limit(96) == 106  # gold + 10 wins over the cap of 100


def test_sciworld_expert_mid_episode_keeps_the_episode(sw):
    task, other = sw_task("find-plant", 5), sw_task("lifespan-longest-lived", 4)
    sw.reset(task)
    turns = sw.expert(task)
    sw.step(turns[0])
    other_turns = sw.expert(other)  # a task never loaded here: its gold path comes from elsewhere
    results = [sw.step(t) for t in turns[1:]]
    assert (1.0, True) in [r[1:] for r in results]
    sw.reset(other)  # the other task's path, fetched from the second simulator, works here too
    assert (1.0, True) in [sw.step(t)[1:] for t in other_turns]


def test_sciworld_thoughts_name_the_objects():
    assert env_real._thought("go to kitchen") == "I should go to the kitchen."
    assert "metal pot" in env_real._thought("pick up metal pot")
    assert "substance in metal pot" in env_real._thought("focus on substance in metal pot")
    assert env_real._thought("wait1") != env_real._thought("look around")


# ----------------------------------------------------------------------------- TextWorldExpress


@pytest.mark.parametrize("game", ["twc", "cookingworld", "coin"])
def test_twx_experts_reach_reward_1(twx, game):
    for split in ("train", "dev", "test"):
        for task in envs.make("textworld-express", split, n=20, seed=1, game=game):
            assert task.data["game"] == game and f"-{game}-" in task.id
            first = twx.reset(task)
            assert first.startswith(env_real.TWX_GAMES[game][1] + "\n\nYou are in the ")
            assert twx.prompt == env_real.TWX_PROMPTS[game] and twx.max_steps == 50
            turns = check_expert(twx, task)
            assert parse_action(turns[0]) != "look around"  # the redundant first look is dropped


def test_twx_seed_folds_are_the_packages(twx):
    for game, (params, _, _) in env_real.TWX_GAMES.items():
        twx._sim.load(game, params)
        twx._loaded = (game, params)
        assert twx._sim.getValidSeedsTrain() == list(env_real.TWX_SEEDS["train"]), game
        assert twx._sim.getValidSeedsDev() == list(env_real.TWX_SEEDS["dev"]), game
        assert twx._sim.getValidSeedsTest() == list(env_real.TWX_SEEDS["test"]), game


def test_twx_splits_disjoint_and_deterministic():
    for game in env_real.TWX_GAMES:
        by_split = {s: envs.make("textworld-express", s, game=game) for s in ("train", "dev", "test")}
        ids = [t.id for ts in by_split.values() for t in ts]
        seeds = [t.data["seed"] for ts in by_split.values() for t in ts]
        assert len(ids) == len(set(ids)) == len(set(seeds)) == 3000
        for s, ts in by_split.items():
            assert all(t.data["fold"] == s == t.split for t in ts)
            assert {t.id for t in envs.make("textworld-express", s, seed=9, game=game)} == {t.id for t in ts}
            a = envs.make("textworld-express", s, n=10, seed=2, game=game)
            assert a == envs.make("textworld-express", s, n=10, seed=2, game=game)
            assert a != envs.make("textworld-express", s, n=10, seed=3, game=game)
    # the game and non-default parameters are part of the id
    twc, coin = envs.make("textworld-express", "dev", n=5, game="twc"), envs.make("textworld-express", "dev", n=5, game="coin")
    assert not {t.id for t in twc} & {t.id for t in coin}
    other = envs.make("textworld-express", "dev", n=5, game="twc", params="numLocations=2,numItemsToPutAway=3")
    assert not {t.id for t in twc} & {t.id for t in other}
    assert envs.make("textworld-express", "dev", n=1)[0].data["game"] == "twc"  # twc is the default
    with pytest.raises(ValueError, match="test_unseen"):
        envs.make("textworld-express", "test_unseen")
    with pytest.raises(ValueError, match="game"):
        envs.make("textworld-express", "train", game="zork")


def test_twx_invalid_and_unparseable_cost_a_step(twx):
    task = twx_task("twc", 0)
    twx.reset(task)
    assert twx.step("Thought: dance!\nAction: dance wildly") == (TWX_INVALID, 0.0, False)
    assert envs.invalid(twx, TWX_INVALID)
    obs, reward, done = twx.step("I have no idea.\nThought: hmm")
    assert "no action found" in obs and (reward, done) == (0.0, False) and envs.invalid(twx, obs)
    twx.max_steps = 3
    obs, reward, done = twx.step("Action: inventory")
    assert done and reward == 0.0 and not envs.invalid(twx, obs)
    assert twx.step("Action: inventory") == (env_real._EPISODE_OVER, 0.0, True)


def test_twx_partial_reward_at_step_limit_and_failure():
    pytest.importorskip("textworld_express")
    env = env_real.TextWorldExpressEnv(max_steps=3)
    try:
        # twc seed 0: two items to put away (a clean brown shirt and a clean blue T-shirt, both in
        # the wardrobe); taking and putting away each item is worth 1 point of 4, so putting one
        # away and hitting the step limit scores 2/4.
        env.reset(twx_task("twc", 0))
        assert env.max_steps == 3
        results = [env.step(f"Action: {a}") for a in
                   ["take clean brown shirt", "open wardrobe", "put clean brown shirt in wardrobe"]]
        assert [d for _, _, d in results] == [False, False, True] and results[-1][1] == 0.5
        # cookingworld seed 0 needs a roasted red apple: frying it fails the task, reward 0
        env.reset(twx_task("cookingworld", 0))
        env.step("Action: take red apple")
        obs, reward, done = env.step("Action: cook red apple in stove")
        assert (reward, done) == (0.0, True)
    finally:
        env.close()


def test_twx_expert_mid_episode_keeps_the_episode(twx):
    task, other = twx_task("twc", 10005), twx_task("coin", 20003)
    twx.reset(task)
    turns = twx.expert(task)
    twx.step(turns[0])
    assert twx.expert(other)
    assert twx.prompt == env_real.TWX_PROMPTS["twc"]  # still the episode's game
    assert [twx.step(t) for t in turns[1:]][-1][1:] == (1.0, True)


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "scienceworld", None)  # makes `import scienceworld` fail
    with pytest.raises(ImportError, match="pip install scienceworld"):
        env_real.ScienceWorldEnv()
    monkeypatch.setitem(sys.modules, "textworld_express", None)
    with pytest.raises(ImportError, match="pip install textworld-express"):
        env_real.TextWorldExpressEnv()


@pytest.mark.parametrize("name, module", [("scienceworld", "scienceworld"), ("textworld-express", "textworld_express")])
def test_close_waits_for_the_jvm(name, module):
    """close() returns once the JVM has exited, so the package's own __del__ (which closes again)
    finds no half-closed pipe to write to (it printed a BrokenPipeError at the end of runs)."""
    pytest.importorskip(module)
    env = envs.load_env(name)
    env.close()
    procs = [s._gateway.java_process for s in (getattr(env, "_sim", None), getattr(env, "_aux", None)) if s]
    assert procs and all(p.poll() is not None for p in procs)
