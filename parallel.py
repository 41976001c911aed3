"""Several processes under torchrun (`torchrun --nproc_per_node N <script> ...`): the process group,
sharding of tasks and trajectories by rank, gathering results back, the global batch's weights, the
gradient all-reduce, and the FSDP2 option. Without torchrun every helper does nothing or returns its
argument, so one process runs the same numbers bit for bit.

How the scripts use these: each rank plays its
shard of the evaluation tasks and inspects its shard of the trajectories (`shard`, `gather`); an
optimiser step takes the one-process global batch, each rank its slice (`shard_batch`) weighted by
its share of the global count (`shares`); the gradients are summed (`allreduce_grads`) before
clipping; only rank 0 writes and prints (`is_main`).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import model as M


def get_device(name: str) -> torch.device:
    """auto: cuda if there is one, else cpu; under torchrun cuda means this rank's GPU, cuda:LOCAL_RANK."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)



def dist_setup(device: str = "auto") -> None:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the process group, gloo on CPU and
    nccl on CUDA (one GPU per rank, cuda:LOCAL_RANK); ranks other than 0 print nothing; the script
    ends with dist_end(). Without torchrun: nothing, and the helpers below do nothing (or return
    their argument)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    dev = get_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # prints and tqdm.write; tracebacks (stderr) still show


def dist_end() -> None:
    """The end of a script under torchrun: wait for every rank, leave the process group and exit
    at once. Python's own shutdown would race gloo's worker threads, which can still be freeing the
    last collective's tensors (a SIGABRT, 'terminate called without an active exception', in about
    1 run in 10 on CPU; pytorch/pytorch PR 179291), so the process ends with os._exit(0) after
    flushing its output. Without torchrun: nothing."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. for a file rank 0 writes)."""
    if world() > 1:
        dist.barrier()


def rank_seed(seed: int) -> int:
    """A sampling seed of its own per rank (the seed itself on rank 0 and in one process)."""
    return seed + 1_000_000 * rank()


def shard(items: list) -> list:
    """This rank's share of items, items[rank::world]."""
    return items[rank()::world()]


def gather(mine: list) -> list:
    """shard's inverse: every rank's list (its shard's results, one per item) gathered, in the
    original item order, on every rank."""
    if world() == 1:
        return mine
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    return [parts[i % world()][i // world()] for i in range(sum(len(p) for p in parts))]


def shard_batch(idx: list[int]) -> tuple[list[int], bool]:
    """This rank's slice of a global batch, and whether it is real. A rank left without items (a
    batch smaller than the number of ranks) runs the batch's first item at weight 0 instead (live
    False: its counts enter `shares` as 0), so every rank makes the same forwards and collectives."""
    mine = shard(idx)
    return (mine, True) if mine else (idx[:1], False)


def all_sum(values: dict) -> dict:
    """Each value summed over the ranks, one all_reduce (the dict itself in one process); ints stay ints."""
    if world() == 1:
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: type(v)(x) if isinstance(v, int) else x for (k, v), x in zip(values.items(), t.tolist())}


def shares(*counts: int) -> list[float]:
    """Each local count's share of its sum over the ranks (1.0 in one process). A local mean times
    its share is this rank's part of the global batch's mean: summed over the ranks (the gradients,
    by allreduce_grads) it is the one-process mean."""
    if world() == 1:
        return [1.0] * len(counts)
    total = all_sum(dict(enumerate(counts)))
    return [n / total[i] if n else 0.0 for i, n in enumerate(counts)]


def allreduce_grads(model: torch.nn.Module) -> None:
    """Sum the gradients over the ranks, before clipping (so every rank clips and steps alike);
    a parameter this rank's forward did not reach contributes zeros."""
    if world() == 1:
        return
    if is_fsdp(model):  # fully_shard's reduce-scatter in backward averaged them already: make that the sum
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(world())
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def fsdp_wrap(model: M.Transformer) -> M.Transformer:
    """--fsdp: shard the policy's weights, gradients and optimiser state over the ranks, FSDP2's
    fully_shard on every transformer block and then on the whole model (embeddings, final norm,
    head); `hidden` gets FSDP's gather hooks as `forward` has. Make the optimiser after this."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        sys.exit("error: --fsdp true shards over the ranks of torchrun: run under torchrun --nproc_per_node N")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "hidden")
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def one_at_a_time(model: torch.nn.Module, items: list) -> list[list]:
    """items in parts of one, for a forward and backward each (gradients accumulate); under FSDP one
    part of all, as every rank must make the same forwards."""
    return [list(items)] if is_fsdp(model) else [[x] for x in items]


def replica(model: M.Transformer) -> M.Transformer:
    """The policy as a plain model on this rank: itself, or under --fsdp a copy with its full weights
    gathered (a collective: every rank calls it). Generation and no-grad scoring use it (each rank
    runs a different number of forwards on its own shard, which FSDP's per-forward gathers cannot
    follow), and so does saving."""
    if not is_fsdp(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        full = M.Transformer(model.args)
    full.load_state_dict(sd, assign=True)
    if model.args.tie_embeddings:
        full.lm_head.weight = full.model.embed_tokens.weight
    full.inv_freq = M.rope_inv_freq(model.args, model.device)
    return full.train(model.training)


def optim_state(model, opt) -> dict:
    """The optimiser's state to save; under --fsdp gathered in full on rank 0 (a collective)."""
    if not is_fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optim_state(model, opt, path: str, fix: str = "delete the checkpoint it is in to start that over") -> None:
    """The optimiser's state from `path` (tensors and plain containers only: no code runs); a file
    that cannot be read stops the run with one line naming it and `fix`."""
    # the full state stays in host memory under --fsdp (a 7B model's AdamW moments alone are 28 GB in
    # bf16): set_optimizer_state_dict moves each tensor to the device and keeps this rank's shard of it
    try:
        sd = torch.load(path, map_location="cpu" if is_fsdp(model) else model.device, weights_only=True)
    except Exception as e:  # truncated (a full disk), damaged, or not an optimiser state
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        sys.exit(f"error: {path}: cannot read the optimiser state ({why}); {fix}")
    if not is_fsdp(model):
        return opt.load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
