"""StepAgent-Inverse: reflection by inverse RL, a discriminator's step reward and a policy gradient
(paper §3.3, second strategy), and the outcome-reward PPO baseline (`--reward outcome`).

Each iteration, after inspection (K practices b_t^1..K ~ pi(.|s_t) from every expert state):

  1. the discriminator D(s, a) = sigmoid(f(s, a)), a copy of the novice with a scalar head on the
     hidden state of the action's last (end-of-turn) token, takes `disc_epochs` passes of
         L_D = -E_expert[log D(s, a_t)] - E_agent[log(1 - D(s, b))]          (GAIL's discriminator)
     over the iteration's trajectories (every expert action against every practice);
  2. D, now fixed, rewards every practice: r(s, b) = log D - log(1 - D) = f(s, b) (`--reward logit`,
     AIRL's form), or log D (`logd`), or -log(1 - D) (`log1md`, GAIL's);
  3. the policy takes `pg_epochs` passes of PPO (Schulman et al. 2017, L^CLIP, eq. 7) on its own
     practices, the K practices of one state being each other's baseline, A_k = r_k - mean_j r_j
     (as GRPO / RLOO), with a KL penalty to pi_ref:
         L = -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A) + kl_coef * KL(pi || pi_ref),
     rho = pi(b|s) / pi_old(b|s) on the action's summed log-prob (per token with --token_level).
D persists across iterations (GAIL/AIRL's alternation: D steps, then policy steps, every
iteration); pi_old = pi_ref = the policy as the iteration starts, scored once when the data is
collected. Proxies of the occupancy measures meeting (the paper's propositions): the expert-action
match rate per step index (inspection's `event=inspect` line) and D's accuracy after its steps
(`event=disc`), per iteration.

Outcome-reward PPO, the sparse counterpart: K sampled rollouts of each train task from the start;
the environment's final reward R, centred over the task's K rollouts, is the advantage of every
action of the rollout; the same PPO loss and KL penalty, no discriminator.

Choices: L_D is the mean of the expert and the agent terms, each a mean (balanced, although there
are K practices per expert action); every practice is rewarded and in its group, duplicates and
matches included (the group needs K samples); D learns from every expert action against every
practice (GAIL), or with `--disc_data erred` only from the states where a practice missed the
expert's action, that action against the missed practices: under GAIL a matching practice is the
expert's action labelled both 1 and 0, which holds D at 1/2 where the match rate is high, and
keeping every expert action against only the misses lets D learn which steps are hard instead (the
misses sit at the search and the product choice), a reward the group baseline cancels; the KL is
Schulman's k3 estimator exp(d) - d - 1, d = log pi_ref - log pi, per sampled token, averaged over
tokens, as GRPO's (pi_ref sampled the tokens, so once pi moves it is off-policy and can spike where
pi makes a sampled token rare; `--kl_estimator k3_iw` weights it by pi / pi_ref: `kl_k3`);
`policy/entropy` is the exact entropy of the policy's next-token distribution, averaged over the
sampled tokens; updates are passes over the iteration's data, `traj_batch` expert trajectories
(with all their practices; outcome: rollouts) per update, each one's forward and backward alone, the
gradients summed (the losses are means over the batch's actions and tokens); log pi_old is scored per token by
`action_tokens` (score_packed's computation, not the sampler's log-probs). A rollout is scored as
re-tokenised text, it and an expert trajectory on their first max_seq_len tokens (the turns that end
within them: what the policy can have seen).

    python train_irl.py                             # StepAgent-Inverse: tiny preset, webshop, 2 iterations
    python train_irl.py --reward outcome            # the PPO baseline, same budget
    python train_irl.py --reward log1md --adv_std true --out runs/webshop-gail
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import agent as AG
import attention as AT
import envs
import parallel as P
import runtime as RT
import sft as SFT
import stepagent as S
from runtime import opt

REWARDS = ("logit", "logd", "log1md")
KL_ESTIMATORS = ("k3", "k3_iw")


@dataclass
class IRLConfig(S.Config):
    reward: str = opt("logit", "D's step reward: logit | logd | log1md (StepAgent-Inverse) | outcome (PPO baseline)")
    disc_lr: float = opt(1e-4, "tiny preset; use ~1e-6 for pretrained checkpoints")
    pg_lr: float = opt(1e-4, "the policy's; tiny preset")
    disc_epochs: int = opt(1, "discriminator passes over an iteration's trajectories")
    pg_epochs: int = opt(1, "policy passes over the same trajectories (PPO's epochs)")
    clip_eps: float = opt(0.2, "PPO's ratio clip")
    kl_coef: float = opt(0.05, "weight of KL(pi || pi_ref)")
    adv_std: bool = opt(False, "divide the group-centred advantages by the group's std")
    token_level: bool = opt(False, "PPO ratio per token (each token carries its action's advantage)")
    disc_data: str = opt("all", "D's examples: all (GAIL) | erred (missed states: expert action vs the misses)")
    kl_estimator: str = opt("k3", "per sampled token: k3 (Schulman's, as GRPO) | k3_iw (k3 weighted by pi / pi_ref)")
    CHOICES = {"reward": (*REWARDS, "outcome"), "disc_data": ("all", "erred"), "kl_estimator": KL_ESTIMATORS}

    def check(self) -> None:
        super().check()
        RT.at_least_1(self, "disc_epochs", "pg_epochs")
        RT.positive(self, "disc_lr", "pg_lr")
        RT.at_least(self, 0, "kl_coef")
        if not 0 < self.clip_eps < 1:
            sys.exit(f"error: --clip_eps {self.clip_eps}: must be in (0, 1)")


# ----------------------------------------------------------------------------- losses


def disc_loss(expert_logits: torch.Tensor, agent_logits: torch.Tensor, w_expert: float = 1.0,
              w_agent: float = 1.0) -> torch.Tensor:
    """L_D / 2 = mean(-log D(s, a_t)) / 2 + mean(-log(1 - D(s, b))) / 2 from D's logits, expert (E,)
    labelled 1 and agent (N,) labelled 0, each set averaged on its own. Zero logits give log 2.
    w_expert, w_agent: the two means' weights (under torchrun this rank's shares of the global counts)."""
    return 0.5 * (_bce_mean(expert_logits, 1.0) * w_expert + _bce_mean(agent_logits, 0.0) * w_agent)


def _bce_mean(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Mean binary cross-entropy of logits (N,) against one label; 0 for an empty set (a batch with no
    missed practice under --disc_data erred)."""
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label), reduction="sum")
    return bce / max(1, len(logits))


def disc_accuracy(expert_logits: torch.Tensor, agent_logits: torch.Tensor, w_expert: float = 1.0,
                  w_agent: float = 1.0) -> dict:
    return {"disc/acc_expert": (expert_logits > 0).float().sum().item() / max(1, len(expert_logits)) * w_expert,
            "disc/acc_agent": (agent_logits < 0).float().sum().item() / max(1, len(agent_logits)) * w_agent}


def step_reward(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """r(s, b) from D's logit f: log D - log(1 - D) = f (logit), log D (logd), -log(1 - D) (log1md)."""
    if kind == "logit":
        return logits
    if kind == "logd":
        return F.logsigmoid(logits)
    if kind == "log1md":
        return -F.logsigmoid(-logits)
    raise ValueError(f"--reward {kind!r}: choose {', '.join(REWARDS)} or outcome")


def group_advantages(rewards: torch.Tensor, std: bool) -> torch.Tensor:
    """A_k = r_k - mean_j r_j over each group's K samples, rewards (S, K) -> (S, K); with std, divided
    by the group's (unbiased) std, at least STD_FLOOR: K identical practices get D logits that differ
    in the 7th digit (each sits in other columns of the packed row), and dividing that float noise by
    its own std would hand them advantages of +-1."""
    a = rewards - rewards.mean(-1, keepdim=True)
    return a / rewards.std(-1, keepdim=True).clamp_min(STD_FLOOR) if std else a


STD_FLOOR = 1e-3


def pg_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated: -mean min(rho A, clip(rho, 1-eps,
    1+eps) A), rho = exp(logp_new - logp_old). All (N,): per action (summed log-probs) or per token.
    Returns (loss, clip fraction: the share of |rho - 1| > eps)."""
    ratio = (logp_new - logp_old).exp()
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    return loss, ((ratio - 1).abs() > clip_eps).float().mean()


def ppo_loss(lp: torch.Tensor, old: torch.Tensor, act: torch.Tensor, adv: torch.Tensor, clip_eps: float,
             token_level: bool):
    """pg_loss on token log-probs lp, old (N,) of actions act (N,) with advantages adv (A,): on each
    action's summed log-prob, or with token_level per token, each token weighted by its action's A."""
    if token_level:
        return pg_loss(lp, old, adv[act], clip_eps)
    n = len(adv)
    return pg_loss(lp.new_zeros(n).index_add(0, act, lp), old.new_zeros(n).index_add(0, act, old), adv, clip_eps)


def kl_k3(logp_new: torch.Tensor, logp_ref: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """KL(pi || pi_ref) from the sampled tokens (N,), which pi_ref sampled (pi_old = pi_ref), averaged:
    k3: exp(d) - d - 1, d = ref - new (Schulman's k3, >= 0). Unbiased while pi is the sampler (an
        iteration's first update); once pi has moved, its mean under pi_ref's samples is
        E[pi_ref / pi] - 1 - KL(pi_ref || pi), unbounded where pi has made a sampled token rare.
    k3_iw: r log r - r + 1, r = pi / pi_ref = exp(-d): k3 weighted by r, unbiased for KL(pi || pi_ref)
        under pi_ref's samples at every update, >= 0, and at most 1 where pi drops a token."""
    d = logp_ref - logp_new
    if kind == "k3":
        return (d.exp() - d - 1).mean()
    if kind == "k3_iw":
        r = (-d).exp()
        return (r * -d - r + 1).mean()
    raise ValueError(f"--kl_estimator {kind!r}: choose {', '.join(KL_ESTIMATORS)}")


# ----------------------------------------------------------------------------- packed forwards


def disc_logits(body, head: nn.Linear, rows: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """D's logits f(s, a) of every expert action and candidate of packed rows, one forward: the head on
    the backbone's hidden state at each action's last column (its end-of-turn token). Returns per row
    (expert (T,), candidates (C,)) in fp32, as score_packed does for log-probs."""
    def forward(rows):
        tokens, _, pos, mask, _ = AT.pad_rows(rows, body.device, width=AT.attn_width(body))
        h = body.hidden(tokens, pos, mask)  # (B, N, dim)
        out = []
        for i, (*_, ecols, ccols) in enumerate(rows):
            z = head(h[i, [e - 1 for _, e in ecols + ccols]]).float().squeeze(-1)  # (T + C,)
            out.append((z[:len(ecols)], z[len(ecols):]))
        return out
    return S.by_length(body, rows, forward)


def action_tokens(model, rows: list[tuple], own: bool):
    """The policy on the tokens of every candidate of packed rows (own=True: of the trajectory's own
    actions, pack_row's expert columns): log-probs (N,) with grad, the next-token distribution's
    entropy (N,) without, and each token's action index (N,), actions numbered across rows in order.
    score_packed's computation, kept per token."""
    def forward(rows):  # per row: (log-probs, entropies, action index within the row)
        tokens, _, pos, mask, src = AT.pad_rows(rows, model.device, width=AT.attn_width(model))
        act = torch.full(tokens.shape, -1, dtype=torch.long)
        for i, (*_, ecols, ccols) in enumerate(rows):
            for n, (a, b) in enumerate(ecols if own else ccols):
                act[i, a:b] = n
        per_row = (act >= 0).sum(1).tolist()  # action tokens per row: the row-major order below, split
        b_idx, t_idx = (act >= 0).nonzero(as_tuple=True)
        b_idx, t_idx, act = b_idx.to(model.device), t_idx.to(model.device), act.to(model.device)
        h = model.hidden(tokens, pos, mask)  # (B, N, dim)
        logp = model.lm_head(h[b_idx, src[b_idx, t_idx]]).float().log_softmax(-1)  # (N, V)
        lp = logp.gather(-1, tokens[b_idx, t_idx, None]).squeeze(-1)
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
        return list(zip(lp.split(per_row), ent.split(per_row), act[b_idx, t_idx].split(per_row)))
    parts = S.by_length(model, rows, forward)
    first = 0  # the row's first action's number across rows
    for i, (*_, ecols, ccols) in enumerate(rows):
        parts[i] = (*parts[i][:2], parts[i][2] + first)
        first += len(ecols if own else ccols)
    return tuple(torch.cat(x) for x in zip(*parts))


def build_discriminator(backbone, lr: float):
    """D = backbone + zero-initialised scalar head (D = 1/2 everywhere at first), and its AdamW."""
    head = nn.Linear(backbone.args.dim, 1, device=backbone.device, dtype=backbone.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    disc = nn.ModuleDict({"body": backbone, "head": head})
    return disc, torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


# ----------------------------------------------------------------------------- the methods


class Inverse(S.Method):
    """StepAgent-Inverse: inspection -> D steps -> PPO steps on the practices, rewarded by D."""

    name, own = "inverse", False  # own: the policy's actions are the rows' own turns (outcome), not candidates

    def __init__(self, cfg: IRLConfig):
        super().__init__(cfg)  # records(it), batch(): the same data window and batches as StepAgent-Implicit
        self.lr = cfg.pg_lr
        self.disc = self.disc_opt = self._log = None  # D: built from the novice when first needed
        self.steps = 0  # updates so far (= the trainer's step): a killed run's later event lines are dropped
        self.adv = None  # (iteration, advantages, rewards) per trajectory, kept through the policy steps

    def log(self, **kv):
        self._log = self._log or RT.Log(os.path.join(self.cfg.out, self.name, "metrics.jsonl"))
        self._log(**kv)

    def discriminator(self):
        if self.disc is None:
            novice, _ = SFT.load(os.path.join(self.cfg.out, "sft"), self.cfg)
            self.disc, self.disc_opt = build_discriminator(novice, self.cfg.disc_lr)
        return self.disc

    def state_dict(self) -> dict:
        d = {"steps": self.steps}
        if self.disc is not None:
            d.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        return d

    def load_state_dict(self, d: dict) -> None:
        self.steps = d["steps"]
        if "disc" in d:
            self.discriminator().load_state_dict(d["disc"])
            self.disc_opt.load_state_dict(d["disc_opt"])

    def collect(self, model, tok, it, g, partial=None):
        c = self.cfg
        recs = self.records(it)
        steps = S.inspect(model, tok, recs, c.k, c.temperature, c.top_p, c.max_new_tokens, g,
                          os.path.join(c.out, self.name, f"inspect-{it + 1}.jsonl"),
                          log=lambda **kv: self.log(**kv, iteration=it + 1), partial=partial)
        by_traj: dict[str, list[dict]] = {}
        for s in steps:
            by_traj.setdefault(s["traj_id"], []).append(s)
        jobs = []  # (ids, spans, candidates): every practice of every inspected state, K per state in order
        miss, erred = [], []  # per job: (C,) the practices unlike the expert's action; (T,) the states with one
        for rec in recs:
            if rec["id"] in by_traj:  # cut to the context, with the states past the cut (turn_spans)
                ids, spans = AG.turn_spans(tok, AG.to_messages(rec), model.args.max_seq_len)
                rec_steps = [s for s in by_traj[rec["id"]] if s["step"] < len(spans)]
                if not rec_steps:
                    continue
                jobs.append((ids, spans, [(s["step"], AG.turn_ids(tok, a["text"]))
                                          for s in rec_steps for a in s["agent"]]))
                miss.append(torch.tensor([not a["match"] for s in rec_steps for a in s["agent"]]))
                erred.append(torch.zeros(len(spans), dtype=torch.bool))
                erred[-1][[s["step"] for s in rec_steps if not all(a["match"] for a in s["agent"])]] = True
        return {"jobs": jobs, "old": self.old_logps(model, jobs, partial), "miss": miss, "erred": erred}

    def sides(self, data, idx, expert: torch.Tensor, agent: torch.Tensor):
        """D's examples among the logits of jobs idx, expert actions (T,) and practices (C,): all of them
        (GAIL), or with --disc_data erred only the states where a practice missed: their expert actions
        (label 1) and the missed practices (label 0)."""
        if self.cfg.disc_data == "all":
            return expert, agent
        erred = torch.cat([data["erred"][i] for i in idx]).to(expert.device)
        miss = torch.cat([data["miss"][i] for i in idx]).to(agent.device)
        return expert[erred], agent[miss]

    def old_logps(self, model, jobs, partial=None) -> list[torch.Tensor]:
        """log pi_old = log pi_ref per action token (n,), the policy as the iteration starts (kept
        beside the collect's partial file as it goes: RT.kept_map)."""
        with torch.no_grad(), RT.autocast(model.device, self.cfg.amp):
            return RT.kept_map(lambda j: action_tokens(model, [S.pack_row(*j)], self.own)[0].float().cpu(),
                              jobs, partial, "old log-probs")

    def n_disc(self, data) -> int:
        return self.cfg.disc_epochs * math.ceil(len(data["jobs"]) / self.cfg.traj_batch)

    def n_updates(self, data) -> int:  # disc_epochs passes for D, then pg_epochs for the policy
        return self.n_disc(data) + self.cfg.pg_epochs * math.ceil(len(data["jobs"]) / self.cfg.traj_batch)

    def update(self, model, opt, data, b, it) -> dict:
        """Update b < n_disc: a D step; then policy steps, with rewards from D as its steps left it
        (computed at the first policy step, or again after a resume: D does not change meanwhile)."""
        self.steps += 1
        nd = self.n_disc(data)
        if b < nd:
            return self.disc_step(data, *P.shard_batch(self.batch(len(data["jobs"]), b, it)))
        if self.adv is None or self.adv[0] != it:
            self.adv = (it, *self.advantages(data, it, announce=b == nd))
        return self.pg_step(model, opt, data, *P.shard_batch(self.batch(len(data["jobs"]), b - nd, it)))

    def disc_step(self, data, idx: list[int], live: bool = True) -> dict:
        """A D step on items idx, this rank's slice of the global batch (live False: a stand-in at weight 0)."""
        c, disc = self.cfg, self.discriminator().train()
        with RT.autocast(disc["body"].device, c.amp):
            out = disc_logits(disc["body"], disc["head"], [S.pack_row(*data["jobs"][i]) for i in idx])
        e, a = self.sides(data, idx, torch.cat([x for x, _ in out]), torch.cat([y for _, y in out]))
        w_e, w_a = P.shares(len(e) * live, len(a) * live)  # of the global batch's expert / agent actions
        loss = disc_loss(e, a, w_e, w_a)
        gn = SFT.optim_step(disc, self.disc_opt, c.grad_clip, loss).item()
        return {**P.all_sum({"losses/disc": loss.item(), **disc_accuracy(e, a, w_e, w_a)}), "disc/grad_norm": gn}

    def advantages(self, data, it: int, announce: bool):
        """Per trajectory: group advantages (C,) and rewards (C,) of its practices under D."""
        c, disc, jobs = self.cfg, self.discriminator(), data["jobs"]
        chunks = [jobs[lo:lo + c.traj_batch] for lo in range(0, len(jobs), c.traj_batch)]
        out = []  # per chunk, each rank its share of the chunks
        with torch.no_grad(), RT.autocast(disc["body"].device, c.amp):
            for chunk in P.shard(chunks):
                out.append([(e.cpu(), x.cpu()) for e, x in disc_logits(disc["body"], disc["head"],
                                                                       [S.pack_row(*j) for j in chunk])])
        scored = [ex for chunk in P.gather(out) for ex in chunk]  # (expert (T,), practices (C,)) per trajectory
        es, cs = [e for e, _ in scored], [x for _, x in scored]
        rewards = [step_reward(x, c.reward) for x in cs]
        if announce:  # D's accuracy on this iteration's data after its steps: a convergence proxy
            e, a = self.sides(data, range(len(cs)), torch.cat(es), torch.cat(cs))
            self.log(event="disc", iteration=it + 1, step=self.steps, **disc_accuracy(e, a),
                     **{"losses/disc": disc_loss(e, a).item(), "rewards/mean": torch.cat(rewards).mean().item()})
        return [group_advantages(r.view(-1, c.k), c.adv_std).flatten() for r in rewards], rewards

    def pg_step(self, model, opt, data, idx: list[int], live: bool = True) -> dict:
        """A PPO step on items idx, this rank's slice of the global batch (live False: a stand-in at weight 0).
        The losses are means over the batch's actions and tokens, so each trajectory's forward and
        backward runs alone at its share of them and the gradients add up to the batch's: activations
        for one rollout (thousands of tokens on the real simulators), not traj_batch of them. Under
        --fsdp one forward for all, as every rank must make the same forwards."""
        c = self.cfg
        n_a = sum(len(self.adv[1][i]) for i in idx)  # the slice's actions and action tokens
        n_t = sum(len(data["old"][i]) for i in idx)
        w_a, w_t = P.shares(n_a * live, n_t * live)  # of the global batch's actions, tokens
        w_pg = w_t if c.token_level else w_a
        sums = dict.fromkeys(("pg", "kl", "clip", "ent"), 0.0)
        for part in P.one_at_a_time(model, idx):
            with RT.autocast(model.device, c.amp):
                lp, ent, act = action_tokens(model, [S.pack_row(*data["jobs"][i]) for i in part], self.own)
            old = torch.cat([data["old"][i] for i in part]).to(model.device)
            adv = torch.cat([self.adv[1][i] for i in part]).to(model.device)
            pg, clip = ppo_loss(lp, old, act, adv, c.clip_eps, c.token_level)  # means over the part's
            kl = kl_k3(lp, old, c.kl_estimator)  # actions (or tokens) and tokens: weighted back to the slice's below
            f_pg = len(lp) / n_t if c.token_level else len(adv) / n_a
            (pg * f_pg * w_pg + c.kl_coef * kl * len(lp) / n_t * w_t).backward()
            for k, v in (("pg", pg * f_pg), ("kl", kl * len(lp) / n_t), ("clip", clip * f_pg),
                         ("ent", ent.sum() / n_t)):
                sums[k] += v.item()
        reward = torch.cat([self.adv[2][i] for i in idx]).mean().item()
        m = P.all_sum({"losses/pg": sums["pg"] * w_pg, "losses/kl": sums["kl"] * w_t, "rewards/mean": reward * w_a,
                       "policy/clip_frac": sums["clip"] * w_pg, "policy/entropy": sums["ent"] * w_t,
                       "actions": n_a * live})
        return {**m, "grad_norm": SFT.optim_step(model, opt, c.grad_clip).item()}


class Outcome(Inverse):
    """PPO with the outcome reward only: K rollouts per task, the final reward on every action."""

    name, own = "ppo-outcome", True

    def collect(self, model, tok, it, g, partial=None):
        c = self.cfg
        by_id = {t.id: t for t in envs.make(c.env, "train", n=c.n_train, seed=c.seed)}
        tasks = [by_id[r["id"]] for r in self.records(it) for _ in range(c.k)]  # a task's K rollouts side by side
        played = AG.rollout(model, tok, c.env, tasks, c.temperature, c.top_p, c.max_new_tokens, c.eval_batch,
                           generator=g, desc=f"explore {it + 1}", partial=partial)
        R = torch.tensor([p["reward"] for p in played]).view(-1, c.k)  # (tasks, K)
        A, L = group_advantages(R, c.adv_std).flatten(), model.args.max_seq_len
        jobs, adv, rew = [], [], []
        for p, a, r in zip(played, A, R.flatten()):
            ids, spans = AG.turn_spans(tok, AG.to_messages(p), L)  # cut to the context
            if spans:
                jobs.append((ids, spans, []))
                adv.append(a.repeat(len(spans)))
                rew.append(r.repeat(len(spans)))
        self.log(event="explore", iteration=it + 1, rollouts=len(played), reward=R.mean().item(),
                 success=sum(p["success"] for p in played) / max(1, len(played)))
        return {"jobs": jobs, "old": self.old_logps(model, jobs, partial), "adv": adv, "reward": rew}

    def n_disc(self, data) -> int:
        return 0

    def advantages(self, data, it, announce):
        return data["adv"], data["reward"]


def main(argv: list[str] | None = None) -> None:
    cfg = RT.parse_config(IRLConfig, sys.argv[1:] if argv is None else argv)
    if cfg.k < 2:
        sys.exit(f"error: --k {cfg.k}: the group baseline needs at least 2 samples per state")
    P.dist_setup(cfg.device)
    outcome = cfg.reward == "outcome"
    S.train_iterations(cfg, Outcome(cfg) if outcome else Inverse(cfg),
                       "PPO (outcome reward)" if outcome else "StepAgent-Inverse")


if __name__ == "__main__":
    main()
    P.dist_end()  # torchrun: leave together (a no-op in one process)
