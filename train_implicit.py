"""StepAgent-Implicit: reflection by implicit-reward RL, i.e. step-level DPO (paper §3.3, first strategy).

For every expert state s_t that inspection found the novice deviating from, the expert's action a_t
is preferred over each practised action b that did not match it:

    L = -log sigmoid( beta * [log pi(a_t|s_t) - log pi_ref(a_t|s_t)] - beta * [log pi(b|s_t) - log pi_ref(b|s_t)] )

(Rafailov et al. 2023, eq. 7, applied per step instead of per trajectory). The implicit step reward
is r(s, a) = beta * log(pi(a|s) / pi_ref(a|s)); we log it for chosen and rejected actions. pi_ref is
the policy at the start of each iteration, so its log-probs are computed once, before the first
update, and no second model is kept. Every trajectory's pairs are scored in one packed forward
(stepagent.score_packed, DESIGN §4).

Departures / choices: duplicate practices of one state count once; an optional NLL term on the
expert actions (`--sft_coef`, default 0) keeps their likelihood from falling; beta 0.1 as in ETO.

    python train_implicit.py --iterations 2 --k 4
"""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import stepagent as S


@dataclass
class ImplicitConfig(S.Config):
    out: str = "runs/webshop-tiny"
    beta: float = 0.1  # DPO temperature (ETO's default)
    dpo_lr: float = 3e-4  # tiny preset; use ~1e-6 for pretrained checkpoints
    dpo_epochs: int = 1  # passes over one iteration's pairs
    iterations: int = 2  # inspection -> reflection -> evaluation rounds
    traj_batch: int = 8  # expert trajectories (all their pairs) per optimiser step
    sft_coef: float = 0.0  # weight of the NLL term on the expert actions


def step_dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float):
    """DPO loss per (state, expert action, agent action) pair.

    All inputs (P,): summed action log-probs under the policy and the reference. Returns
    (losses (P,), chosen_rewards (P,), rejected_rewards (P,)), the rewards being the implicit
    beta * log(pi / pi_ref), detached. Equal log-ratios give log 2.
    """
    chosen_ratio = pi_chosen - ref_chosen
    rejected_ratio = pi_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def build_jobs(tok: M.Tokenizer, records: list[dict], steps: list[dict]):
    """Per expert trajectory with at least one unmatched practice: (ids, spans, candidates, pairs),
    candidates = (step, token ids) of the unique unmatched practices, pairs = (step, candidate index)."""
    by_traj: dict[str, dict[int, set[str]]] = {}
    for s in steps:
        bad = {a["text"] for a in s["agent"] if not a["match"] and a["text"]}
        if bad:
            by_traj.setdefault(s["traj_id"], {})[s["step"]] = bad
    jobs = []
    for rec in records:
        per_step = by_traj.get(rec["id"])
        if not per_step:
            continue
        ids, spans = S.turn_spans(tok, S.to_messages(rec))
        cands, pairs = [], []
        for t in sorted(per_step):
            for text in sorted(per_step[t]):
                pairs.append((t, len(cands)))
                cands.append((t, S.turn_ids(tok, text)))
        jobs.append((ids, spans, cands, pairs))
    return jobs


def pair_logps(scores, jobs):
    """(chosen (P,), rejected (P,), expert (E,)) gathered from score_packed's per-row output."""
    ch, rj, ex = [], [], []
    for (e, c), (_, _, _, pairs) in zip(scores, jobs):
        ch += [e[t] for t, _ in pairs]
        rj += [c[j] for _, j in pairs]
        ex.append(e)
    return torch.stack(ch), torch.stack(rj), torch.cat(ex)


def reflect(model, jobs, cfg: ImplicitConfig, opt, log: S.Log, iteration: int, step: int) -> int:
    """One iteration's step-DPO updates over all pairs; returns the global step count."""
    with torch.no_grad(), S.autocast(model.device, cfg.amp):  # pi_ref = the policy now, before any update
        ref = [S.score_packed(model, [S.pack_row(*j[:3])])[0] for j in tqdm(jobs, desc="reference", leave=False)]
    n_batches = math.ceil(len(jobs) / cfg.traj_batch)
    model.train()
    for epoch in range(cfg.dpo_epochs):
        order = list(range(len(jobs)))
        random.Random(cfg.seed * 1000 + iteration * 10 + epoch).shuffle(order)
        for b in tqdm(range(n_batches), desc=f"reflect {iteration + 1}", leave=False, dynamic_ncols=True):
            idx = order[b * cfg.traj_batch:(b + 1) * cfg.traj_batch]
            batch = [jobs[i] for i in idx]
            with S.autocast(model.device, cfg.amp):
                scores = S.score_packed(model, [S.pack_row(*j[:3]) for j in batch])
            pi_c, pi_r, pi_e = pair_logps(scores, batch)
            ref_c, ref_r, _ = (x.float() for x in pair_logps([ref[i] for i in idx], batch))
            losses, r_c, r_r = step_dpo_loss(pi_c.float(), pi_r.float(), ref_c, ref_r, cfg.beta)
            loss = losses.mean() - cfg.sft_coef * pi_e.float().mean()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.write(**{
                "step": step, "iteration": iteration + 1, "losses/dpo": losses.mean().item(),
                "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
                "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracy": (r_c > r_r).float().mean().item(),
                "logps/expert": pi_e.mean().item(), "pairs": len(losses), "grad_norm": gn.item()})
    return step


def main(argv: list[str] | None = None) -> None:
    cfg = S.parse_config(ImplicitConfig, sys.argv[1:] if argv is None else argv)
    S.seed_all(cfg.seed)
    novice = S.train_sft(cfg)
    model, tok = S.load(novice, cfg)
    records = S.expert_data(cfg)[: cfg.n_inspect or None]
    run = os.path.join(cfg.out, "implicit")
    log = S.Log(os.path.join(run, "metrics.jsonl"))
    table = [("novice (SFT)", S.evaluate(model, tok, cfg, "test", cfg.n_test, os.path.join(run, "eval-novice")))]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dpo_lr, betas=(0.9, 0.95))
    step = 0
    for it in range(cfg.iterations):
        g = torch.Generator(device=model.device).manual_seed(cfg.seed * 1000 + it)
        steps = S.inspect(model, tok, records, cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, g,
                          os.path.join(run, f"inspect-{it + 1}.jsonl"), log=log)
        jobs = build_jobs(tok, records, steps)
        step = reflect(model, jobs, cfg, opt, log, it, step)
        dev = S.evaluate(model, tok, cfg, "dev", cfg.n_dev, desc=f"iter {it + 1} dev")
        test = S.evaluate(model, tok, cfg, "test", cfg.n_test, os.path.join(run, f"eval-iter{it + 1}"))
        log(event="iteration", iteration=it + 1, step=step, pairs=sum(len(j[3]) for j in jobs),
            dev_success=dev["success_rate"], test_success=test["success_rate"], test_reward=test["avg_reward"])
        M.save_model(model, tok, os.path.join(run, f"iter{it + 1}"))
        table.append((f"StepAgent-Implicit iter {it + 1}", test))
    print(f"\n{cfg.env}, seed {cfg.seed}, {cfg.n_test} test tasks")
    print("| model | success | avg reward |\n| --- | --- | --- |")
    for name, s in table:
        print(f"| {name} | {s['success_rate']:.3f} | {s['avg_reward']:.3f} |")
    print(f"checkpoints and evaluations in {run}")


if __name__ == "__main__":
    main()
