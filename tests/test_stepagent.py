"""stepagent.py: prefix-shared sampling and packed scoring equal their naive references."""
import json
import os
import platform
import re

import pytest
import torch

import agent as AG
import attention as AT
import generate as G
import model as M
import runtime as RT
import sft as SFT
import stepagent as S
import tokenizer as T

CONV = [
    {"role": "user", "content": "Find red shoes under 40 dollars.\nWebShop [SEP] Search"},
    {"role": "assistant", "content": "Thought: I should search.\nAction: search[red shoes]"},
    {"role": "user", "content": "Observation: [SEP] B0A1 [SEP] red running shoes [SEP] $12.00"},
    {"role": "assistant", "content": "Thought: B0A1 fits.\nAction: click[B0A1]"},
    {"role": "user", "content": "Observation: red running shoes [SEP] size [SEP] 8 [SEP] 9 [SEP] Buy Now"},
    {"role": "assistant", "content": "Thought: size 9.\nAction: click[9]"},
    {"role": "user", "content": "Observation: you chose 9"},
    {"role": "assistant", "content": "Thought: buy it.\nAction: click[Buy Now]"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    tok = T.train_tokenizer([m["content"] for m in CONV] * 30, 350, d)
    args = M.ModelArgs(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=128, max_seq_len=1024, tie_embeddings=True)
    return M.Transformer.from_args(args, seed=1).eval(), tok


def test_turn_spans_states_are_generation_prompts(tiny):
    _, tok = tiny
    ids, spans = AG.turn_spans(tok, CONV)
    assert len(spans) == 4
    for t, (s, e) in enumerate(spans):
        state, _ = tok.encode_chat(CONV[: 2 * t + 1], add_generation_prompt=True)
        assert ids[:s] == state  # the state the expert acted from, exactly as the agent sees it
        assert ids[s:e] == AG.turn_ids(tok, CONV[2 * t + 1]["content"])


def test_shared_prefix_sampling_equals_naive(tiny):
    model, tok = tiny
    ids, spans = AG.turn_spans(tok, CONV)
    bounds = [s for s, _ in spans]
    a_ids, a_lp = S.sample_practice(model, tok, ids, bounds, k=2, temperature=0.0, max_new_tokens=12)
    b_ids, b_lp = S.sample_practice_naive(model, tok, ids, bounds, k=2, temperature=0.0, max_new_tokens=12)
    assert a_ids == b_ids
    assert any(len(x) > 3 for x in a_ids)
    for x, y in zip(a_lp, b_lp):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
    # sampled rows: right count, and reproducible under a fixed generator
    g = lambda: torch.Generator().manual_seed(0)
    s1, _ = S.sample_practice(model, tok, ids, bounds, k=3, temperature=1.0, max_new_tokens=8, generator=g())
    s2, _ = S.sample_practice(model, tok, ids, bounds, k=3, temperature=1.0, max_new_tokens=8, generator=g())
    assert len(s1) == 12 and s1 == s2


def test_packed_scoring_equals_separate_forwards(tiny):
    model, tok = tiny
    ids, spans = AG.turn_spans(tok, CONV)
    cands = [(0, AG.turn_ids(tok, "Thought: x\nAction: search[blue shoes]")), (0, AG.turn_ids(tok, "Action: click[B0A1]")),
             (2, AG.turn_ids(tok, "Thought: size 8.\nAction: click[8]")), (3, AG.turn_ids(tok, "Action: click[< Prev]"))]
    row = S.pack_row(ids, spans, cands)
    short = S.pack_row(ids[: spans[1][1]], spans[:2], cands[:2])  # a second, shorter row: padding
    with torch.no_grad():
        (e, c), (e2, c2) = S.score_packed(model, [row, short])
        ne, nc = S.score_naive(model, ids, spans, cands)
    assert torch.allclose(e, ne, atol=1e-5) and torch.allclose(c, nc, atol=1e-5)
    assert torch.allclose(e2, ne[:2], atol=1e-5) and torch.allclose(c2, nc[:2], atol=1e-5)
    assert (c < 0).all() and (e < 0).all()
    # a row far shorter than the others gets its own forward; the scores come back in the rows' order
    first = S.pack_row(ids[: spans[0][1]], spans[:1], cands[:1])
    assert S.length_groups([len(r[0]) for r in (short, first, row)]) == [[2, 0], [1]]
    with torch.no_grad():
        (e3, c3), (e4, c4), (e5, c5) = S.score_packed(model, [short, first, row])
    for got, want in ((e3, ne[:2]), (c3, nc[:2]), (e4, ne[:1]), (c4, nc[:1]), (e5, ne), (c5, nc)):
        assert torch.allclose(got, want, atol=1e-5)
    # gradients flow through the packed scores
    model.zero_grad()
    (e, c), = S.score_packed(model, [row])
    (e.sum() - c.sum()).backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("one_call", [False, True])
def test_block_mask_equals_dense_mask(tiny, monkeypatch, one_call):
    """pad_rows' BlockMask computes, block by block (a CPU's way) or in one SDPA call (a GPU's), the
    attention of the dense packed mask: the same hidden states at every real column, the same
    gradients, and zeros at padding."""
    model, tok = tiny
    monkeypatch.setattr(AT.BlockMask, "dense_on", ("cpu",) if one_call else ())
    ids, spans = AG.turn_spans(tok, CONV)
    cands = [(t, AG.turn_ids(tok, a)) for t, a in [(0, "Action: search[shoes]"), (0, "Thought: x\nAction: click[B0A1]"),
                                                  (1, "Action: click[8]"), (2, "Action: click[Buy Now]"),
                                                  (3, "Thought: buy.\nAction: click[< Prev]"), (3, "Action: click[9]")]]
    rows = [S.pack_row(ids, spans, cands), S.pack_row(ids[: spans[1][1]], spans[:2], cands[:3]),
            S.pack_row(ids[: spans[0][1]], spans[:1], [])]  # the last: no candidates, padded
    tokens, _, pos, bm, _ = AT.pad_rows(rows, "cpu", block=20)
    B, N = tokens.shape
    dense = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)  # the mask as it was: padding sees itself
    real = torch.zeros(B, N, dtype=torch.bool)
    for i, r in enumerate(rows):
        dense[i, :len(r[0]), :len(r[0])] = r[2]
        real[i, :len(r[0])] = True
    assert len(bm.blocks[0]) > 3
    if one_call:  # the whole mask goes to SDPA: no per-block key masks built
        assert all(m is None for row in bm.blocks for *_, m in row)
    else:
        assert any(m is not None and k for _, _, k, m in bm.blocks[0])  # chunks that see the trajectory
        assert all(m is None for _, _, _, m in (b[0] for b in bm.blocks))  # trajectories: causal
    w = torch.randn(B, N, model.args.dim, generator=torch.Generator().manual_seed(0))
    out, grads = [], []
    for mask in (dense, bm):
        model.zero_grad()
        h = model.hidden(tokens, pos, mask)
        (h * w)[real].sum().backward()
        out.append(h[real].detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert all((a - b).abs().max() <= 1e-5 * a.abs().max() for a, b in zip(*grads))  # fp32 summation order
    assert (bm.dense is not None) == one_call
    q = torch.randn(B, 2, N, 8, generator=torch.Generator().manual_seed(1))
    y = bm.attend(q, q[:, :1], q[:, :1], True)
    assert y.transpose(1, 2)[~real].eq(0).all()  # padding: 0, not NaN
    if one_call:  # a model wider than dense_max_width attends block by block, to the same numbers
        wide = AT.pad_rows(rows, "cpu", block=20, width=AT.BlockMask.dense_max_width + 1)[3]
        assert wide.dense is None and torch.allclose(wide.attend(q, q[:, :1], q[:, :1], True), y, atol=1e-6)
    with pytest.raises(ValueError, match="attend outside"):  # a candidate block that would not see its state
        L = rows[0][6][0][0]
        AT.BlockMask(dense[:1], [[(0, L, 0), (L, len(rows[0][0]), 0)]])


def test_machines_adds_a_machine_only_when_it_changes(monkeypatch):
    here = RT.machine()
    assert here["kernels"] == torch.backends.cpu.get_cpu_capability() and here["threads"] == torch.get_num_threads()
    assert RT.machines(None) == [here] and RT.machines([here]) == [here]  # a resume on the same machine
    other = {**here, "kernels": "AVX2" if here["kernels"] != "AVX2" else "AVX512"}
    assert RT.machines([other]) == [other, here] and RT.machines([here, other]) == [here, other, here]
    vendor = {**here, "mkl": 7 if here["mkl"] != 7 else 0}  # same kernels, another MKL path: another machine
    assert RT.machines([vendor]) == [vendor, here]


def test_sft_resumed_under_other_fsdp_is_refused_in_one_line(tmp_path):
    """A half-trained novice's optimiser state is laid out for --fsdp or not: resuming it the other way
    is refused with the option named (it crashed in the optimiser's load); a finished one is reused."""
    cfg = S.Config(out=str(tmp_path))
    SFT._check_novice_options(cfg, {"epoch": 0, "step": 0}, finished=False)  # begun now: novice.json written
    other = S.Config(out=str(tmp_path), fsdp=True)
    with pytest.raises(SystemExit, match="made with --fsdp False, not True; rerun with --fsdp False"):
        SFT._check_novice_options(other, {"epoch": 1, "step": 4}, finished=False)
    SFT._check_novice_options(other, {"epoch": 6, "step": 750}, finished=True)  # finished: the methods may use FSDP


def test_mkl_code_names_mkls_path_or_none(monkeypatch):
    code = RT.mkl_code()
    if torch.backends.mkl.is_available() and platform.system() == "Linux":  # torch's Linux x86 wheels link MKL in
        assert isinstance(code, int) and 0 <= code <= 16  # MKL's codes; it refuses others ("CPU n is not supported")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert RT.mkl_code() is None and RT.machine()["mkl"] is None
    monkeypatch.undo()
    monkeypatch.setattr(RT.ctypes, "CDLL", lambda path: (_ for _ in ()).throw(OSError(f"{path}: cannot open")))
    assert RT.mkl_code() is None  # no libtorch_cpu.so by that name (another platform): None, not a crash


def test_length_groups_pad_within_slack():
    assert S.length_groups([100, 90, 120]) == [[0, 1, 2]]  # 360 padded <= 1.5 x 310: one forward, in order
    assert S.length_groups([716, 7012]) == [[1], [0]]  # a ScienceWorld batch: 14,024 padded > 1.5 x 7,728
    lens = [1000, 100, 900, 120, 950, 300]
    groups = S.length_groups(lens)
    assert sorted(i for g in groups for i in g) == list(range(len(lens))) and len(groups) > 1
    for g in groups:
        assert len(g) * max(lens[i] for i in g) <= 1.5 * sum(lens[i] for i in g)
    assert S.length_groups(lens, slack=10.0) == [list(range(len(lens)))]


def test_fit_context_drops_oldest_pairs_keeps_first_turn(tiny, monkeypatch):
    _, tok = tiny
    enc = lambda msgs: tok.encode_chat(msgs, add_generation_prompt=True)[0]  # noqa: E731
    full = enc(CONV[:-1])
    assert AG.fit_context(tok, CONV[:-1], len(full)) == (full, 0)  # fits: unchanged
    ids, drop = AG.fit_context(tok, CONV[:-1], len(full) - 5)
    # the first user turn stays; the oldest action/observation pairs go until 3/4 of the budget is left
    assert drop >= 1 and ids == enc(CONV[:1] + CONV[1 + 2 * drop:-1])
    assert len(ids) <= (len(full) - 5) * 3 // 4 or drop == 2  # (2 = all pairs but the last observation)
    assert len(enc(CONV[:1] + CONV[2 * drop - 1:-1])) > (len(full) - 5) * 3 // 4  # one pair fewer would not do
    monkeypatch.setattr(AG, "CONTEXT_CUT", 0.0)  # the peer bench.py compares with: the fewest pairs that fit
    assert AG.fit_context(tok, CONV[:-1], len(full) - 5) == (enc(CONV[:1] + CONV[3:-1]), 1)
    monkeypatch.undo()
    tiny_budget, drop = AG.fit_context(tok, CONV[:-1], 40)
    assert len(tiny_budget) == 40 and drop == 2  # never longer than the budget, even with only the first turn left
    # a one-shot example (`keep` messages) stays whole, ahead of the task's own first turn
    shot = CONV[:2]
    ids, drop = AG.fit_context(tok, shot + CONV[:-1], len(enc(shot + CONV[:-1])) - 5, keep=3)
    assert drop >= 1 and ids == enc(shot + CONV[:1] + CONV[1 + 2 * drop:-1])



def test_fit_context_says_what_it_cut(tiny, monkeypatch, capsys):
    """The note names what was cut: the oldest pairs, or (a budget below the task's first turn, e.g.
    --context 8 with --max_new_tokens 4) the first turn's head, not pairs that were never there."""
    _, tok = tiny
    monkeypatch.setattr(AG, "_noted", set())
    first = CONV[:1]
    ids, drop = AG.fit_context(tok, first, 4)
    out = capsys.readouterr().out
    assert len(ids) == 4 and drop == 0 and "first turn" in out and "pairs" not in out
    full = tok.encode_chat(CONV[:-1], add_generation_prompt=True)[0]
    AG.fit_context(tok, CONV[:-1], len(full) - 5)
    assert "dropping its oldest observation/action pairs" in capsys.readouterr().out

def test_fit_context_keeps_the_history_fixed_between_cuts(tiny):
    """A growing conversation over budget: each cut frees a quarter of the context, so the next turns
    append to an unchanged prompt (a cache hit for ChatCache) until the budget is reached again."""
    _, tok = tiny
    conv = CONV[:1] + (CONV[1:7] * 12)  # 36 action/observation pairs
    budget, drop, prev, cuts = 400, 0, None, 0
    for end in range(3, len(conv) + 1, 2):
        ids, new_drop = AG.fit_context(tok, conv[:end], budget, drop=drop)
        assert len(ids) <= budget and new_drop >= drop
        assert ids == tok.encode_chat(conv[:1] + conv[1 + 2 * new_drop:end], add_generation_prompt=True)[0]
        if prev is not None and new_drop == drop:
            assert ids[: len(prev) - 3] == prev[:-3]  # the last prompt (less its generation prompt) is a prefix
        cuts += new_drop > drop
        drop, prev = new_drop, ids
    n_over = sum(len(tok.encode_chat(conv[:end], add_generation_prompt=True)[0]) > budget
                 for end in range(3, len(conv) + 1, 2))
    assert n_over >= 20 and 1 <= cuts <= n_over // 2  # one pair a turn would re-prefill at all n_over


def test_match_rates_and_length_batches():
    steps = [{"step": 0, "agent": [{"match": True}, {"match": False}]},
             {"step": 1, "agent": [{"match": False}, {"match": False}]},
             {"step": 0, "agent": [{"match": True}, {"match": True}]}]
    r = S.match_rates(steps)
    assert r["all"] == 0.5 and r["by_step"] == {0: 0.75, 1: 0.0}
    lengths = [5, 100, 7, 98, 6, 99, 50, 51]
    b1 = SFT.length_batches(lengths, 2, seed=3)
    assert b1 == SFT.length_batches(lengths, 2, seed=3) and sorted(i for b in b1 for i in b) == list(range(8))
    # one window (8 <= 32 batches): cut in sorted order, so each batch holds neighbours by length
    assert sorted(sorted(lengths[i] for i in b) for b in b1) == [[5, 6], [7, 50], [51, 98], [99, 100]]
    assert abs(SFT.lr_at(0, 100, 0.1, 1.0) - 0.1) < 1e-9 and abs(SFT.lr_at(9, 100, 0.1, 1.0) - 1.0) < 1e-9
    assert abs(SFT.lr_at(100, 100, 0.1, 1.0) - 0.1) < 1e-9  # cosine ends at lr/10


def test_rename_ids_is_consistent_within_a_trajectory_and_leaves_the_rest():
    import random
    import re

    import envs

    pattern = envs.load_env("webshop").opaque_ids
    rec = envs.run_expert(envs.load_env("webshop"), envs.make("webshop", "train", n=1, seed=0)[0])
    old_ids = {m for c in rec["conversations"] for m in re.findall(pattern, c["value"])}
    assert len(old_ids) >= 5  # a results page lists several products
    a = SFT.rename_ids(rec, pattern, random.Random(1))
    b = SFT.rename_ids(rec, pattern, random.Random(1))
    assert a == b and a != SFT.rename_ids(rec, pattern, random.Random(2))  # seeded
    mapping = {}
    for c_old, c_new in zip(rec["conversations"], a["conversations"]):
        olds, news = re.findall(pattern, c_old["value"]), re.findall(pattern, c_new["value"])
        assert len(olds) == len(news)
        for o, n in zip(olds, news):
            assert mapping.setdefault(o, n) == n  # the same product keeps one new name everywhere
        assert re.sub(pattern, "ID", c_old["value"]) == re.sub(pattern, "ID", c_new["value"])  # nothing else changes
    assert len(set(mapping.values())) == len(mapping) and not set(mapping.values()) & old_ids
    # the expert's clicked product is the one renamed on its results page
    click = [c["value"] for c in a["conversations"] if c["from"] == "gpt" and "click[B0" in c["value"]][0]
    assert re.search(pattern, click).group(0) in a["conversations"][2]["value"]


def test_expert_data_says_when_the_train_split_is_smaller(tmp_path, capsys):
    import envs

    n_all = len(envs.make("household", "train", seed=0))
    recs = SFT.expert_data(S.Config(env="household", n_train=n_all + 5, out=str(tmp_path)))
    assert len(recs) == n_all and all(r["reward"] >= 1.0 for r in recs)
    assert f"train split has {n_all} tasks" in capsys.readouterr().out


def test_expert_data_leaves_out_failed_expert_trajectories(tmp_path, capsys, monkeypatch):
    import envs

    real = envs.run_expert

    def flaky(env, task):  # the second task's expert misses, as a ScienceWorld gold path can
        r = real(env, task)
        return {**r, "reward": 0.0} if task.id == tasks[1].id else r

    tasks = envs.make("household", "train", n=4, seed=0)
    monkeypatch.setattr(envs, "run_expert", flaky)
    cfg = S.Config(env="household", n_train=4, out=str(tmp_path))
    recs = SFT.expert_data(cfg)
    assert [r["id"] for r in recs] == [t.id for i, t in enumerate(tasks) if i != 1]
    assert f"failed 1 of 4 household train tasks, left out: {tasks[1].id}" in capsys.readouterr().out
    assert [r["id"] for r in SFT.expert_data(cfg)] == [r["id"] for r in recs]  # the cached file holds the same
    monkeypatch.setattr(envs, "run_expert", lambda env, task: {**real(env, task), "reward": 0.0})
    with pytest.raises(RuntimeError, match="failed all 3"):
        SFT.expert_data(S.Config(env="household", n_train=3, out=str(tmp_path / "b")))


def test_whole_ids_tokenizer_gives_one_token_per_seen_id(tmp_path):
    texts = ["Observation: [SEP] B0BKKZV1PF [SEP] red shoes [SEP] $12.00 [SEP] B09P0RV4AN [SEP] blue",
             "Thought: the first result fits.\nAction: click[B0BKKZV1PF]"] * 20
    plain = T.train_tokenizer(texts, 300, str(tmp_path / "plain"))
    whole = T.train_tokenizer(texts, 300, str(tmp_path / "whole"), ["B09P0RV4AN", "B0BKKZV1PF"])
    assert len(plain.encode("B0BKKZV1PF")) > 1  # BPE alone splits an ID into pieces
    assert whole.vocab_size == plain.vocab_size + 2
    for s in ("click[B0BKKZV1PF]", " B09P0RV4AN [SEP]"):  # after "[" and after a space: the same one token
        ids = whole.encode(s)
        assert whole.decode(ids) == s
        assert sum(whole.decode([i]).strip() in ("B0BKKZV1PF", "B09P0RV4AN") for i in ids) == 1
    assert len(whole.encode("B0ZZZZZZZZ")) > 1  # an ID never seen is spelled out as before
    reloaded = T.Tokenizer(str(tmp_path / "whole"))  # saved: the model folder carries it
    assert reloaded.encode("click[B0BKKZV1PF]") == whole.encode("click[B0BKKZV1PF]")


def test_rename_ids_with_whole_ids_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--whole_ids false"):
        SFT.train_sft(S.Config(out=str(tmp_path), n_train=2, rename_ids=True))


def test_sft_saves_its_epoch_before_the_dev_evaluation(tmp_path, monkeypatch):
    """A run stopped in an epoch's dev evaluation keeps the epoch's training: rerun, it evaluates
    the saved epoch, goes on, and ends with the weights and epoch lines of an uninterrupted run."""
    import dataclasses
    from safetensors.torch import load_file

    cfg = S.Config(env="hotpotqa", n_train=8, n_dev=2, sft_epochs=2, pretrain_epochs=1, dim=32, n_layers=1,
                   n_heads=2, vocab_size=300, max_new_tokens=8, batch_size=4, eval_batch=4, out=str(tmp_path / "a"))
    SFT.train_sft(cfg)
    b = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    real = AG.evaluate

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AG, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        SFT.train_sft(b)
    state = json.load(open(os.path.join(b.out, "sft", "trainer_state.json")))
    assert (state["epoch"], state["step"], state["dev"]) == (2, 4, None)  # pretraining + SFT epoch 1 kept
    monkeypatch.setattr(AG, "evaluate", real)
    # a novice half made is resumed only as it began: not in the other precision, not on another schedule
    other = {"bf16": "none", "none": "bf16"}[state["amp"]]
    with pytest.raises(SystemExit, match=f"made with --amp {state['amp']}, not {other}; rerun with --amp {state['amp']} to go on"):
        SFT.train_sft(dataclasses.replace(b, amp=other))
    with pytest.raises(SystemExit, match="made with --sft_epochs 2, not 3"):
        SFT.train_sft(dataclasses.replace(b, sft_epochs=3))
    SFT.train_sft(b)
    epochs = [[json.loads(x) for x in open(os.path.join(d, "sft_metrics.jsonl")) if "epoch" in x] for d in (cfg.out, b.out)]
    strip = lambda lines: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in lines]  # noqa: E731
    assert [x["epoch"] for x in epochs[1]] == [1, 2, 3] and strip(epochs[0]) == strip(epochs[1])
    wa, wb = (load_file(os.path.join(d, "sft", "model.safetensors")) for d in (cfg.out, b.out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.load(open(os.path.join(b.out, "sft", "trainer_state.json")))["dev"]["n"] == 2


def test_amp_auto_picks_bf16_only_where_the_cpu_has_it_and_the_config_records_the_choice(monkeypatch, capsys):
    """--amp auto: bf16 autocast on a CPU with AVX512-BF16 or AMX, fp32 on one without (emulated bf16
    took 20x as long as fp32 on an AVX2 CPU: bench.py amp); the parsed config holds the choice, so a
    run's config.json says which precision it trained in, and a run resumed on a machine that would
    choose otherwise is refused by the config check instead of changing precision halfway."""
    monkeypatch.delenv("STEPAGENT_NATIVE_BF16", raising=False)  # the probe itself, not the override
    cpu = torch.device("cpu")
    for avx512_bf16, amx, want in [(False, False, "none"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert RT.resolve_amp("auto", cpu) == want
        assert RT.parse_config(S.Config, ["--device", "cpu"]).amp == want
        assert RT.parse_config(S.Config, ["--device", "cpu", "--amp", "none"]).amp == "none"  # given: kept
        with RT.autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == (want == "bf16")
    with pytest.raises(SystemExit, match="--amp 'fp8': choose auto, bf16, none"):
        RT.parse_config(S.Config, ["--amp", "fp8"])


def test_native_bf16_override_decides_amp_auto_on_any_cpu(monkeypatch):
    """STEPAGENT_NATIVE_BF16=1/0 makes --amp auto pick bf16/fp32 whatever the CPU has (the suite is
    checked both ways on one machine with it); any other value is one line naming the variable."""
    cpu = torch.device("cpu")
    for has in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=has: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=has: v)
        for forced, want in (("1", "bf16"), ("0", "none")):
            monkeypatch.setenv("STEPAGENT_NATIVE_BF16", forced)
            assert RT.resolve_amp("auto", cpu) == want
            assert RT.parse_config(S.Config, ["--device", "cpu"]).amp == want
    monkeypatch.setenv("STEPAGENT_NATIVE_BF16", "yes")
    with pytest.raises(SystemExit, match="STEPAGENT_NATIVE_BF16='yes': set it to 1 or 0"):
        RT.resolve_amp("auto", cpu)


def test_evaluate_counts_the_invalid_steps_of_each_task(tiny, tmp_path, monkeypatch):
    """Scripted turns (the expert's, with known bad ones slipped in: not a command, an impossible
    take, no action at all) through evaluate: the bad steps are the ones recorded, and the summary
    counts them; the expert still succeeds, since a bad step changes nothing."""
    model, tok = tiny
    tasks = S.envs.make("household", "test", n=2, seed=0)
    env = S.envs.load_env("household")
    bad = {0: {1: "Action: fly to the moon", 2: "Action: take spoon 99 from drawer 9"},
           1: {0: "Thought: I am not sure what to do."}}
    script = []
    for i, t in enumerate(tasks):
        turns = list(env.expert(t))
        for at in sorted(bad[i]):
            turns.insert(at, bad[i][at])
        script.append(turns)

    played = [0, 0]

    def scripted(model, prompts, *a, **kw):  # the task from its instruction (its first turn always stays)
        outs = []
        for ids in prompts:
            i = next(j for j, t in enumerate(tasks) if t.instruction in tok.decode(ids))
            outs.append(tok.encode(script[i][played[i]]))
            played[i] += 1
        return outs, None

    monkeypatch.setattr(AG.G, "generate", scripted)
    cfg = S.Config(env="household", seed=0, eval_batch=2, max_new_tokens=64)
    summary = AG.evaluate(model, tok, cfg, "test", n=2, out_dir=str(tmp_path))
    recs = json.load(open(tmp_path / "trajectories.json"))
    assert [r["invalid_steps"] for r in recs] == [[1, 2], [0]]
    assert [r["steps"] for r in recs] == [len(s) for s in script] and summary["success_rate"] == 1.0
    assert summary["invalid_steps"] == 3
    assert summary["invalid_share"] == pytest.approx(3 / sum(len(s) for s in script))


def _killed_after_two_saves(work, path, monkeypatch) -> list[int]:
    """Run work(path), killed (KeyboardInterrupt) just after its partial file's second save; the
    'done' counts it saved."""
    saves, save = [], RT.atomic_torch_save

    def killed(obj, p):
        save(obj, p)
        saves.append(obj["done"])
        if len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(RT, "atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        work(path)
    monkeypatch.setattr(RT, "atomic_torch_save", save)
    return saves


def test_rollout_resumes_from_partial_batches(tiny, tmp_path, monkeypatch):
    """A rollout killed after its second batch reruns only the batches left and returns the records
    of an uninterrupted run: the partial file keeps the finished batches and the generator's state."""
    import envs
    model, tok = tiny
    tasks = envs.make("webshop", "train", n=5, seed=0)

    def play(partial=None, temperature=1.0):
        g = torch.Generator().manual_seed(3)  # the same seed a rerun starts from, as train_iterations does
        return AG.rollout(model, tok, "webshop", tasks, temperature, 1.0, 8, batch=2, generator=g, partial=partial)
    whole = play()
    path = str(tmp_path / "run" / "partial.pt")
    assert _killed_after_two_saves(play, path, monkeypatch) == [2, 4] and RT.partial_seconds(path) > 0
    with pytest.raises(SystemExit, match=re.escape(f"{path} keeps part of other work (different sampling)")):
        play(path, temperature=0.5)  # other settings: the kept batches are neither reused nor overwritten
    assert torch.load(path, weights_only=False)["done"] == 4
    widths, gen = [], G.generate

    def counted(model, prompts, *a, **k):
        widths.append(len(prompts))
        return gen(model, prompts, *a, **k)
    monkeypatch.setattr(G, "generate", counted)
    resumed = play(path)
    assert widths[0] == 1  # only the fifth task is played again
    assert len({json.dumps(r["conversations"]) for r in whole}) > 1  # sampled, not one repeated answer
    assert [(r["conversations"], r["reward"], r["steps"]) for r in resumed] == \
        [(r["conversations"], r["reward"], r["steps"]) for r in whole]
    RT.drop_partial(path)
    assert not os.path.exists(path)


def test_inspect_resumes_from_partial_records(tiny, tmp_path, monkeypatch):
    """Inspection killed in its third record reruns from that record and returns the step records
    (texts, matches, log-probs) of an uninterrupted inspection."""
    model, tok = tiny
    conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONV]
    recs = [{"id": f"t{i}", "conversations": conv[:2 * (i % 3) + 4]} for i in range(4)]

    def run(partial=None):
        g = torch.Generator().manual_seed(5)
        return S.inspect(model, tok, recs, 2, 1.0, 1.0, 6, g, partial=partial)
    whole = run()
    path = str(tmp_path / "collect-1-partial.pt")
    assert _killed_after_two_saves(run, path, monkeypatch) == [1, 2]  # kept after records 1 and 2, killed in 3
    sampled, practice = [], S.sample_practice

    def counted(model, tok, ids, *a, **k):
        sampled.append(ids)
        return practice(model, tok, ids, *a, **k)
    monkeypatch.setattr(S, "sample_practice", counted)
    resumed = run(path)
    assert len(sampled) == 2  # records 3 and 4 only
    assert len({a["text"] for s in whole for a in s["agent"]}) > 2  # sampled practices
    assert resumed == whole


def test_kept_map_resumes_a_killed_scoring_pass(tmp_path, monkeypatch):
    """A scoring pass killed after its second save reruns only the items left, returns the whole pass's
    results, and its seconds count in partial_seconds; other items are refused; drop_partial removes it."""
    items = [[i, i + 1] for i in range(100)]  # 100 items: a save every 2
    calls = []

    def fn(x):
        calls.append(x[0])
        return torch.tensor(x, dtype=torch.float).sum()
    whole = RT.kept_map(fn, items)
    partial = str(tmp_path / "collect-1-partial.pt")  # the collect's file; the scores are kept beside it
    assert _killed_after_two_saves(lambda p: RT.kept_map(fn, items, p), partial, monkeypatch) == [2, 4]
    assert os.path.exists(tmp_path / "scores-collect-1-partial.pt") and not os.path.exists(partial)
    assert RT.partial_seconds(partial) > 0
    with pytest.raises(SystemExit, match="keeps part of other work"):
        RT.kept_map(fn, items[::-1], partial)
    calls.clear()
    assert RT.kept_map(fn, items, partial) == whole and calls == list(range(4, 100))
    RT.drop_partial(partial)
    assert not os.listdir(tmp_path)


def test_run_config_ignores_the_tiny_shape_only_with_another_preset(tmp_path):
    """A table run records its own defaults for the tiny model's shape (dim 256 ...); the printed script
    command for a smollm2 cell leaves them out, and must still resume that run; with the tiny preset
    the shape is the model, and another one is refused, the option named."""
    run = str(tmp_path)
    S._check_run_config(run, S.Config(preset="smollm2", dim=256, n_layers=4, n_heads=4))
    S._check_run_config(run, S.Config(preset="smollm2"))  # the script's defaults (dim 192 ...): resumes
    with pytest.raises(SystemExit, match="--sft_lr"):  # any other option still counts
        S._check_run_config(run, S.Config(preset="smollm2", sft_lr=1.0))
    tiny = str(tmp_path / "tiny")
    S._check_run_config(tiny, S.Config(preset="tiny", dim=256))
    with pytest.raises(SystemExit, match="--dim 256"):
        S._check_run_config(tiny, S.Config(preset="tiny"))


def test_novice_context_counts_only_for_the_tiny_preset(tmp_path):
    """--max_seq_len shapes only the tiny model (a checkpoint's context is its own), so a SmolLM2 novice
    is found again under another one; a tiny novice is refused, the option named."""
    for preset, kept in [("smollm2", True), ("tiny", False)]:
        out = str(tmp_path / preset)
        os.makedirs(out)
        SFT._check_novice_options(S.Config(preset=preset, out=out), {"epoch": 0}, finished=False)
        made = json.load(open(os.path.join(out, "novice.json")))
        assert made["preset"] == preset and made.get("max_seq_len", 2048) == 2048
        made["max_seq_len"] = 2048  # as recorded by novices made before this rule
        S.envs.write_json(os.path.join(out, "novice.json"), made)
        other = S.Config(preset=preset, out=out, max_seq_len=4096)
        if kept:
            SFT._check_novice_options(other, {"epoch": 1}, finished=True)
        else:
            with pytest.raises(SystemExit, match="made with --max_seq_len 2048, not 4096"):
                SFT._check_novice_options(other, {"epoch": 1}, finished=True)
        with pytest.raises(SystemExit, match="--sft_lr"):  # an SFT option counts with every preset
            SFT._check_novice_options(S.Config(preset=preset, out=out, sft_lr=1.0), {"epoch": 1}, finished=True)
