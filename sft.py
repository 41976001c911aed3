"""The novice: expert trajectories, the base model (the tiny preset's is trained from scratch), and
behaviour cloning, L_SFT = -sum_t log pi(a_t | s_t) over the assistant tokens (paper §3.1).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import sys
import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

import agent as AG
import convert_gguf as GG
import envs
import model as M
import parallel as P
import runtime as RT
import tokenizer as T

if TYPE_CHECKING:
    from stepagent import Config


# ----------------------------------------------------------------------------- data and models


def expert_data(cfg: Config) -> list[dict]:
    """Expert trajectories of n_train train tasks (cached in <out>/data as an ETO file; under
    torchrun rank 0 makes it and the others read it)."""
    path = os.path.join(cfg.out, "data", f"{cfg.env}_train_{cfg.n_train}_seed{cfg.seed}.json")
    made = None
    if P.is_main() and not os.path.exists(path):
        made = _make_expert_data(cfg, path)
    P.barrier()
    return made or envs.load_trajectories(path)


def _make_expert_data(cfg: Config, path: str) -> list[dict]:
    env = envs.load_env(cfg.env)
    tasks = envs.make(cfg.env, "train", n=cfg.n_train, seed=cfg.seed)
    if len(tasks) < cfg.n_train:
        print(f"note: --n_train {cfg.n_train}: {cfg.env}'s train split has {len(tasks)} tasks; using all of them")
    recs = [envs.run_expert(env, t) for t in tqdm(tasks, desc="expert trajectories", leave=False)]
    # a real simulator's gold path can miss (ScienceWorld's timing varies between loads): such a
    # trajectory is no expert demonstration, so it is left out, named, rather than trained on
    bad = [r["id"] for r in recs if r["reward"] < 1.0]
    if len(bad) == len(recs):
        raise RuntimeError(f"{cfg.env}: the expert failed all {len(bad)} train tasks (e.g. {bad[:3]})")
    if bad:
        print(f"note: the expert failed {len(bad)} of {len(recs)} {cfg.env} train tasks, left out: {', '.join(bad)}")
    recs = [r for r in recs if r["reward"] >= 1.0]
    envs.save_trajectories(path, recs)
    return recs


def tiny_args(cfg: Config, vocab_size: int) -> M.ModelArgs:
    """The tiny preset's Llama shape: multi-head attention, SwiGLU width 3 * dim, tied embeddings."""
    return M.ModelArgs(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_heads, head_dim=cfg.dim // cfg.n_heads, intermediate_size=cfg.dim * 3,
                       max_seq_len=cfg.max_seq_len, tie_embeddings=True, rope_theta=10000.0)


def prepare_base(cfg: Config, records: list[dict]) -> str:
    """The model SFT starts from: a folder in the Hugging Face layout (under torchrun made by rank 0)."""
    if cfg.preset == "smollm2":
        path = os.path.join("checkpoints", "smollm2-135m-instruct")
        if P.is_main() and not os.path.exists(os.path.join(path, "config.json")):
            GG.convert_gguf(GG.find_smollm2_gguf(), path)
        P.barrier()
        return path
    if cfg.preset != "tiny":
        if not os.path.exists(os.path.join(cfg.preset, "config.json")):
            raise FileNotFoundError(f"--preset {cfg.preset!r}: not tiny/smollm2 and no config.json there")
        return cfg.preset
    path = os.path.join(cfg.out, "base")
    if P.is_main() and not os.path.exists(os.path.join(path, "config.json")):
        _make_tiny_base(cfg, records, path)
    P.barrier()
    return path


def _make_tiny_base(cfg: Config, records: list[dict], path: str) -> None:
    # a byte-level BPE trained on the env's own text, then a small Llama from scratch
    # (with whole_ids, each opaque ID seen in that text is one token: see the note in train_sft)
    tok_dir = os.path.join(cfg.out, "tokenizer")
    texts = [c["value"] for r in records for c in r["conversations"]]
    pattern = getattr(envs.env_class(cfg.env), "opaque_ids", None) if cfg.whole_ids else None
    whole = sorted({m for t in texts for m in re.findall(pattern, t)}) if pattern else []
    tok = T.train_tokenizer(texts, cfg.vocab_size, tok_dir, whole)
    model = M.Transformer.from_args(tiny_args(cfg, tok.vocab_size), seed=cfg.seed)
    M.save_model(model, tok, path)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny preset: {n / 1e6:.2f}M parameters, vocab {tok.vocab_size} ({len(whole)} whole IDs), "
          f"saved to {path} (tokenizer from {tok_dir})")


def load(path: str, cfg: Config):
    """(model, tokenizer) of a model folder for this run; a broken one stops it with one line."""
    try:
        model, tok = M.load_model(path, device=P.get_device(cfg.device), dtype=cfg.dtype,
                                  max_seq_len=cfg.context or None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.grad_ckpt = cfg.grad_ckpt
    return model, tok


# ----------------------------------------------------------------------------- SFT (the novice)


def encode_records(tok: T.Tokenizer, records: list[dict], max_len: int):
    """(ids, assistant mask) per trajectory; trajectories longer than max_len are left out (counted)."""
    out, skipped = [], 0
    for r in records:
        ids, mask = tok.encode_chat(AG.to_messages(r))
        if len(ids) > max_len:
            skipped += 1
            continue
        out.append((ids, mask))
    if skipped:
        print(f"note: {skipped} of {len(records)} trajectories exceed {max_len} tokens and are not trained on")
    return out


def length_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding): shuffle, sort within windows of
    32 batches, cut, shuffle the batches. Deterministic in the seed, so an epoch can be resumed."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    w = 32 * batch_size
    order = [i for lo in range(0, len(order), w) for i in sorted(order[lo:lo + w], key=lambda i: lengths[i])]
    out = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    rng.shuffle(out)
    return out


def rename_ids(record: dict, pattern: str, rng: random.Random) -> dict:
    """A copy of an expert trajectory with every opaque identifier (a match of `pattern`, e.g. a
    webshop product ID) renamed to a fresh random one of the same shape, consistently within the
    trajectory. Training on renamed IDs leaves copying them from the page as the only way to
    predict them; memorising the train catalogue's IDs no longer pays."""
    names: dict[str, str] = {}

    def new(m):
        old = m.group(0)
        if old not in names:
            names[old] = old[:2] + "".join(rng.choice(_ID_CHARS) for _ in old[2:])
        return names[old]
    conv = [{**c, "value": re.sub(pattern, new, c["value"])} for c in record["conversations"]]
    return {**record, "conversations": conv}


_ID_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def collate(examples, pad_id: int, device, all_tokens: bool = False):
    """Right-padded (B, T) tokens and (B, T) bool target mask: the assistant tokens, or with
    all_tokens every real token (next-token pretraining); padding is never a target."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tm = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, mask) in enumerate(examples):
        x[b, : len(ids)] = torch.tensor(ids)
        tm[b, : len(ids)] = True if all_tokens else torch.tensor(mask, dtype=torch.bool)
    tm[:, 0] = False
    return x.to(device), tm.to(device)


def n_targets(example, all_tokens: bool = False) -> int:
    """How many target tokens collate gives an (ids, mask) example: tm's count for its row."""
    ids, mask = example
    return len(ids) - 1 if all_tokens else sum(mask) - bool(mask[0])


def sft_loss(model, x, tm) -> torch.Tensor:
    """Mean negative log-likelihood of the assistant tokens (the paper's L_SFT, per token)."""
    lp = M.token_logprobs(model, x, tm)
    return -lp.sum() / tm.sum().clamp(min=1)


def optim_step(model, opt, grad_clip: float, loss: torch.Tensor | None = None) -> torch.Tensor:
    """The one optimiser step of SFT and every reflection: backward (loss None: the caller has made
    it), gradients summed over the ranks (torchrun), clipped, a step. Returns the gradient norm (0-d)."""
    if loss is not None:
        loss.backward()
    P.allreduce_grads(model)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gn


def lr_at(step: int, total: int, warmup: float, lr: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine from lr down to lr/10."""
    w = max(1, int(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train_sft(cfg: Config) -> str:
    """Behaviour cloning; a checkpoint per epoch in <out>/sft (resumed if interrupted; returned at
    once if already complete: the cached novice). Returns the checkpoint folder.

    The tiny preset's model starts from random weights, so it first gets `pretrain_epochs` of
    next-token loss on every token of the same trajectories (observations too): it stands in for
    the language pretraining a real checkpoint brings. SFT proper is assistant tokens only.

    Whole IDs (`whole_ids`, tiny preset): each opaque ID of the train text (a webshop product ID) is
    one token, since a from-scratch model given minutes never learns to copy a 10-character ID off
    the page, which a pretrained one does (docs/main-job.md#whole-ids)."""
    if cfg.rename_ids and cfg.whole_ids and cfg.preset == "tiny":
        sys.exit("error: --rename_ids true draws IDs the tiny tokenizer has never seen; add --whole_ids false")
    RT.seed_all(cfg.seed)
    cfg = dataclasses.replace(cfg, amp=RT.resolve_amp(cfg.amp, P.get_device(cfg.device)))  # recorded as trained
    ckpt = os.path.join(cfg.out, "sft")
    M.restore_checkpoint(ckpt)  # a save killed between its renames
    state_path = os.path.join(ckpt, "trainer_state.json")
    state = (RT.read_json(state_path, f"delete {ckpt} to train the novice again") if os.path.exists(state_path)
             else {"epoch": 0, "step": 0})
    n_pre = cfg.pretrain_epochs if cfg.preset == "tiny" else 0
    n_epochs = n_pre + cfg.sft_epochs
    pending = state.get("dev", {}) is None  # saved, then stopped in its dev evaluation
    _check_novice_options(cfg, state, finished=state["epoch"] >= n_epochs)
    if state["epoch"] >= n_epochs and not pending:
        print(f"novice already trained: {ckpt} ({state['epoch']} epochs)")
        return ckpt
    records = expert_data(cfg)
    base = prepare_base(cfg, records)
    model, tok = load(ckpt if state["epoch"] else base, cfg)
    if cfg.fsdp:
        P.fsdp_wrap(model)
    device = model.device
    pattern = getattr(envs.env_class(cfg.env), "opaque_ids", None) if cfg.rename_ids else None

    def epoch_data(epoch: int):  # renamed IDs are drawn per trajectory and epoch (seeded: resumable)
        recs = records if not pattern else [rename_ids(r, pattern, random.Random(f"{cfg.seed}-{epoch}-{i}"))
                                            for i, r in enumerate(records)]
        return encode_records(tok, recs, model.args.max_seq_len)
    data = epoch_data(state["epoch"])
    if not data:
        flag = "--max_seq_len" if cfg.preset == "tiny" else "--context"
        sys.exit(f"error: all {len(records)} expert trajectories exceed the context ({model.args.max_seq_len} "
                 f"tokens): nothing to train on; raise {flag}")
    first = data if not pattern or not state["epoch"] else epoch_data(0)  # the schedule's length, as first run
    total = math.ceil(math.ceil(len(first) / cfg.batch_size) / cfg.grad_accum) * n_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    if state["epoch"]:
        P.load_optim_state(model, opt, os.path.join(ckpt, "optimizer.pt"), f"delete {ckpt} to train the novice again")
        print(f"resuming SFT from {ckpt} after epoch {state['epoch']}")
    step = state["step"]
    RT.truncate_log(os.path.join(cfg.out, "sft_metrics.jsonl"), step, False)  # an epoch killed before its save
    log = RT.Log(os.path.join(cfg.out, "sft_metrics.jsonl"))  # (its lines are written again below)

    def dev_epoch(st: dict) -> None:
        """The dev evaluation of the epoch just saved (st: its trainer state), its log line, the state
        completed. The checkpoint is written first, so a crash in the evaluation loses no training."""
        dev = AG.evaluate(P.replica(model), tok, cfg, "dev", cfg.n_dev, desc=f"sft epoch {st['epoch'] - n_pre}")
        log(event="sft_epoch", epoch=st["epoch"], step=st["step"], loss=st["loss"],
            dev_success=dev["success_rate"], dev_reward=dev["avg_reward"], tokens_per_s=st["tokens_per_s"])
        if P.is_main():
            envs.write_json(state_path, {**st, "dev": dev})

    if pending:
        print(f"SFT epoch {state['epoch']} was saved before its dev evaluation: evaluating it now")
        dev_epoch(state)
    model.train()
    for epoch in range(state["epoch"], n_epochs):
        pre = epoch < n_pre
        if pattern and epoch != state["epoch"]:
            data = epoch_data(epoch)
        batches = length_batches([len(d[0]) for d in data], cfg.batch_size, cfg.seed * 1000 + epoch)
        n_batches, ga = len(batches), cfg.grad_accum
        # target tokens of each global batch (every rank's part): a step's loss is the mean over all of
        # its tokens, whichever micro-batch and rank they fall in, as one batch of ga * batch_size would be
        counts = [sum(n_targets(data[i], pre) for i in batch) for batch in batches]
        desc = f"pretrain epoch {epoch + 1}/{n_pre}" if pre else f"sft epoch {epoch + 1 - n_pre}/{cfg.sft_epochs}"
        bar = tqdm(range(n_batches), desc=desc, dynamic_ncols=True, disable=not P.is_main())
        t0, tokens, part = time.time(), 0, 0.0
        for b in bar:
            mine, live = P.shard_batch(batches[b])  # this rank's slice of the global batch (all of it in one process)
            x, tm = collate([data[i] for i in mine], tok.pad_id, device, all_tokens=pre)
            with RT.autocast(device, cfg.amp):
                loss = sft_loss(model, x, tm)  # the mean over this rank's target tokens
            group = max(1, sum(counts[b - b % ga:b - b % ga + ga]))  # the step's target tokens, all ranks
            w = int(tm.sum()) * live / group  # this rank's share of them
            (loss * w).backward()
            part += loss.item() * w
            tokens += x.numel() * live
            if (b + 1) % ga == 0 or b == n_batches - 1:
                loss_all, part = P.all_sum({"loss": part})["loss"], 0.0  # the step's mean over its tokens
                lr = lr_at(step, total, cfg.warmup, cfg.sft_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                gn = optim_step(model, opt, cfg.grad_clip)
                step += 1
                bar.set_postfix(loss=f"{loss_all:.3f}", lr=f"{lr:.2e}")
                if step % cfg.log_every == 0:
                    log.write(step=step, loss=loss_all, lr=lr, grad_norm=gn.item())
        speed = P.all_sum({"tokens": tokens})["tokens"] / (time.time() - t0)
        state["machines"] = RT.machines(state.get("machines"))  # every machine an epoch of it trained on
        st = {"epoch": epoch + 1, "step": step, "loss": loss_all, "tokens_per_s": speed, "dev": {} if pre else None,
              "amp": cfg.amp,  # the precision it trained in (resolve_amp; novice.json has every option)
              "machines": state["machines"]}
        full, opt_state = P.replica(model), P.optim_state(model, opt)
        if P.is_main():
            M.save_model(full, tok, ckpt, extra={"trainer_state.json": st, "optimizer.pt": opt_state})
        if pre:
            log(event="pretrain_epoch", epoch=epoch + 1, step=step, loss=loss_all, tokens_per_s=speed)
        else:
            dev_epoch(st)
        model.train()
    P.barrier()  # the other ranks go on to read the novice rank 0 wrote
    print(f"novice saved to {ckpt}")
    return ckpt


# the options that shape the novice (its data, base model and SFT); the tiny preset's own ones only there
NOVICE = ("env", "preset", "seed", "dtype", "n_train", "sft_epochs", "sft_lr", "batch_size", "grad_accum",
          "warmup", "weight_decay", "grad_clip", "rename_ids", "amp", "fsdp",  # fsdp: its optimiser state's layout
          "context")


NOVICE_TINY = ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "pretrain_epochs", "whole_ids")


def _check_novice_options(cfg: Config, state: dict, finished: bool) -> None:
    """<out>/novice.json records the options the novice in <out> is made with; a later run in the same
    --out with other ones is refused, the option named, instead of silently reusing or resuming a
    novice (or a tiny base, or expert data) made otherwise. A finished novice is reused whatever this
    run's --amp (the precision of what trains next; --amp auto differs between machines) and --fsdp
    (which only a resumed SFT's optimiser state cares about).
    A novice from before novice.json is checked on the precision its trainer_state.json recorded."""
    path = os.path.join(cfg.out, "novice.json")
    now = {k: getattr(cfg, k) for k in NOVICE + (NOVICE_TINY if cfg.preset == "tiny" else ())}
    fix = "delete it (this run's options then go unchecked against the novice's)"
    old = RT.read_json(path, fix) if os.path.exists(path) else {k: state[k] for k in ("amp",) if k in state}
    diff = [k for k in now if k in old and old[k] != now[k] and not (finished and k in ("amp", "fsdp"))]
    if diff:
        k = diff[0]
        sys.exit(f"error: {cfg.out} holds a novice made with --{k} {old[k]}, not {now[k]}; rerun with "
                 f"--{k} {old[k]} to go on with it, or choose another --out")
    if finished and old.get("amp", now["amp"]) != now["amp"]:
        print(f"note: the novice in {cfg.out} trained with --amp {old['amp']}; this run trains with --amp {now['amp']}")
    if not os.path.exists(path) and not state["epoch"] and P.is_main():  # a novice begun now
        envs.write_json(path, now)
