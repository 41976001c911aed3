"""StepAgent-Implicit: reflection by implicit-reward RL, i.e. step-level DPO (paper §3.3, first
strategy), and the trajectory-level ETO baseline (`--level trajectory`).

For every expert state s_t where inspection found the agent deviating, the expert's action a_t is
preferred over each practised action b that did not match it:

    L = -log sigmoid( beta * [log pi(a_t|s_t) - log pi_ref(a_t|s_t)] - beta * [log pi(b|s_t) - log pi_ref(b|s_t)] )

(Rafailov et al. 2023, eq. 7, applied per step instead of per trajectory). The implicit step reward
is r(s, a) = beta * log(pi(a|s) / pi_ref(a|s)); we log it for chosen and rejected actions. pi_ref is
the policy at the start of each iteration: its log-probs are computed once, when the iteration's
data is collected, so no second model is kept. Every trajectory's pairs are scored in one packed
forward (stepagent.score_packed).

ETO (Song et al. 2024), the sparse counterpart: the agent plays each train task once with sampling;
every failed trajectory is the rejected side and the task's expert trajectory the chosen side of
the same DPO loss, summed over all assistant tokens of each trajectory.

Departures / choices: duplicate practices of one state count once; an optional NLL term on the
expert actions (`--sft_coef`, default 0 = pure step DPO; IPR adds such an SFT loss) keeps their
likelihood from falling with the rejected ones; the default lr 1e-4 (3e-4 drove the expert actions'
log-probs down: EXPERIMENTS.md) and beta 0.1 as in ETO; a trajectory longer than the context is
scored on its first max_seq_len tokens.

    python train_implicit.py                          # the main job: tiny preset, webshop, 2 iterations
    python train_implicit.py --level trajectory       # the ETO baseline, same budget
    python train_implicit.py --iterations 3 --k 5 --beta 0.2 --out runs/webshop-b02
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import agent as AG
import envs
import model as M
import parallel as P
import runtime as RT
import sft as SFT
import stepagent as S
import tokenizer as T
from runtime import opt


@dataclass
class ImplicitConfig(S.Config):
    level: str = opt("step", "step (StepAgent-Implicit) | trajectory (ETO)")
    CHOICES = {"level": ("step", "trajectory")}  # check_config's (a ClassVar, as S.Config's)
    beta: float = opt(0.1, "DPO temperature (ETO's default)")
    dpo_lr: float = opt(1e-4, "tiny preset; use ~1e-6 for pretrained checkpoints")
    dpo_epochs: int = opt(1, "passes over one iteration's pairs")
    sft_coef: float = opt(0.0, "weight of the NLL term on the expert actions (0: pure step DPO; see the docstring)")

    def check(self) -> None:
        super().check()
        RT.positive(self, "beta", "dpo_lr")
        RT.at_least_1(self, "dpo_epochs")
        RT.at_least(self, 0, "sft_coef")


def step_dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float):
    """DPO loss (Rafailov et al. 2023, eq. 7) per (state, expert action, agent action) pair.

    All inputs (P,): summed action log-probs under the policy and the reference. Returns
    (losses (P,), chosen_rewards (P,), rejected_rewards (P,)), the rewards being the implicit
    beta * log(pi / pi_ref), detached. Equal log-ratios give log 2.
    """
    chosen_ratio = pi_chosen - ref_chosen
    rejected_ratio = pi_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def build_jobs(tok: T.Tokenizer, records: list[dict], steps: list[dict], max_len: int):
    """Per expert trajectory with at least one unmatched practice: (ids, spans, candidates, pairs),
    candidates = (step, token ids) of the unique unmatched practices, pairs = (step, candidate index);
    a trajectory longer than the context max_len is cut to it (turn_spans), with its steps past the cut."""
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
        ids, spans = AG.turn_spans(tok, AG.to_messages(rec), max_len)
        cands, pairs = [], []
        for t in sorted(t for t in per_step if t < len(spans)):
            for text in sorted(per_step[t]):
                pairs.append((t, len(cands)))
                cands.append((t, AG.turn_ids(tok, text)))
        if pairs:
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


def pair_logps_naive(model, jobs):
    """The reference for packed scoring: two forwards per pair, state + expert action and state +
    agent action, as a per-pair DPO implementation would do. Returns (chosen, rejected)."""
    def one(prefix, action):
        x = torch.tensor(prefix + action, device=model.device)[None]
        tm = torch.zeros_like(x, dtype=torch.bool)
        tm[0, len(prefix):] = True
        return M.token_logprobs(model, x, tm).sum()
    ch, rj = [], []
    for ids, spans, cands, pairs in jobs:
        for t, j in pairs:
            s, e = spans[t]
            ch.append(one(ids[:s], ids[s:e]))
            rj.append(one(ids[:s], cands[j][1]))
    return torch.stack(ch), torch.stack(rj)


def dpo_metrics(losses, r_c, r_r, logps_expert, w: float = 1.0, w_expert: float = 1.0) -> dict:
    """An update's means over its global batch: under torchrun each rank's means times its shares (w
    of the pairs, w_expert of the expert actions), summed over the ranks; the means themselves in one process."""
    return P.all_sum({"losses/dpo": losses.mean().item() * w, "rewards/chosen": r_c.mean().item() * w,
                      "rewards/rejected": r_r.mean().item() * w, "rewards/margins": (r_c - r_r).mean().item() * w,
                      "rewards/accuracy": (r_c > r_r).float().mean().item() * w, "pairs": len(losses) * (w > 0),
                      "logps/expert": logps_expert.mean().item() * w_expert})


class StepDPO(S.Method):
    """StepAgent-Implicit: inspection, then step-level DPO on (expert action, unmatched practice)."""

    name = "implicit"

    def __init__(self, cfg: ImplicitConfig):
        super().__init__(cfg)
        self.lr = cfg.dpo_lr

    def collect(self, model, tok, it, g, partial=None):
        c = self.cfg
        recs = self.records(it)
        steps = S.inspect(model, tok, recs, c.k, c.temperature, c.top_p, c.max_new_tokens, g,
                          f"{c.out}/{self.name}/inspect-{it + 1}.jsonl",
                          log=RT.Log(f"{c.out}/{self.name}/metrics.jsonl"), partial=partial)
        jobs = build_jobs(tok, recs, steps, model.args.max_seq_len)
        with torch.no_grad(), RT.autocast(model.device, c.amp):  # pi_ref: the policy as the iteration starts
            ref = RT.kept_map(lambda j: tuple(x.float().cpu() for x in S.score_packed(model, [S.pack_row(*j[:3])])[0]),
                             jobs, partial, "reference log-probs")
        return {"jobs": jobs, "ref": ref}

    def n_updates(self, data) -> int:
        return self.cfg.dpo_epochs * math.ceil(len(data["jobs"]) / self.cfg.traj_batch)

    def update(self, model, opt, data, b, it) -> dict:
        c = self.cfg
        idx, live = P.shard_batch(self.batch(len(data["jobs"]), b, it))  # this rank's slice of the global batch
        jobs = [data["jobs"][i] for i in idx]
        with RT.autocast(model.device, c.amp):
            scores = S.score_packed(model, [S.pack_row(*j[:3]) for j in jobs])
        pi_c, pi_r, pi_e = pair_logps(scores, jobs)
        ref_c, ref_r, _ = (x.to(model.device) for x in pair_logps([data["ref"][i] for i in idx], jobs))
        losses, r_c, r_r = step_dpo_loss(pi_c.float(), pi_r.float(), ref_c, ref_r, c.beta)
        w, w_e = P.shares(len(losses) * live, len(pi_e) * live)  # of the global batch's pairs, expert actions
        loss = losses.mean() * w - c.sft_coef * pi_e.float().mean() * w_e
        return {**dpo_metrics(losses, r_c, r_r, pi_e, w, w_e), "grad_norm": SFT.optim_step(model, opt, c.grad_clip, loss).item()}


def encode_trajectory(tok, msgs: list[dict], max_len: int):
    """(ids, assistant mask) of a whole conversation, cut to the context."""
    ids, mask = tok.encode_chat(msgs)
    return ids[:max_len], mask[:max_len]


def trajectory_logps(model, encoded: list[tuple], pad_id: int) -> torch.Tensor:
    """Summed log-probs of all assistant tokens of each encoded conversation (B,): one right-padded
    forward per `S.length_groups` group, as score_packed, so an 8,000-token failed trajectory does not
    pad a 500-token expert one to its length."""
    def forward(rows):
        x, tm = SFT.collate(rows, pad_id, model.device)
        return M.token_logprobs(model, x, tm).sum(-1).unbind(0)
    return torch.stack(S.by_length(model, encoded, forward))


class TrajectoryDPO(StepDPO):
    """ETO: DPO between the expert trajectory and the agent's failed trajectory of the same task."""

    name = "eto"

    def collect(self, model, tok, it, g, partial=None):
        c = self.cfg
        recs = self.records(it)
        by_id = {t.id: t for t in envs.make(c.env, "train", n=c.n_train, seed=c.seed)}
        played = AG.rollout(model, tok, c.env, [by_id[r["id"]] for r in recs], c.temperature, c.top_p,
                           c.max_new_tokens, c.eval_batch, generator=g, desc=f"explore {it + 1}", partial=partial)
        L = model.args.max_seq_len
        pairs = [(encode_trajectory(tok, AG.to_messages(e), L), encode_trajectory(tok, AG.to_messages(p), L))
                 for e, p in zip(recs, played) if p["reward"] < e["reward"]]
        RT.Log(f"{c.out}/{self.name}/metrics.jsonl")(
            event="explore", iteration=it + 1, tasks=len(played), failed=len(pairs),
            success=sum(p["success"] for p in played) / max(1, len(played)))
        chunks = [pairs[lo:lo + c.traj_batch] for lo in range(0, len(pairs), c.traj_batch)]  # each rank its share
        with torch.no_grad(), RT.autocast(model.device, c.amp):
            ref = RT.kept_map(lambda chunk: trajectory_logps(model, [p for pr in chunk for p in pr], tok.pad_id)
                             .float().cpu().view(-1, 2).unbind(0), chunks, partial, "reference log-probs")
        return {"jobs": pairs, "ref": [r for chunk in ref for r in chunk], "pad_id": tok.pad_id}

    def update(self, model, opt, data, b, it) -> dict:
        """The loss is a mean of per-pair terms, so each pair's forward and backward runs alone and the
        gradients add up to the batch's: activations for one failed trajectory (thousands of tokens
        on the real simulators), not traj_batch of them. Under --fsdp one forward for all, as every
        rank must make the same forwards."""
        c = self.cfg
        idx, live = P.shard_batch(self.batch(len(data["jobs"]), b, it))  # this rank's slice of the global batch
        w, = P.shares(len(idx) * live)  # of the global batch's pairs (one expert trajectory each)
        ref = torch.stack([data["ref"][i] for i in idx]).to(model.device)
        out = []
        for part in P.one_at_a_time(model, range(len(idx))):  # positions in idx
            with RT.autocast(model.device, c.amp):
                jobs = [m for k in part for m in data["jobs"][idx[k]]]
                lp = trajectory_logps(model, jobs, data["pad_id"]).float().view(-1, 2)
            losses, r_c, r_r = step_dpo_loss(lp[:, 0], lp[:, 1], ref[part, 0], ref[part, 1], c.beta)
            ((losses.sum() - c.sft_coef * lp[:, 0].sum()) * w / len(idx)).backward()
            out.append((losses.detach(), r_c, r_r, lp[:, 0].detach()))
        losses, r_c, r_r, chosen = (torch.cat(t) for t in zip(*out))
        return {**dpo_metrics(losses, r_c, r_r, chosen, w, w), "grad_norm": SFT.optim_step(model, opt, c.grad_clip).item()}


class SFTContinued(S.Method):
    """The SFT baseline at equal budget: the novice's SFT loss on traj_batch expert trajectories per
    update, as many updates as StepAgent-Implicit may take per iteration (results.py runs it; see its docstring)."""

    name = "sft-continued"

    def __init__(self, cfg: ImplicitConfig):
        super().__init__(cfg)
        self.lr = cfg.dpo_lr

    def collect(self, model, tok, it, g, partial=None):
        recs = self.records(it)
        return {"data": SFT.encode_records(tok, recs, model.args.max_seq_len), "n_records": len(recs), "pad_id": tok.pad_id}

    def n_updates(self, data) -> int:
        return self.cfg.dpo_epochs * math.ceil(data["n_records"] / self.cfg.traj_batch)

    def update(self, model, opt, data, b, it) -> dict:
        idx = self.batch(len(data["data"]), b, it)
        x, tm = SFT.collate([data["data"][i] for i in idx], data["pad_id"], model.device)
        with RT.autocast(model.device, self.cfg.amp):
            loss = SFT.sft_loss(model, x, tm)
        return {"losses/sft": loss.item(), "trajectories": len(idx), "grad_norm": SFT.optim_step(model, opt, self.cfg.grad_clip, loss).item()}


def main(argv: list[str] | None = None) -> None:
    cfg = RT.parse_config(ImplicitConfig, sys.argv[1:] if argv is None else argv)
    P.dist_setup(cfg.device)
    method = StepDPO(cfg) if cfg.level == "step" else TrajectoryDPO(cfg)
    S.train_iterations(cfg, method, "StepAgent-Implicit" if cfg.level == "step" else "ETO")


if __name__ == "__main__":
    main()
    P.dist_end()  # torchrun: leave together (a no-op in one process)
