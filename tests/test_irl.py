"""train_irl.py: PPO / discriminator / reward / advantage numbers by hand, packed scoring against its
references, D and the policy learning on a tiny model, smoke runs of both modes, kill -9 resume."""
import copy
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import agent as AG
import stepagent as S
import train_irl as TR
from test_implicit import MICRO, _metrics
from test_implicit import _run as TI_run
from test_stepagent import CONV, tiny  # noqa: F401  (fixture)


def test_pg_loss_by_hand():
    r = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 1.1])  # ratios pi / pi_old: above, below and inside 1 +- 0.2
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    per = [-1.2, 1.5, -0.5, 0.8, -1.1, 1.1]  # -min(r A, clip(r) A), worked out one by one
    for i in range(6):
        loss, clip = TR.pg_loss(r[i:i + 1].log(), torch.zeros(1), adv[i:i + 1], 0.2)
        assert abs(loss.item() - per[i]) < 1e-6, i
        assert clip.item() == (i < 4)
    loss, clip = TR.pg_loss(r.log(), torch.zeros(6), adv, 0.2)
    assert abs(loss.item() - sum(per) / 6) < 1e-6 and abs(clip.item() - 4 / 6) < 1e-6
    # gradient: clipped terms carry none; inside the range d(-r A)/d log r = -r A
    lp = r.log().requires_grad_()
    TR.pg_loss(lp, torch.zeros(6), adv, 0.2)[0].backward()
    assert torch.allclose(lp.grad, torch.tensor([0, 1.5, -0.5, 0, -1.1, 1.1]) / 6, atol=1e-6)
    # per action vs per token: an action of two tokens, log-ratios 0.1 and 0.2
    new, old = torch.tensor([0.1, 0.2, -1.0]), torch.zeros(3)
    act, A = torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0])
    seq, _ = TR.ppo_loss(new, old, act, A, 0.5, token_level=False)
    assert abs(seq.item() - (-math.exp(0.3) + 0.5) / 2) < 1e-6  # action 2: min(-exp(-1), -0.5) = -0.5
    tokl, _ = TR.ppo_loss(new, old, act, A, 0.5, token_level=True)
    assert abs(tokl.item() - (-math.exp(0.1) - math.exp(0.2) + 0.5) / 3) < 1e-6  # exp(-1) < 0.5: clipped at 0.5
    # k3: 0 at equal log-probs, exp(d) - d - 1 otherwise
    assert TR.kl_k3(torch.zeros(3), torch.zeros(3)).item() == 0
    assert abs(TR.kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])).item() - math.exp(-1)) < 1e-6  # d = -1


def test_kl_estimators_expectations_under_the_reference_policys_samples():
    """The penalty's tokens were sampled by pi_ref (= pi_old). Over one categorical, the exact
    expectation under pi_ref of k3_iw is KL(pi || pi_ref); that of k3 is E[pi_ref / pi] - 1 -
    KL(pi_ref || pi), which grows without bound as pi makes a token rare, where k3_iw stays <= 1."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, generator=g, dtype=torch.float64).log_softmax(-1)
    new = (ref + torch.randn(50, generator=g, dtype=torch.float64)).log_softmax(-1)
    w = ref.exp()  # pi_ref's probability of sampling each token

    def expect(kind):  # sum_x pi_ref(x) f(x), each token's f from kl_k3 on that token alone
        return sum(w[i] * TR.kl_k3(new[i:i + 1], ref[i:i + 1], kind) for i in range(50)).item()

    kl_new_ref = (new.exp() * (new - ref)).sum().item()
    kl_ref_new = (w * (ref - new)).sum().item()
    assert abs(expect("k3_iw") - kl_new_ref) < 1e-9
    assert abs(expect("k3") - ((w * (ref - new).exp()).sum().item() - 1 - kl_ref_new)) < 1e-9
    assert abs(expect("k3") - kl_new_ref) > 0.1  # not the same quantity once pi has moved
    rare = torch.tensor([-30.0])  # pi drops a token pi_ref gave e^-2
    assert TR.kl_k3(rare, torch.tensor([-2.0]), "k3").item() > 1e11
    assert 0.99 < TR.kl_k3(rare, torch.tensor([-2.0]), "k3_iw").item() <= 1
    assert TR.kl_k3(torch.zeros(3), torch.zeros(3), "k3_iw").item() == 0
    with pytest.raises(ValueError, match="--kl_estimator 'k4'"):  # not k3_iw by default (results.py's cells skip main)
        TR.kl_k3(torch.zeros(3), torch.zeros(3), "k4")


def test_group_advantages_rewards_and_disc_loss_by_hand():
    r = torch.tensor([[1.0, 0.0], [2.0, 2.0], [3.0, 0.0]])
    assert torch.equal(TR.group_advantages(r, std=False), torch.tensor([[0.5, -0.5], [0.0, 0.0], [1.5, -1.5]]))
    a = TR.group_advantages(r, std=True)  # unbiased std: sqrt(0.5), 0, sqrt(4.5)
    assert torch.allclose(a, torch.tensor([[1, -1], [0, 0], [1, -1]]) * math.sqrt(0.5), atol=1e-5)
    noise = TR.group_advantages(torch.tensor([[4.9276, 4.9276 + 4.8e-7, 4.9276 - 2.4e-7, 4.9276]]), std=True)
    assert noise.abs().max() < 1e-3  # identical practices' float noise is no signal (not +-1 after the std)
    k4 = TR.group_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), std=False)
    assert torch.equal(k4, torch.tensor([[-2.0, -1.0, 0.0, 3.0]]))
    # the step rewards at D = sigmoid(1.5)
    d = 1 / (1 + math.exp(-1.5))
    z = torch.tensor([1.5])
    assert abs(TR.step_reward(z, "logit").item() - (math.log(d) - math.log(1 - d))) < 1e-6
    assert abs(TR.step_reward(z, "logd").item() - math.log(d)) < 1e-6
    assert abs(TR.step_reward(z, "log1md").item() + math.log(1 - d)) < 1e-6
    with pytest.raises(ValueError, match="--reward 'lgo'"):
        TR.step_reward(z, "lgo")
    # L_D / 2: log 2 at D = 1/2; expert logit 1 vs agent logits 0 and -2
    assert abs(TR.disc_loss(torch.zeros(3), torch.zeros(5)).item() - math.log(2)) < 1e-6
    want = 0.5 * (math.log(1 + math.exp(-1)) + 0.5 * (math.log(2) + math.log(1 + math.exp(-2))))
    assert abs(TR.disc_loss(torch.tensor([1.0]), torch.tensor([0.0, -2.0])).item() - want) < 1e-6
    acc = TR.disc_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([0.5, -2.0, -1.0, -3.0]))
    assert acc == {"disc/acc_expert": 0.5, "disc/acc_agent": 0.75}


def test_disc_data_erred_keeps_only_states_where_a_practice_missed():
    # a batch without a missed practice leaves no agent example: only the expert term, no nan
    assert abs(TR.disc_loss(torch.tensor([1.0]), torch.zeros(0)).item() - 0.5 * math.log(1 + math.exp(-1))) < 1e-6
    assert TR.disc_accuracy(torch.tensor([1.0]), torch.zeros(0)) == {"disc/acc_expert": 1.0, "disc/acc_agent": 0.0}
    # two jobs: 2 and 3 expert actions, 2 and 3 practices; job 0 missed at step 1, job 1 at step 2
    data = {"miss": [torch.tensor([False, True]), torch.tensor([False, False, True])],
            "erred": [torch.tensor([False, True]), torch.tensor([False, False, True])]}
    e, a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    erred = TR.Inverse(TR.IRLConfig(disc_data="erred"))
    kept = erred.sides(data, [0, 1], e, a)
    assert torch.equal(kept[0], e[[1, 4]]) and torch.equal(kept[1], a[[1, 4]])
    kept = erred.sides(data, [1], e[2:], a[2:])
    assert torch.equal(kept[0], e[[4]]) and torch.equal(kept[1], a[[4]])
    kept = TR.Inverse(TR.IRLConfig()).sides(data, [0, 1], e, a)  # GAIL: everything
    assert kept[0] is e and kept[1] is a


def test_collect_cuts_a_trajectory_to_the_context(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Inverse's jobs: a trajectory longer than the context is cut to it (AG.turn_spans' max_len), the
    states past the cut dropped with their practices, so D and the policy score only what a rollout shows."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    rec = {"id": "t0", "conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                         for m in CONV]}
    full_ids, full_spans = AG.turn_spans(tok, CONV)
    steps = [{"traj_id": "t0", "step": t, "agent": [{"text": "Action: click[8]", "match": False},
                                                     {"text": CONV[2 * t + 1]["content"], "match": True}]}
             for t in (0, 2)]
    monkeypatch.setattr(S, "inspect", lambda *a, **k: steps)
    method = TR.Inverse(TR.IRLConfig(out=str(tmp_path), k=2))
    monkeypatch.setattr(method, "records", lambda it: [rec])
    data = method.collect(model, tok, 0, None)
    assert [len(j[2]) for j in data["jobs"]] == [4] and data["jobs"][0][1] == full_spans  # fits: all of it
    model.args.max_seq_len = full_spans[2][1] - 1  # the context ends inside step 2's action
    data = method.collect(model, tok, 0, None)
    (ids, spans, cands), = data["jobs"]
    assert spans == full_spans[:2] and ids == full_ids[:full_spans[2][0]] and [t for t, _ in cands] == [0, 0]
    assert data["miss"][0].tolist() == [True, False] and data["erred"][0].tolist() == [True, False]
    assert [len(x) for x in data["old"]] == [sum(len(c) for _, c in cands)]  # pi_old per practice token


def _job(tok, texts_by_step):
    ids, spans = AG.turn_spans(tok, CONV)
    return ids, spans, [(t, AG.turn_ids(tok, x)) for t, xs in texts_by_step for x in xs]


@pytest.mark.parametrize("n_short", [2, 1])  # a second row padded to the first's length / forwarded on its own
def test_packed_action_tokens_and_disc_logits_equal_separate_forwards(tiny, n_short):  # noqa: F811
    model, tok = tiny
    ids, spans, cands = _job(tok, [(0, ["Action: search[blue]", "Thought: hm\nAction: click[8]"]),
                                   (2, ["Action: click[9]"] * 2)])
    rows = [S.pack_row(ids[:spans[n_short - 1][1]], spans[:n_short], cands[:2]), S.pack_row(ids, spans, cands)]
    assert len(S.length_groups([len(r[0]) for r in rows])) == (1 if n_short == 2 else 2)
    with torch.no_grad():
        lp, ent, act = TR.action_tokens(model, rows, own=False)
        want = torch.cat([c for _, c in S.score_packed(model, rows)])
        assert torch.equal(act, act.sort().values)  # actions numbered across rows in order
        assert torch.allclose(torch.zeros(6).index_add(0, act, lp), want, atol=1e-5)
        assert (ent > 0).all() and (ent < math.log(tok.vocab_size) + 1e-4).all()
        lp, _, act = TR.action_tokens(model, rows, own=True)
        want = torch.cat([e for e, _ in S.score_packed(model, rows)])
        assert torch.allclose(torch.zeros(n_short + len(spans)).index_add(0, act, lp), want, atol=1e-5)
        # D's logit = head(hidden at the action's last token) of state + action alone
        head = torch.nn.Linear(model.args.dim, 1)
        (e2, c2), (e, c) = TR.disc_logits(model, head, rows)
        last = lambda x: head(model.hidden(torch.tensor(x)[None])[0, -1]).item()  # noqa: E731
        assert torch.allclose(e, torch.tensor([last(ids[:b]) for _, b in spans]), atol=1e-5)
        assert torch.allclose(c, torch.tensor([last(ids[:spans[t][0]] + x) for t, x in cands]), atol=1e-5)
        assert torch.allclose(e2, e[:n_short], atol=1e-5) and torch.allclose(c2, c[:2], atol=1e-5)


def test_discriminator_separates_expert_from_random_actions(tiny):  # noqa: F811
    model, tok = tiny
    rng = random.Random(0)
    junk = lambda: "Action: " + "".join(rng.choice("abcdefgh []") for _ in range(rng.randint(3, 12)))  # noqa: E731
    data = {"jobs": [_job(tok, [(t, [junk(), junk()]) for t in range(4)])]}
    m = TR.Inverse(TR.IRLConfig(amp="none"))
    m.disc, m.disc_opt = TR.build_discriminator(copy.deepcopy(model), lr=3e-3)
    first = m.disc_step(data, [0])
    assert abs(first["losses/disc"] - math.log(2)) < 1e-6  # zero head: D = 1/2
    for _ in range(25):
        last = m.disc_step(data, [0])
    assert last["losses/disc"] < 0.3 and last["disc/acc_expert"] > 0.9 and last["disc/acc_agent"] > 0.9
    with torch.no_grad():
        (e, c), = TR.disc_logits(m.disc["body"], m.disc["head"], [S.pack_row(*data["jobs"][0])])
    assert (e > 0).float().mean() > 0.9 and (c < 0).float().mean() > 0.9


def test_policy_step_raises_the_better_practice(tiny):  # noqa: F811
    job = _job(tiny[1], [(1, ["Thought: B0A1 fits.\nAction: click[B0A1]", "Action: search[blue]"])])
    row = S.pack_row(*job)
    rewards = torch.tensor([1.0, 0.0])
    for token_level in (False, True):
        model = copy.deepcopy(tiny[0]).train()
        with torch.no_grad():
            before = S.score_packed(model, [row])[0][1]
            old = TR.action_tokens(model, [row], own=False)[0]
        m = TR.Inverse(TR.IRLConfig(amp="none", k=2, token_level=token_level))
        m.adv = (0, [TR.group_advantages(rewards.view(1, 2), False).flatten()], [rewards])
        out = m.pg_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), {"jobs": [job], "old": [old]}, [0])
        assert out["policy/clip_frac"] == 0 and out["losses/kl"] == 0  # rho = 1 at pi == pi_old
        assert out["actions"] == 2 and out["rewards/mean"] == 0.5 and out["policy/entropy"] > 0
        with torch.no_grad():
            after = S.score_packed(model, [row])[0][1]
        assert after[0] > before[0] and after[1] < before[1], token_level


def test_pg_step_one_trajectory_at_a_time_takes_the_batched_step(tiny):  # noqa: F811
    """pg_step backpropagates each trajectory alone at its share of the batch's actions and tokens
    (memory for one rollout); the step and the logged metrics are those of the batch's mean losses."""
    model, tok = tiny
    jobs = [_job(tok, [(0, ["Action: search[blue]", "Action: click[8]"]), (2, ["Action: click[9]", "Thought: hm"])]),
            _job(tok, [(1, ["Thought: B0A1 fits.\nAction: click[B0A1]", "Action: search[red shoes]"])]),
            _job(tok, [(3, ["Action: buy", "Action: back"]), (0, ["Action: x", "Action: search[a b c d e f]"])])]
    rows = [S.pack_row(*j) for j in jobs]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lp0 = TR.action_tokens(model, rows, own=False)[0]
        per_row = [len(TR.action_tokens(model, [r], own=False)[0]) for r in rows]
    old = list((lp0 + 0.3 * torch.randn(len(lp0), generator=g)).split(per_row))  # ratios off 1: some clipped
    adv = [torch.randn(len(j[2]), generator=g) for j in jobs]
    rew = [torch.rand(len(j[2]), generator=g) for j in jobs]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for token_level in (False, True):
        cfg = TR.IRLConfig(amp="none", k=2, token_level=token_level, grad_clip=1e9, kl_coef=0.5, clip_eps=0.2)
        m = TR.Inverse(cfg)
        m.adv = (0, adv, rew)
        a = copy.deepcopy(model).train()
        got = m.pg_step(a, torch.optim.SGD(a.parameters(), lr=1.0), {"jobs": jobs, "old": old}, [0, 1, 2])
        b = copy.deepcopy(model).train()
        lp, ent, act = TR.action_tokens(b, rows, own=False)
        pg, clip = TR.ppo_loss(lp, torch.cat(old), act, torch.cat(adv), 0.2, token_level)
        kl = TR.kl_k3(lp, torch.cat(old))
        (pg + 0.5 * kl).backward()
        assert 0 < clip.item() < 1 and kl.item() > 0
        want = {"losses/pg": pg.item(), "losses/kl": kl.item(), "policy/clip_frac": clip.item(),
                "policy/entropy": ent.mean().item(), "rewards/mean": torch.cat(rew).mean().item()}
        for k, v in want.items():
            assert abs(got[k] - v) < 1e-5, (token_level, k, got[k], v)
        assert got["actions"] == sum(len(x) for x in adv)
        for n, p in a.named_parameters():  # SGD at lr 1: the parameter moved by exactly its gradient
            assert torch.allclose(start[n] - p.detach(), b.get_parameter(n).grad, atol=1e-6, rtol=1e-4), n
        assert max(p.grad.abs().max().item() for p in b.parameters()) > 1e-3


# ----------------------------------------------------------------------------- runs

BASE = [*MICRO, "--n_dev", "1", "--n_test", "1", "--n_inspect", "4"]  # the novice's options (stepagent.Config)
ARGS = [*BASE, "--traj_batch", "1", "--pg_epochs", "2", "--save_every", "2",  # per iteration: 4 D + 8 policy steps
        "--disc_lr", "3e-3", "--pg_lr", "1e-3"]  # a micro model moves visibly only at large learning rates


def _run(args, timeout=300):
    return TI_run(args, timeout, script="train_irl.py")


@pytest.fixture(scope="module")
def novice(tmp_path_factory):
    """One micro novice (base model, expert data, SFT, its test evaluation), copied into each run."""
    out = str(tmp_path_factory.mktemp("novice"))
    r = subprocess.run([sys.executable, "stepagent.py", "sft", *BASE, "--out", out], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def inverse_run(novice, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inverse") / "run")
    shutil.copytree(novice, out)
    return out, _run([*ARGS, "--out", out])


def test_inverse_smoke(inverse_run):
    out, stdout = inverse_run
    assert "| StepAgent-Inverse iter 2 |" in stdout and "| novice (SFT) |" in stdout
    lines = _metrics(os.path.join(out, "inverse"))
    disc = [x for x in lines if "losses/disc" in x and "event" not in x]
    pg = [x for x in lines if "losses/pg" in x]
    assert [x["iteration"] for x in disc] == [1] * 4 + [2] * 4 and [x["iteration"] for x in pg] == [1] * 8 + [2] * 8
    assert [x["step"] for x in lines if "event" not in x] == list(range(1, 25))
    assert [x["step"] for x in disc] == [1, 2, 3, 4, 13, 14, 15, 16]  # D steps, then policy steps
    assert all({"disc/acc_expert", "disc/acc_agent", "disc/grad_norm"} <= set(x) for x in disc)
    assert all({"losses/kl", "rewards/mean", "policy/clip_frac", "policy/entropy", "grad_norm"} <= set(x) for x in pg)
    assert abs(disc[0]["losses/disc"] - math.log(2)) < 1e-6  # zero-initialised head
    assert pg[0]["losses/kl"] == 0 and pg[0]["policy/clip_frac"] == 0  # first policy step: pi == pi_old
    events = [x for x in lines if x.get("event") == "disc"]
    assert [(x["iteration"], x["step"]) for x in events] == [(1, 5), (2, 17)]
    assert all(0 <= x["disc/acc_expert"] <= 1 and 0 <= x["disc/acc_agent"] <= 1 and "losses/disc" in x for x in events)
    inspect = [x for x in lines if x.get("event") == "inspect"]  # the expert-action match rate per step index
    assert [x["iteration"] for x in inspect] == [1, 2] and all(x["match_by_step"].startswith("0:") for x in inspect)
    assert os.path.exists(os.path.join(out, "inverse", "iter2", "model.safetensors"))
    # the flags --disc_data erred keeps (each practice missed?, each state with a miss?) agree with inspection
    steps = [json.loads(x) for x in open(os.path.join(out, "inverse", "inspect-1.jsonl"))]
    miss, erred = {}, {}
    for s in steps:
        miss.setdefault(s["traj_id"], []).extend(not a["match"] for a in s["agent"])
        erred.setdefault(s["traj_id"], set()).update([s["step"]] if not all(a["match"] for a in s["agent"]) else [])
    data = torch.load(os.path.join(out, "inverse", "collect-1.pt"), weights_only=False)
    assert [m.tolist() for m in data["miss"]] == list(miss.values())
    assert [len(j[2]) for j in data["jobs"]] == [len(v) for v in miss.values()]
    assert [set(x.nonzero().flatten().tolist()) for x in data["erred"]] == list(erred.values())
    assert [len(x) for x in data["erred"]] == [len(j[1]) for j in data["jobs"]]  # one flag per expert action


def test_outcome_ppo_smoke(novice, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(novice, out)
    stdout = _run([*ARGS, "--reward", "outcome", "--n_inspect", "2", "--traj_batch", "2", "--eval_batch", "4",
                   "--out", out])
    assert "| PPO (outcome reward) iter 2 |" in stdout
    lines = _metrics(os.path.join(out, "ppo-outcome"))
    explore = [x for x in lines if x.get("event") == "explore"]
    assert [x["rollouts"] for x in explore] == [4, 4]  # 2 tasks x K = 2
    pg = [x for x in lines if "losses/pg" in x]
    assert [x["iteration"] for x in pg] == [1] * 4 + [2] * 4 and not any("losses/disc" in x for x in lines)
    assert pg[0]["losses/kl"] == 0 and pg[0]["policy/clip_frac"] == 0
    assert os.path.exists(os.path.join(out, "ppo-outcome", "iter2", "model.safetensors"))
    # the rollouts' partial files (collect-<it>-partial.pt, eval-*/partial.pt) are gone once kept
    left = [f for _, _, fs in os.walk(out) for f in fs if f.endswith("partial.pt")]
    assert left == [] and os.path.exists(os.path.join(out, "ppo-outcome", "collect-2.pt"))
    r = subprocess.run([sys.executable, "train_irl.py", "--reward", "logitt"], capture_output=True, text=True)
    assert r.returncode != 0 and "--reward 'logitt'" in r.stderr and "Traceback" not in r.stderr


def test_kill_9_then_rerun_equals_uninterrupted(inverse_run, novice, tmp_path):
    """kill -9 in the middle of iteration 2's policy steps, rerun: same metrics, D lines, table, weights."""
    from safetensors.torch import load_file

    a, b = inverse_run[0], str(tmp_path / "b")
    shutil.copytree(novice, b)
    p = subprocess.Popen([sys.executable, "train_irl.py", *ARGS, "--out", b], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    metrics = os.path.join(b, "inverse", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics) and sum('"iteration": 2, "losses/pg"' in x for x in open(metrics)) >= 3:
            os.kill(p.pid, signal.SIGKILL)  # past the save after policy step 2: D's rewards must be recomputed
            break
        time.sleep(0.005)
    assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(b, "inverse", "iter2"))
    stdout = _run([*ARGS, "--out", b])
    resumed = re.search(r"resuming .*: iteration 2, after update (\d+)", stdout)
    assert resumed and 4 < int(resumed.group(1)) < 12  # in the middle of the policy steps
    ma, mb = _metrics(os.path.join(a, "inverse")), _metrics(os.path.join(b, "inverse"))
    steps_a, steps_b = [x for x in ma if "event" not in x], [x for x in mb if "event" not in x]
    assert [x["step"] for x in steps_a] == [x["step"] for x in steps_b] == list(range(1, 25))
    for x, y in zip(steps_a, steps_b):
        assert x.keys() == y.keys()
        assert all(abs(x[k] - y[k]) <= 1e-6 * max(1, abs(x[k])) for k in x), (x, y)
    events = lambda m: [x for x in m if x.get("event") in ("disc", "inspect")]  # noqa: E731
    assert events(ma) == events(mb) and len(events(ma)) == 4
    sa, sb = (json.load(open(os.path.join(d, "inverse", "eval-iter2-test", "summary.json"))) for d in (a, b))
    assert {k: v for k, v in sa.items() if k != "seconds"} == {k: v for k, v in sb.items() if k != "seconds"}
    wa, wb = (load_file(os.path.join(d, "inverse", "iter2", "model.safetensors")) for d in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    da, db = (torch.load(os.path.join(d, "inverse", "last", "method.pt"), weights_only=False) for d in (a, b))
    assert da["steps"] == db["steps"] == 24
    assert all(torch.allclose(v, db["disc"][k], atol=1e-6) for k, v in da["disc"].items())
