"""Tests of the multi-hop QA environment (env_hotpotqa.py): experts, splits, actions, rewards, real files."""
import json

import pytest

import envs
from env_hotpotqa import HotpotQAEnv, answer_reward, exact_match, f1_score, kb, normalize_answer

SPLITS = ("train", "dev", "test", "test_unseen")


@pytest.fixture(scope="module")
def all_tasks():
    return {s: HotpotQAEnv.make_tasks(s) for s in SPLITS}


def replay(env, task, turns):
    observations, reward, done = [env.reset(task)], 0.0, False
    for turn in turns:
        obs, reward, done = env.step(turn)
        observations.append(obs)
        if done:
            break
    return observations, reward, done


# ----------------------------------------------------------------------------- experts and splits


def test_expert_solves_every_builtin_task(all_tasks):
    env = HotpotQAEnv()
    with_lookup = total = 0
    thoughts = set()
    for split, tasks in all_tasks.items():
        assert len(tasks) >= 200, split
        for task in tasks:
            turns = env.expert(task)
            observations, reward, done = replay(env, task, turns)
            assert done and reward == 1.0, (task.id, turns, observations)
            assert len(turns) <= env.max_steps
            # the expert reads its evidence: every supporting sentence was shown to it
            seen = " ".join(observations)
            for title, sent in task.data["supporting_facts"]:
                assert kb().pages[title][sent] in seen, (task.id, title, sent)
            actions = [envs.parse_action(t) for t in turns]
            lookups = [o for a, o in zip(actions, observations[1:]) if a.startswith("lookup[")]
            # a lookup for a built-in fact finds it first: the keyword occurs in no earlier sentence
            assert all(o.startswith("(Result 1 / ") for o in lookups), (task.id, lookups)
            with_lookup += bool(lookups)
            total += 1
            thoughts.update(t.split("\n")[0] for t in turns)
    # both kinds of question occur: facts shown by search alone, and facts that need lookup
    assert 0.2 < with_lookup / total < 0.8, with_lookup / total
    assert len(thoughts) > total  # thoughts are situational, not a fixed string


def test_splits_disjoint_and_unseen_templates(all_tasks):
    ids = [t.id for s in SPLITS for t in all_tasks[s]]
    questions = [t.instruction for s in SPLITS for t in all_tasks[s]]
    assert len(ids) == len(set(ids)) and len(questions) == len(set(questions))
    seen_templates = {t.data["template"] for s in ("train", "dev", "test") for t in all_tasks[s]}
    unseen_templates = {t.data["template"] for t in all_tasks["test_unseen"]}
    assert unseen_templates and not seen_templates & unseen_templates
    # every in-distribution template is in train, dev and test alike
    for s in ("train", "dev", "test"):
        assert {t.data["template"] for t in all_tasks[s]} == seen_templates
    for s in SPLITS:  # bridge and comparison questions in every split, yes/no answers among them
        types = {t.data["type"] for t in all_tasks[s]}
        assert types == {"bridge", "comparison"}, s
        assert {"yes", "no"} <= {t.data["answer"] for t in all_tasks[s]}, s


def test_make_is_deterministic_and_partition_ignores_seed(all_tasks):
    a = envs.make("hotpotqa", "dev", n=40, seed=3)
    b = envs.make("hotpotqa", "dev", n=40, seed=3)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    assert [t.id for t in envs.make("hotpotqa", "dev", n=40, seed=4)] != [t.id for t in a]
    for split in SPLITS:
        full = {t.id for t in all_tasks[split]}
        for seed in range(5):
            drawn = HotpotQAEnv.make_tasks(split, n=30, seed=seed)
            assert len(drawn) == 30 and {t.id for t in drawn} <= full
    assert len(HotpotQAEnv.make_tasks("test", n=10_000)) == len(all_tasks["test"])
    # a task rebuilt from its JSON plays the same
    t = envs.Task.from_json(json.loads(json.dumps(a[0].to_json())))
    env = HotpotQAEnv()
    assert replay(env, t, env.expert(t))[1] == 1.0
    with pytest.raises(ValueError, match="split"):
        HotpotQAEnv.make_tasks("validation")


# ----------------------------------------------------------------------------- actions


def test_bad_actions_are_informative_and_cost_a_step():
    env = envs.load_env("hotpotqa")
    task = HotpotQAEnv.make_tasks("dev", n=1)[0]
    first = env.reset(task)
    assert first == f"Question: {task.instruction}"
    bad = [("Thought: I am not sure yet.", "no 'Action:'"),
           ("Thought: go\nAction: jump[high]", "Invalid action: jump[high]"),
           ("Action: search", "Invalid action: search"),
           ("Action: search[  ]", "inside the brackets"),
           ("Action: lookup[born]", "No page is open"),
           ("Action: think[hmm]", "Invalid action")]
    for i, (turn, expected) in enumerate(bad, 1):
        obs, reward, done = env.step(turn)
        assert expected in obs and reward == 0.0 and not done, (turn, obs)
        assert "search[entity]" in obs, obs  # says what the valid forms are
        assert env.steps == i
    # the two remaining steps: one more bad action, then the limit ends the episode
    assert env.step("Action: dance[]")[2] is False
    obs, reward, done = env.step("")
    assert done and reward == 0.0 and "Step limit (8)" in obs


def test_step_before_reset_non_text_turns_and_foreign_tasks():
    env = envs.load_env("hotpotqa")
    with pytest.raises(RuntimeError, match=r"reset\(task\) before step"):
        env.step("Action: search[x]")
    env.reset(HotpotQAEnv.make_tasks("dev", n=1)[0])
    obs, reward, done = env.step(None)  # as household: the turn is taken as text
    assert obs.startswith("Invalid action: None.") and (reward, done, env.steps) == (0.0, False, 1)
    for task in (envs.make("webshop", "dev", n=1)[0], envs.make("household", "dev", n=1)[0]):
        for call in (env.reset, env.expert):
            with pytest.raises(ValueError, match=f"task {task.id} .* is not a hotpotqa task: its data has no "
                                                 "'question', 'answer', 'hops'"):
                call(task)


def test_search_miss_lists_similar_titles_and_keeps_page():
    env = HotpotQAEnv()
    task = HotpotQAEnv.make_tasks("train", n=1, seed=11)[0]
    env.reset(task)
    title = task.data["hops"][0]["title"]
    shown = env.step(f"Action: Search[{title.upper()}]")[0]  # case-insensitive, as ReAct's Search[...]
    assert shown == " ".join(kb().pages[title][:5])
    typo = title[:-1]
    obs = env.step(f"Action: search[{typo}]")[0]
    assert obs.startswith(f"Could not find {typo}. Similar: [") and repr(title) in obs
    similar = eval(obs[len(f"Could not find {typo}. Similar: "):-1])
    assert 1 <= len(similar) <= 5 and similar[0] == title
    # a failed search leaves the open page in place: lookup still reads it
    first_word = kb().pages[title][0].split()[0]
    assert env.step(f"lookup[{first_word}]")[0].startswith("(Result 1 / ")


def test_lookup_walks_through_results():
    env = HotpotQAEnv(max_steps=50)
    org = next(t for t in kb().org if sum(t in s for s in kb().pages[t]) >= 3)
    page = kb().pages[org]
    containing = [s for s in page if org.lower() in s.lower()]
    task = HotpotQAEnv.make_tasks("train", n=1)[0]
    env.reset(task)
    env.step(f"search[{org}]")
    for k, sentence in enumerate(containing, 1):
        assert env.step(f"lookup[{org.lower()}]")[0] == f"(Result {k} / {len(containing)}) {sentence}"
    assert env.step(f"lookup[{org}]")[0] == "No more results."
    assert env.step("lookup[zzzqqq]")[0] == "No more results."  # a new keyword starts over
    env.step(f"search[{org}]")  # a new search resets lookup
    assert env.step(f"lookup[{org}]")[0].startswith(f"(Result 1 / {len(containing)}) ")


def test_step_limit_ends_episode_with_zero_reward():
    env = HotpotQAEnv()
    task = HotpotQAEnv.make_tasks("test", n=1)[0]
    env.reset(task)
    title = task.data["hops"][0]["title"]
    for i in range(1, 8):
        assert env.step(f"search[{title}]")[2] is False
    obs, reward, done = env.step(f"search[{title}]")
    assert done and reward == 0.0 and "Step limit" in obs
    assert env.step(f"finish[{task.data['answer']}]") == ("The episode is over.", 0.0, True)


# ----------------------------------------------------------------------------- rewards


def test_answer_metric_by_hand():
    assert normalize_answer("The  Silent Harbour!") == "silent harbour"
    assert normalize_answer("An apple, a day") == "apple day"
    assert f1_score("silent harbour lights", "The Silent Harbour") == pytest.approx(0.8)  # p 2/3, r 1
    assert f1_score("harbour", "The Silent Harbour") == pytest.approx(2 / 3)  # p 1, r 1/2
    assert f1_score("yes", "no") == 0.0 and f1_score("yes indeed", "yes") == 0.0
    assert f1_score("no", "No.") == 1.0 and f1_score("Paris", "London") == 0.0
    # token-multiset equality gives F1 1 without exact match; the env keeps 1.0 for EM only
    assert f1_score("harbour silent", "silent harbour") == 1.0
    assert not exact_match("harbour silent", "silent harbour")
    assert answer_reward("harbour silent", "silent harbour") == 0.99
    assert answer_reward("the silent harbour.", "Silent Harbour") == 1.0


def test_partial_reward_in_episode():
    env = HotpotQAEnv()
    task = next(t for t in HotpotQAEnv.make_tasks("train") if len(t.data["answer"].split()) == 2
                and t.data["template"] == "B5")  # answer: a founder's full name, e.g. "Galen Belley"
    env.reset(task)
    first, last = task.data["answer"].split()
    obs, reward, done = env.step(f"Thought: guess\nAction: finish[{last}]")
    assert done and reward == pytest.approx(2 / 3) and obs == "Episode finished, reward = 0.667"
    env.reset(task)
    assert env.step(f"finish[{last} {first}]")[1] == 0.99
    env.reset(task)
    assert env.step(f"finish[{first.lower()} {last}.]")[1] == 1.0


# ----------------------------------------------------------------------------- real HotpotQA files


def _paragraph(title, sentences):
    return [title, [s if i == 0 else " " + s for i, s in enumerate(sentences)]]


TOWER = ["Velmora Tower is an office tower in Dunmarsh.", "It has 41 floors.",
         "An architect's model of the tower is on show in its lobby.", "The tower stands beside the old harbour.",
         "It opened to tenants in 1969.", "Its lobby holds a public gallery.",
         "The tower was designed by the architect Ines Carrow.", "It was renovated in 2011."]
FIXTURE = [  # HotpotQA distractor format, made-up content
    {"_id": "q-bridge", "type": "bridge", "level": "hard",
     "question": "In what year was the architect of Velmora Tower born?", "answer": "1931",
     "supporting_facts": [["Velmora Tower", 6], ["Ines Carrow", 0]],
     "context": [_paragraph("Velmora Tower", TOWER),
                 _paragraph("Ines Carrow", ["Ines Carrow (1931-2004) was an architect from Dunmarsh.",
                                            "She studied in Lisbon."]),
                 _paragraph("Velmora Bridge", ["Velmora Bridge is a road bridge.", "It opened in 1958."]),
                 _paragraph("Carrow Hall", ["Carrow Hall is a concert venue.", "It seats 900 people."])]},
    {"_id": "q-compare", "type": "comparison", "level": "medium",
     "question": "Are Lake Orrin and Lake Pell both in the same province?", "answer": "no",
     "supporting_facts": [["Lake Orrin", 0], ["Lake Pell", 1]],
     "context": [_paragraph("Lake Pell", ["Lake Pell is a glacial lake.", "It lies in the province of Harrow."]),
                 _paragraph("Lake Orrin", ["Lake Orrin is a lake in the province of Velt.", "It is 12 km long."]),
                 _paragraph("Orrin River", ["The Orrin River drains Lake Orrin."])]},
    {"_id": "q-single", "type": "bridge", "level": "easy",
     "question": "Which river flows through Dunmarsh?", "answer": "the Kesh",
     "supporting_facts": [["Dunmarsh", 5], ["Dunmarsh", 9]],  # sentence 9 does not exist (a known data quirk)
     "context": [_paragraph("Dunmarsh", ["Dunmarsh is a town.", "It has a market.", "It has a harbour.",
                                         "It has a port.", "It has a school.",
                                         "The Kesh flows through the town centre."])]},
]


@pytest.fixture
def hotpot_file(tmp_path):
    path = tmp_path / "hotpot_dev_distractor.json"
    path.write_text(json.dumps(FIXTURE))
    return str(path)


def test_real_file_expert_solves_every_question(hotpot_file):
    tasks = envs.make("hotpotqa", "dev", data_file=hotpot_file)
    assert sorted(t.id for t in tasks) == ["hotpotqa-dev-q-bridge", "hotpotqa-dev-q-compare",
                                           "hotpotqa-dev-q-single"]
    assert all(t.split == "dev" for t in tasks)
    for env in (HotpotQAEnv(), HotpotQAEnv(data_file=hotpot_file)):
        for task in tasks:
            turns = env.expert(task)
            observations, reward, done = replay(env, task, turns)
            assert done and reward == 1.0, (task.id, turns, observations)
            record = next(r for r in FIXTURE if r["_id"] == task.data["qid"])
            assert observations[0] == f"Question: {record['question']}"
            pages = dict(record["context"])
            for title, sent in record["supporting_facts"]:
                if sent < len(pages[title]):
                    assert pages[title][sent].strip() in " ".join(observations), (title, sent)
            actions = [envs.parse_action(t) for t in turns]
            if task.data["qid"] == "q-bridge":
                # "architect" and "tower" occur earlier in the page; the expert picks a word that reaches
                # sentence 6 in one lookup
                assert actions == ["search[Velmora Tower]", "lookup[designed]", "search[Ines Carrow]",
                                   "finish[1931]"]
            if task.data["qid"] == "q-compare":
                assert actions == ["search[Lake Orrin]", "search[Lake Pell]", "finish[no]"]
    # a real question's corpus is its own context: other titles are not found
    env = HotpotQAEnv()
    env.reset(next(t for t in tasks if t.data["qid"] == "q-compare"))
    obs = env.step("search[Velmora Tower]")[0]
    assert obs.startswith("Could not find Velmora Tower. Similar: [") and "Lake" in obs


def test_real_file_errors(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        HotpotQAEnv.make_tasks("dev", data_file=missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        HotpotQAEnv(data_file=str(bad))
    cases = [("answer", lambda r: r.pop("answer")), ("context", lambda r: r.pop("context")),
             ("supporting_facts", lambda r: r["supporting_facts"].append(["Nowhere", 0])),
             ("context", lambda r: r["context"].append(["Title only"]))]
    for i, (name, damage) in enumerate(cases):
        records = json.loads(json.dumps(FIXTURE))
        damage(records[1])
        path = tmp_path / f"damaged{i}.json"
        path.write_text(json.dumps(records))
        with pytest.raises(ValueError) as err:
            HotpotQAEnv.make_tasks("train", data_file=str(path))
        message = str(err.value)
        assert f"damaged{i}.json" in message and name in message and "\n" not in message, message



def _blank_title_fact(r):
    r["context"].append(["  ", ["A page with a blank title."]])
    r["supporting_facts"].append(["  ", 0])


@pytest.mark.parametrize("field, damage", [  # records the expert cannot walk: refused when the file loads
    ("context", lambda r: r.update(context=[], supporting_facts=[])),  # crashed the expert (IndexError)
    ("supporting_facts", lambda r: r.update(supporting_facts=[])),  # crashed the expert (IndexError)
    ("supporting_facts", _blank_title_fact),  # the expert's demonstration held an invalid search[  ]
])
def test_real_file_records_the_expert_cannot_walk(tmp_path, field, damage):
    records = json.loads(json.dumps(FIXTURE))
    damage(records[1])
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError) as err:
        HotpotQAEnv.make_tasks("dev", data_file=str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: question 1 (_id q-compare): field {field!r}"), message
    assert "\n" not in message, message


def test_real_file_titles_differing_only_in_case(tmp_path):
    # a distractor titled as a supporting page up to case no longer hides it from the expert's search
    records = json.loads(json.dumps(FIXTURE))
    records[0]["context"].append(_paragraph("VELMORA TOWER", ["VELMORA TOWER is a song.", "It was a hit."]))
    path = tmp_path / "twins.json"
    path.write_text(json.dumps(records))
    task = next(t for t in HotpotQAEnv.make_tasks("dev", data_file=str(path)) if t.data["qid"] == "q-bridge")
    env = HotpotQAEnv(data_file=str(path))
    turns = env.expert(task)
    observations, reward, done = replay(env, task, turns)
    assert done and reward == 1.0 and TOWER[6] in " ".join(observations), observations
    env.reset(task)
    assert env.step("search[VELMORA TOWER]")[0].startswith("VELMORA TOWER is a song.")
    assert env.step("search[Velmora Tower]")[0].startswith(TOWER[0])

def test_real_task_replays_from_the_envs_own_file_after_the_original_moved(hotpot_file, tmp_path):
    task = HotpotQAEnv.make_tasks("test", data_file=hotpot_file, n=1, seed=2)[0]
    moved = tmp_path / "moved.json"
    moved.write_text(open(hotpot_file).read())
    task = envs.Task.from_json(json.loads(json.dumps(task.to_json())))
    task.data["data_file"] = str(tmp_path / "gone.json")  # as if the task file came from another machine
    env = HotpotQAEnv(data_file=str(moved))
    assert replay(env, task, env.expert(task))[1] == 1.0
