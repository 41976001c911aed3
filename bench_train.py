"""Training throughput and MFU, for a GPU: `python bench.py train` (not in `all`), or the same as
`python bench_train.py --shape 1b --batch 4 --seq 2048`. Results and how they were taken: docs/speed.md.

An SFT step and a packed step-DPO step as the train scripts take them (fp32 weights, bf16 autocast,
AdamW) on a random-init shape: tokens/s, MFU against the device's bf16 peak, and a peer in the same
run (transformers' LlamaForCausalLM for SFT; for step-DPO, the other way attention.BlockMask can attend).
"""
from __future__ import annotations

import sys

import torch

import attention as AT
import model as M
import runtime as RT
import sft as SFT
import stepagent as S

# random-init Llama shapes: throughput does not depend on the weights, so no checkpoint is needed
SHAPES = {  # and "tiny": the tiny preset's default shape (stepagent.tiny_args), vocab 2048
    "smollm2": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    intermediate_size=1536, rope_theta=100000.0),  # SmolLM2-135M's config.json
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
               intermediate_size=8192, rope_theta=500000.0),  # Llama-3.2-1B's shape (1.24B parameters)
}
# dense bf16 tensor-core FLOP/s (datasheets), the first name found in the device's wins: the PCIe and
# NVL cards run lower clocks than the SXM ones plain "H100" / "H200" name
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12}


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of the first PEAK_BF16 name found in the device's name; None if none is."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def train_flops(args: M.ModelArgs, row_lens: list[int], n_targets: int, scores: int | None = None) -> float:
    """FLOPs of one forward+backward (3x the forward's matrix products) over rows of these lengths:
    every linear layer on every token, the LM head on the target tokens only (token_logprobs computes
    logits nowhere else), and attention over `scores` query-key pairs per head and layer: by default
    dense over each row (PaLM's and nanoGPT's count: the full square, about twice what a causal
    kernel that skips masked tiles computes); for packed rows, block_scores of their BlockMask."""
    a = args
    per_tok = a.n_layers * (a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
                            + 3 * a.dim * a.intermediate_size)
    scores = sum(n * n for n in row_lens) if scores is None else scores
    attn = scores * a.n_layers * a.n_heads * a.head_dim * 2  # QK^T and PV
    return 3 * 2 * (sum(row_lens) * per_tok + n_targets * a.dim * a.vocab_size + attn)


def block_scores(bm: AT.BlockMask) -> int:
    """The query-key pairs a BlockMask's attention computes: each block's rows against its keys
    (a causal block counted whole); padding, in no block, computes none."""
    return sum((hi - lo) * (k + hi - lo) for row in bm.blocks for lo, hi, k, _ in row)


def add_args(p) -> None:
    """bench.py's options for this bench (its parser holds them all)."""
    p.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES], help="train: the random-init model")
    p.add_argument("--batch", type=int, default=4, help="train: SFT rows (step-DPO: half as many packed rows)")
    p.add_argument("--seq", type=int, default=1024, help="train: tokens per SFT row / per packed trajectory")
    p.add_argument("--device", default=None, help="train: cuda if there is one, else cpu")
    p.add_argument("--compile", action="store_true", help="train: torch.compile every transformer block, ours and the peer's")
    p.add_argument("--peak_tflops", type=float, default=None, help="train: the device's bf16 peak for MFU")


def bench_train(a) -> None:
    """The SFT and step-DPO steps and their peers. MFU counts the FLOPs the step needs
    (block_scores): the one-call way computes masked-out pairs on top."""
    import train_implicit as TI
    from bench import header, patched, row, timeit  # here: bench.py imports this module

    if a.seq < 160:
        raise SystemExit(f"bench.py train: --seq {a.seq}: at least 160 (a step-DPO row packs 10 expert actions of 16 tokens)")
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else peak_bf16(name)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ctx = max(a.seq, 4096)
    args = SFT.tiny_args(S.Config(max_seq_len=ctx), 2048) if a.shape == "tiny" else \
        M.ModelArgs(**SHAPES[a.shape], max_seq_len=ctx, tie_embeddings=True)
    print(f"\n## training steps, {a.shape} shape (random init), {name}, bf16 autocast, fp32 weights + AdamW\n")
    header("step", "model", "tokens/step", "tokens/s", "MFU", "vs peer, same run")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, args.vocab_size, (a.batch, a.seq), generator=g).to(dev)
    tm = torch.ones_like(x, dtype=torch.bool)
    tm[:, 0] = False
    sft_flops = train_flops(args, [a.seq] * a.batch, int(tm.sum()))

    def stepper(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")

        def fn():
            with RT.autocast(dev, "bf16"):
                loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
        return fn

    def report(what, who, t, tokens, flops, peer=""):
        mfu = f"{flops / t / peak:.1%}" if peak else "n/a"
        row(what, who, tokens, f"{tokens / t:,.0f}", mfu, peer)

    ours = M.Transformer.from_args(args, device=dev).train()
    if a.compile:
        for block in ours.model.layers:  # per block, as torchtitan does: one graph, reused 16-30 times
            block.compile()
    sft = stepper(ours, lambda m: SFT.sft_loss(m, x, tm))
    t_ours = timeit(sft, a.repeat)
    del sft  # its AdamW state

    # step-DPO: per row one trajectory of a.seq tokens with 10 expert actions of 16 tokens and K
    # rejected 16-token practices per state, packed (stepagent.pack_row)
    L, n_act = a.seq, 16
    traj = torch.randint(3, args.vocab_size, (L,), generator=g).tolist()
    spans = [(s, s + n_act) for s in range(L // 10 - n_act, L, L // 10)][:10]
    cands = [(t, torch.randint(3, args.vocab_size, (n_act,), generator=g).tolist()) for t in range(len(spans))
             for _ in range(a.k)]
    pairs = [(t, i) for i, (t, _) in enumerate(cands)]
    rows = [S.pack_row(traj, spans, cands)] * max(1, a.batch // 2)
    jobs = [(traj, spans, cands, pairs)] * len(rows)
    with torch.no_grad(), RT.autocast(dev, "bf16"):
        ref = [r.float() for r in TI.pair_logps(S.score_packed(ours, rows), jobs)[:2]]
    dpo = stepper(ours, lambda m: TI.step_dpo_loss(*TI.pair_logps(S.score_packed(m, rows), jobs)[:2], *ref, 0.1)[0].mean())
    n_tok = sum(len(r[0]) for r in rows)
    dpo_flops = train_flops(args, [len(r[0]) for r in rows], sum(int(r[3].sum()) for r in rows),
                            block_scores(AT.pad_rows(rows, "cpu")[3]))
    t_dpo = timeit(dpo, a.repeat)
    one_call = AT.BlockMask.one_call(dev, args.n_heads * args.head_dim)
    with patched(AT.BlockMask, dense_on=(dev.type,), dense_max_width=0 if one_call else 1 << 30):  # the other way
        t_dpo_peer = timeit(dpo, a.repeat)
    n_params = sum(p.numel() for p in ours.parameters())
    del ours, dpo  # the peer's weights and AdamW state in their place
    t_hf = None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**args.to_hf())).to(dev).train()
        if a.compile:  # the peer compiled the same way, so the ratio is the models', not torch.compile's
            for layer in hf.model.layers:
                layer.compile()
        t_hf = timeit(stepper(hf, lambda m: m(x, labels=x).loss), a.repeat)
        del hf
    except ImportError:
        pass
    ours_name = "ours" + (" (torch.compile)" if a.compile else "")
    report("SFT", ours_name, t_ours, x.numel(), sft_flops,
           f"{t_hf / t_ours:.2f}x" if t_hf else "transformers not installed")
    if t_hf:
        report("SFT", "transformers" + (" (torch.compile)" if a.compile else ""), t_hf, x.numel(), sft_flops)
    ways = ("one SDPA call", "block by block")[::1 if one_call else -1]
    report(f"step-DPO ({len(pairs)} pairs/row)", f"{ours_name}, {ways[0]}", t_dpo, n_tok, dpo_flops,
           f"{t_dpo_peer / t_dpo:.2f}x {ways[1]}")
    report(f"step-DPO ({len(pairs)} pairs/row)", f"{ours_name}, {ways[1]}", t_dpo_peer, n_tok, dpo_flops)
    print(f"\nparameters: {n_params / 1e6:.1f}M; batch {a.batch} x {a.seq} "
          f"(step-DPO: {len(rows)} packed rows of {len(rows[0][0])} tokens); MFU against "
          + (f"{peak / 1e12:.0f} TFLOP/s" if peak else f"nothing: no bf16 peak known for {name} (--peak_tflops)"))


if __name__ == "__main__":
    import bench

    bench.main(["train", *sys.argv[1:]])
