"""envs.py: the shared protocol: action parsing, normalisation, trajectory files, dump."""
import json
import subprocess
import sys

import pytest

import envs


@pytest.mark.parametrize("turn,want", [
    ("Thought: I need shoes.\nAction: search[red shoes]", "search[red shoes]"),
    ("thought: x\naction:   click[B0A1]  \nmore text", "click[B0A1]"),
    ("Action: look\nAction: inventory", "inventory"),  # the last action counts
    ("Thought: x\nAction: search[a] Action: click[b]", "click[b]"),  # also on one line
    ("Thought: the transaction: click[Buy Now] comes next", None),  # a word ending in 'action' is not 'Action'
    ("Thought: done.\nAction: click[Buy Now]\nsatisfaction: high", "click[Buy Now]"),
    ("Thought: x\nAction:\nsearch[a]", "search[a]"),  # the action on the next line, as before
    ("Thought: I'll take it.\nAction: take spoon 2 fromAction: take spoon 2", "take spoon 2"),  # glued, as models do
    ("go to fridge 1", "go to fridge 1"),  # a bare action
    ("Thought: only thinking", None),
    ("", None),
    ("Action:   ", None),
])
def test_parse_action(turn, want):
    assert envs.parse_action(turn) == want


def test_normalize_action():
    assert envs.normalize_action("Click[ Buy  Now ]") == envs.normalize_action("click[buy now]") == "click[buy now]"
    assert envs.normalize_action("search[red shoes]") != envs.normalize_action("search[blue shoes]")
    assert envs.normalize_action(None) == ""


def test_trajectory_roundtrip_and_foreign_file(tmp_path):
    env = envs.load_env("hotpotqa")
    task = envs.make("hotpotqa", "dev", n=1)[0]
    rec = envs.run_expert(env, task)
    assert rec["reward"] == 1.0
    conv = rec["conversations"]
    assert conv[0]["from"] == "human" and envs.REACT_FORMAT in conv[0]["value"]
    assert [c["from"] for c in conv[1:3]] == ["gpt", "human"] and conv[2]["value"].startswith("Observation: ")
    path = str(tmp_path / "t.json")
    envs.save_trajectories(path, [rec])
    assert envs.load_trajectories(path) == [rec]
    assert envs.Task.from_json(rec["task"]) == task
    # a file in the ETO/IPR format written elsewhere: no task field, ids as ints
    foreign = [{"id": 7, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Action: x"}],
                "reward": 0.5}]
    json.dump(foreign, open(tmp_path / "f.json", "w"))
    assert envs.load_trajectories(str(tmp_path / "f.json"))[0]["reward"] == 0.5


@pytest.mark.parametrize("content,msg", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"id": 1}]', "record 0 has no 'conversations'"),
    ('[{"conversations": [{"from": "bot", "value": "x"}]}]', "record 0 turn 0"),
    ('[{"conversations": 5}]', "record 0 field 'conversations' should be a list of turns, got int"),
    ('[{"conversations": "ab"}]', "record 0 field 'conversations' should be a list of turns, got str"),
    ('[{"conversations": []}]', "record 0 has an empty 'conversations' list"),
    ('[{"conversations": [{"from": "human", "value": 3}]}]', "record 0 turn 0: 'value' should be a string, got int"),
    ('[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}]',
     "record 0 turn 2: a 'gpt' turn where 'human' belongs"),
    ('[{"conversations": [{"from": "gpt", "value": "a"}]}]', "record 0 turn 0: a 'gpt' turn where 'human' belongs"),
])
def test_bad_trajectory_files_name_the_problem(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=msg):
        envs.load_trajectories(str(p))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        envs.load_trajectories(str(tmp_path / "nope.json"))


def test_make_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown env 'shop'"):
        envs.make("shop", "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        envs.make("webshop", "val")


@pytest.mark.parametrize("name", ["webshop", "household", "hotpotqa"])
def test_make_checks_n(name):
    whole = envs.make(name, "dev")
    for bad in (-1, "3", 2.0, True):  # -1 used to drop one task (hotpotqa) or fail inside random.sample
        with pytest.raises(ValueError, match=f"n={bad!r}: expected a whole number >= 0"):
            envs.make(name, "dev", n=bad)
    assert envs.make(name, "dev", n=0) == []
    assert len(envs.make(name, "dev", n=len(whole) + 1000)) == len(whole)  # a larger n: the whole split


def test_dump_command_writes_solved_experts(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "envs.py", "dump", "--env", "household", "--split", "dev", "--n", "5",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = envs.load_trajectories(str(out))
    assert len(recs) == 5 and all(x["reward"] == 1.0 for x in recs)
    assert "5 reach reward 1" in r.stdout


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = str(tmp_path / "x.json")
    envs.write_json(p, {"a": 1})

    with pytest.raises(TypeError):
        envs.write_json(p, {"a": object()})  # not serialisable: fails before anything is written
    assert json.load(open(p)) == {"a": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.json"]


def test_invalid_marks_exactly_the_actions_not_carried_out():
    """Each family's invalid() on real observations: malformed, unknown and impossible actions are
    invalid; the expert's first action and a well-formed action that finds nothing are not."""
    cases = {
        "webshop": [("Thought: hmm", True), ("Action: click[Buy Now]", True), ("Action: dance[x]", True),
                    ("Action: search[zzzz qqqq]", False)],
        "household": [("Thought: hmm", True), ("Action: fly to the moon", True),
                      ("Action: take spoon 99 from drawer 9", True), ("Action: look", False), ("Action: inventory", False)],
        "hotpotqa": [("Thought: hmm", True), ("Action: lookup[year]", True), ("Action: dance[x]", True),
                     ("Action: search[]", True), ("Action: search[Zzqx Qqzx]", False)],
    }
    for name, steps in cases.items():
        env = envs.load_env(name)
        task = envs.make(name, "test", n=1, seed=0)[0]
        for turn, want in steps:
            env.reset(task)
            obs = env.step(turn)[0]
            assert envs.invalid(env, obs) is want, (name, turn, obs)
        env.reset(task)
        obs = env.step(env.expert(task)[0])[0]
        assert not envs.invalid(env, obs), (name, obs)


def test_play_expert_hint_starts_at_the_current_step_and_costs_no_step():
    """`envs.py play`: 'expert' shows the expert's actions from where the player is (while on its path),
    says where the paths parted otherwise, and never uses up a turn."""
    import subprocess
    import sys
    env = envs.load_env("household")
    task = envs.make("household", "dev", n=1, seed=0)[0]
    env.reset(task)
    plan = [envs.parse_action(t) for t in env.expert(task)]
    typed = ["expert", plan[0], "expert", "look at the ceiling", "expert"]
    r = subprocess.run([sys.executable, "envs.py", "play", "--env", "household"], input="\n".join(typed) + "\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hints = [line.split("> ", 1)[1] for line in r.stdout.splitlines() if "expert" in line and "> " in line]
    assert hints[0] == "expert, from here: " + " | ".join(plan)
    assert hints[1] == "expert, from here: " + " | ".join(plan[1:])
    assert hints[2].startswith("you left the expert's path at step 2 ")
    prompts = [line.split(">")[0] for line in r.stdout.splitlines() if line.startswith("[")]
    assert prompts[:5] == ["[1/40] ", "[1/40] ", "[2/40] ", "[2/40] ", "[3/40] "]  # one step per action, none per hint
