"""train_implicit.py: the step-DPO loss on hand-computed numbers, packed == naive, a smoke run."""
import json
import math
import os
import subprocess
import sys

import torch

import model as M
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
    jobs = TI.build_jobs(tok, [rec], steps)
    assert len(jobs) == 1 and len(jobs[0][3]) == 3  # matches dropped, duplicates counted once
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


def test_train_implicit_smoke(tmp_path):
    out = str(tmp_path / "run")
    micro = ["--env", "hotpotqa", "--n_train", "6", "--n_dev", "2", "--n_test", "2", "--sft_epochs", "1",
             "--pretrain_epochs", "1", "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "300",
             "--max_new_tokens", "8", "--batch_size", "3", "--k", "2", "--iterations", "2", "--traj_batch", "3",
             "--out", out]
    r = subprocess.run([sys.executable, "train_implicit.py", *micro], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| StepAgent-Implicit iter 2 |" in r.stdout and "| novice (SFT) |" in r.stdout
    lines = [json.loads(x) for x in open(os.path.join(out, "implicit", "metrics.jsonl"))]
    updates = [x for x in lines if "losses/dpo" in x]
    assert updates and all(x["pairs"] > 0 for x in updates)
    assert abs(updates[0]["losses/dpo"] - math.log(2)) < 1e-3  # first update: pi == pi_ref
    assert os.path.exists(os.path.join(out, "implicit", "iter2", "model.safetensors"))
