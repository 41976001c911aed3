"""train_implicit.py: the step-DPO loss on hand-computed numbers, packed == naive, a smoke run."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

import agent as AG
import model as M
import sft as SFT
import stepagent as S
import train_implicit as TI
from test_stepagent import CONV, tiny  # noqa: F401  (fixture)


def test_step_dpo_loss_by_hand():
    z = torch.zeros(3)
    losses, rc, rr = TI.step_dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))  # equal log-ratios: log 2
    assert (rc == 0).all() and (rr == 0).all()
    # chosen ratio +2, rejected ratio -1, beta 0.5: logit 0.5 * 3 = 1.5 -> -log sigmoid(1.5)
    losses, rc, rr = TI.step_dpo_loss(torch.tensor([-1.0]), torch.tensor([-6.0]), torch.tensor([-3.0]),
                                      torch.tensor([-5.0]), beta=0.5)
    assert abs(losses.item() - math.log(1 + math.exp(-1.5))) < 1e-6
    assert abs(rc.item() - 1.0) < 1e-6 and abs(rr.item() + 0.5) < 1e-6
    # the gradient raises the chosen and lowers the rejected log-prob
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    TI.step_dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)[0].sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_packed_loss_equals_naive_per_pair(tiny):  # noqa: F811
    model, tok = tiny
    rec = {"id": "t0", "conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                         for m in CONV]}
    steps = [{"traj_id": "t0", "step": 0, "agent": [{"text": "Action: search[blue]", "match": False},
                                                    {"text": "Action: search[red shoes]", "match": True}]},
             {"traj_id": "t0", "step": 2, "agent": [{"text": "Action: click[8]", "match": False},
                                                    {"text": "Action: click[8]", "match": False},
                                                    {"text": "Thought: hm\nAction: click[< Prev]", "match": False}]}]
    jobs = TI.build_jobs(tok, [rec], steps, model.args.max_seq_len)
    assert len(jobs) == 1 and len(jobs[0][3]) == 3  # matches dropped, duplicates counted once
    full_ids, full_spans = AG.turn_spans(tok, AG.to_messages(rec))
    cut = full_spans[2][1] - 1  # a context that ends inside step 2's action: step 2 is past the cut
    (c_ids, c_spans, c_cands, c_pairs), = TI.build_jobs(tok, [rec], steps, cut)
    assert c_spans == full_spans[:2] and c_ids == full_ids[:full_spans[2][0]]  # the cut-through action left out
    assert c_pairs == [(0, 0)] and TI.build_jobs(tok, [rec], steps, full_spans[0][1] - 1) == []  # no step left
    ids, spans, cands, pairs = jobs[0]
    ref_model = M.Transformer.from_args(model.args, seed=7).eval()  # any other policy as the reference
    with torch.no_grad():
        ref = S.score_packed(ref_model, [S.pack_row(ids, spans, cands)])
        pi = S.score_packed(model, [S.pack_row(ids, spans, cands)])
        packed = TI.step_dpo_loss(*TI.pair_logps(pi, jobs)[:2], *TI.pair_logps(ref, jobs)[:2], 0.1)[0]
        naive = []
        for t, j in pairs:
            (pe, pc), (re, rc) = S.score_naive(model, ids, spans, [cands[j]]), S.score_naive(ref_model, ids, spans, [cands[j]])
            naive.append(TI.step_dpo_loss(pe[t:t + 1], pc, re[t:t + 1], rc, 0.1)[0])
    assert torch.allclose(packed, torch.cat(naive), atol=1e-5)
    assert (packed != math.log(2)).all()


def test_trajectory_logps_forwards_length_groups(tiny, monkeypatch):  # noqa: F811
    """ETO's scores: each conversation's summed assistant log-probs, the long one not padding the short ones."""
    model, tok = tiny
    long = CONV[:1] + CONV[1:] * 6  # 43 turns, cut to the 1024-token context, ~9x the others (111)
    enc = [TI.encode_trajectory(tok, m, 1024) for m in (CONV[:2], long, CONV[:4])]
    with torch.no_grad():
        alone = [M.token_logprobs(model, *SFT.collate([e], tok.pad_id, "cpu")).sum() for e in enc]
        shapes = []
        real = M.token_logprobs
        monkeypatch.setattr(M, "token_logprobs", lambda m, x, tm, *a: shapes.append(tuple(x.shape)) or real(m, x, tm, *a))
        got = TI.trajectory_logps(model, enc, tok.pad_id)
    assert torch.allclose(got, torch.stack(alone), atol=1e-4) and (got < 0).all()
    lens = [len(e[0]) for e in enc]
    assert sorted(shapes) == sorted([(1, lens[1]), (2, max(lens[0], lens[2]))])  # the long row alone


def test_eto_update_one_pair_at_a_time_takes_the_batched_step(tiny):  # noqa: F811
    """ETO's update backpropagates each pair alone (memory for one failed trajectory); the gradients
    add up to those of the batch's mean loss, so the step (and the logged metrics) are the batched ones."""
    model, tok = tiny
    convs = [CONV[:2], CONV[:4], CONV, CONV[:1] + CONV[1:] * 3, CONV[:1] + CONV[3:]]
    enc = [TI.encode_trajectory(tok, m, 1024) for m in convs]
    jobs = [(enc[0], enc[3]), (enc[1], enc[4]), (enc[2], enc[3]), (enc[0], enc[2])]
    ref_model = M.Transformer.from_args(model.args, seed=7).eval()  # any other policy as the reference
    with torch.no_grad():
        ref = list(TI.trajectory_logps(ref_model, [m for j in jobs for m in j], tok.pad_id).view(-1, 2).unbind(0))
    data = {"jobs": jobs, "ref": ref, "pad_id": tok.pad_id}
    cfg = TI.ImplicitConfig(level="trajectory", traj_batch=3, grad_clip=1e9, sft_coef=0.5, beta=0.5, amp="none")
    method = TI.TrajectoryDPO(cfg)
    idx = method.batch(len(jobs), 0, 0)
    assert len(idx) == 3
    start = {k: v.clone() for k, v in model.state_dict().items()}
    a = M.Transformer.from_args(model.args, seed=0)
    a.load_state_dict(start)
    got = method.update(a, torch.optim.SGD(a.parameters(), lr=1.0), data, 0, 0)
    b = M.Transformer.from_args(model.args, seed=0)
    b.load_state_dict(start)
    lp = TI.trajectory_logps(b, [m for i in idx for m in jobs[i]], tok.pad_id).view(-1, 2)
    r = torch.stack([ref[i] for i in idx])
    losses = TI.step_dpo_loss(lp[:, 0], lp[:, 1], r[:, 0], r[:, 1], 0.5)[0]
    (losses.mean() - 0.5 * lp[:, 0].mean()).backward()
    grads = {n: p.grad for n, p in b.named_parameters()}
    assert abs(got["losses/dpo"] - losses.mean().item()) < 1e-5 and got["pairs"] == 3
    assert got["losses/dpo"] != math.log(2) and abs(got["logps/expert"] - lp[:, 0].mean().item()) < 1e-3
    for n, p in a.named_parameters():  # SGD at lr 1: the parameter moved by exactly its gradient
        assert torch.allclose(start[n] - p.detach(), grads[n], atol=1e-6, rtol=1e-4), n
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3


MICRO = ["--env", "hotpotqa", "--n_train", "6", "--n_dev", "2", "--n_test", "2", "--sft_epochs", "1",
         "--pretrain_epochs", "1", "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "300",
         "--max_new_tokens", "8", "--batch_size", "3", "--k", "2", "--iterations", "2", "--eval_batch", "3"]


def _run(args, timeout=300, script="train_implicit.py"):
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _metrics(run):
    return [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]


def test_train_implicit_smoke(tmp_path):
    out = str(tmp_path / "run")
    stdout = _run([*MICRO, "--traj_batch", "3", "--out", out])
    assert "| StepAgent-Implicit iter 2 |" in stdout and "| novice (SFT) |" in stdout
    updates = [x for x in _metrics(os.path.join(out, "implicit")) if "losses/dpo" in x]
    assert updates and all(x["pairs"] > 0 for x in updates)
    assert abs(updates[0]["losses/dpo"] - math.log(2)) < 1e-3  # first update: pi == pi_ref
    assert os.path.exists(os.path.join(out, "implicit", "iter2", "model.safetensors"))
    iters = [x for x in _metrics(os.path.join(out, "implicit")) if x.get("event") == "iteration"]
    assert [x["iteration"] for x in iters] == [1, 2]
    # each iteration's line times its collect and its reflection, over all of its updates
    assert [x["timed_updates"] for x in iters] == [sum(u["iteration"] == i for u in updates) for i in (1, 2)]
    assert all(x["collect_seconds"] > 0 and x["reflect_seconds"] > 0 for x in iters)
    # a finished run rerun does nothing new and prints the same table
    n_lines = len(_metrics(os.path.join(out, "implicit")))
    assert _run([*MICRO, "--traj_batch", "3", "--out", out]).split("\n| model")[1] == stdout.split("\n| model")[1]
    assert len(_metrics(os.path.join(out, "implicit"))) == n_lines
    # a deleted evaluation of a saved iteration is re-run and logged as a reevaluation, not an iteration
    shutil.rmtree(os.path.join(out, "implicit", "eval-iter1-test"))
    _run([*MICRO, "--traj_batch", "3", "--out", out])
    lines = _metrics(os.path.join(out, "implicit"))
    summary = json.load(open(os.path.join(out, "implicit", "eval-iter1-test", "summary.json")))
    assert [x["iteration"] for x in lines if x.get("event") == "iteration"] == [1, 2]
    assert [(x["iteration"], x["test_success"]) for x in lines[n_lines:]] == [(1, summary["success_rate"])]
    assert lines[n_lines]["event"] == "reevaluation"
    # a run killed after saving iter2/ and before logging its iteration line logs it on the rerun, the same line
    (gone,) = [x for x in lines if x.get("event") == "iteration" and x["iteration"] == 2]
    with open(os.path.join(out, "implicit", "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines if x is not gone)
    _run([*MICRO, "--traj_batch", "3", "--out", out])
    again = _metrics(os.path.join(out, "implicit"))
    assert again[:-1] == [x for x in lines if x is not gone] and again[-1] == gone
    # another option in the same folder is refused, not silently mixed in
    r = subprocess.run([sys.executable, "train_implicit.py", *MICRO, "--traj_batch", "3", "--beta", "0.5", "--out", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--beta 0.1" in r.stderr and "Traceback" not in r.stderr


def test_a_run_resumed_elsewhere_keeps_both_machines(tmp_path):
    """last/trainer_state.json lists every machine a run computed on, through the updates after a
    resume (another thread count stands in for another machine: `machine()` records it)."""
    out = str(tmp_path / "run")
    for iterations, threads in (("1", "1"), ("2", "2")):
        r = subprocess.run([sys.executable, "train_implicit.py", *MICRO, "--traj_batch", "3", "--iterations", iterations,
                            "--out", out], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": threads})
        assert r.returncode == 0, r.stderr[-3000:]
    state = json.load(open(os.path.join(out, "implicit", "last", "trainer_state.json")))
    assert state["iteration"] == 1 and state["done"] and [m["threads"] for m in state["machines"]] == [1, 2]


def test_eto_baseline_smoke(tmp_path):
    out = str(tmp_path / "run")
    # a first attempt killed before its first save (and before collect-1.pt) left its explore line and a
    # step's line: the fresh start drops both
    os.makedirs(os.path.join(out, "eto"))
    with open(os.path.join(out, "eto", "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"event": "explore", "iteration": 1, "tasks": 6, "failed": 99, "success": 0.0}) + "\n")
        f.write(json.dumps({"step": 1, "iteration": 1, "losses/dpo": 9.0}) + "\n")
    stdout = _run([*MICRO, "--level", "trajectory", "--traj_batch", "2", "--out", out])
    assert "| ETO iter 2 |" in stdout
    lines = _metrics(os.path.join(out, "eto"))
    explore = [x for x in lines if x.get("event") == "explore"]
    assert len(explore) == 2 and all(x["tasks"] == 6 for x in explore)
    updates = [x for x in lines if "losses/dpo" in x]
    assert [x["step"] for x in updates] == list(range(1, len(updates) + 1))  # each step once, the stale line gone
    assert sum(x["pairs"] for x in updates if x["iteration"] == 1) == explore[0]["failed"] > 0
    assert abs(updates[0]["losses/dpo"] - math.log(2)) < 1e-3


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    """kill -9 in the middle of iteration 2's reflection, rerun: same metrics, table and weights."""
    from safetensors.torch import load_file

    args = [*MICRO, "--traj_batch", "1", "--dpo_epochs", "2", "--save_every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([*args, "--out", a])
    p = subprocess.Popen([sys.executable, "train_implicit.py", *args, "--out", b],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(b, "implicit", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics) and sum('"iteration": 2, "losses/dpo"' in x for x in open(metrics)) >= 3:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(b, "implicit", "iter2"))
    stdout = _run([*args, "--out", b])
    assert "resuming" in stdout and "iteration 2, after update" in stdout
    ma, mb = _metrics(os.path.join(a, "implicit")), _metrics(os.path.join(b, "implicit"))
    steps_a, steps_b = [x for x in ma if "losses/dpo" in x], [x for x in mb if "losses/dpo" in x]
    assert [x["step"] for x in steps_a] == [x["step"] for x in steps_b] == list(range(1, len(steps_a) + 1))
    assert [x["event"] for x in ma if "event" in x] == [x["event"] for x in mb if "event" in x]  # each once
    for x, y in zip(steps_a, steps_b):
        assert abs(x["losses/dpo"] - y["losses/dpo"]) < 1e-6 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
    # iteration 2's line times its whole collect and reflection, the part before the kill included
    (ia,), (ib,) = ([x for x in m if x.get("event") == "iteration" and x["iteration"] == 2] for m in (ma, mb))
    assert ib["timed_updates"] == ia["timed_updates"] == sum(x["iteration"] == 2 for x in steps_a)
    assert ib["collect_seconds"] > 0 and ib["reflect_seconds"] > 0
    sa, sb = (json.load(open(os.path.join(d, "implicit", "eval-iter2-test", "summary.json"))) for d in (a, b))
    assert {k: v for k, v in sa.items() if k != "seconds"} == {k: v for k, v in sb.items() if k != "seconds"}
    wa, wb = (load_file(os.path.join(d, "implicit", "iter2", "model.safetensors")) for d in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert not all(torch.equal(wa[k], v) for k, v in load_file(os.path.join(a, "sft", "model.safetensors")).items())
