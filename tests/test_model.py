"""model.py: parity with transformers, KV-cached generation, scoring, save/load, chat formats, errors."""
import copy
import json
import math
import os

import pytest
import torch

import attention as AT
import generate as G
import model as M
import runtime as RT
import sft as SFT
import stepagent as S
import tokenizer as T

transformers = pytest.importorskip("transformers")

V = 300


def _hf_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    small = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=256)
    return {
        "llama-gqa-tied": LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True),
        "llama-mqa-untied-llama3rope": LlamaConfig(
            **small, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "llama-linear-rope-bias": LlamaConfig(**small, num_key_value_heads=4, attention_bias=True,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "mistral-headdim": MistralConfig(**small, num_key_value_heads=2, sliding_window=None, head_dim=24),
        "qwen2-bias": Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=False),
        "llama-swish": LlamaConfig(**small, num_key_value_heads=2, hidden_act="swish"),  # transformers' other silu
    }


def _save_word_tokenizer(d):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0")).save(os.path.join(d, "tokenizer.json"))


def _hf_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    # transformers initialises biases to zero and norms to one: perturb them so parity tests see them
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_parity_with_transformers_both_ways(name, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = _hf_model(_hf_configs()[name])
    hf.save_pretrained(tmp_path / "theirs")
    _save_word_tokenizer(tmp_path / "theirs")
    ours, tok = M.load_model(str(tmp_path / "theirs"))
    x = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max().item() <= 1e-4
        # our save, their load
        M.save_model(ours, tok, str(tmp_path / "ours"))
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
        assert (back(x).logits - ref).abs().max().item() <= 1e-4


def test_sharded_save_roundtrip_and_dtypes(tmp_path):
    hf = _hf_model(_hf_configs()["qwen2-bias"])
    hf.save_pretrained(tmp_path / "a")
    _save_word_tokenizer(tmp_path / "a")
    m, tok = M.load_model(str(tmp_path / "a"))
    M.save_model(m, tok, str(tmp_path / "b"), max_shard_bytes=40_000)
    idx = json.load(open(tmp_path / "b" / "model.safetensors.index.json"))
    assert len(set(idx["weight_map"].values())) > 2
    m2, _ = M.load_model(str(tmp_path / "b"))
    x = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        for dt in ("bf16", "fp16"):
            m3, _ = M.load_model(str(tmp_path / "b"), dtype=dt)
            assert m3.dtype == M.DTYPES[dt]
            assert (m3(x).float() - m(x)).abs().max() < 0.05


def _saved_hf(name, path, edit=None):
    """A perturbed transformers model of _hf_configs()[name] saved in path (config.json edited by `edit`):
    (the folder, transformers' own load of it)."""
    from transformers import AutoModelForCausalLM

    _hf_model(_hf_configs()[name]).save_pretrained(path)
    _save_word_tokenizer(path)
    if edit:
        cfg = json.load(open(path / "config.json"))
        edit(cfg)
        json.dump(cfg, open(path / "config.json", "w"))
    return str(path), AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_llama3_rope_without_original_context_uses_the_configs(tmp_path):
    """llama3 rope scaling without original_max_position_embeddings: transformers takes the config's
    max_position_embeddings in its place, and so do we (the same inverse frequencies and logits)."""
    def drop(cfg):
        for k in ("rope_parameters", "rope_scaling"):
            (cfg.get(k) or {}).pop("original_max_position_embeddings", None)
    d, hf = _saved_hf("llama-mqa-untied-llama3rope", tmp_path, drop)
    ours, _ = M.load_model(d)
    assert torch.allclose(ours.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    x = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_casts_and_to_empty_keep_rope_frequencies_in_fp32():
    """A cast to bf16 would round the inverse frequencies (angles at position 1000 off by up to 0.4 rad), and
    to_empty would leave them unset: both recompute them in fp32, so bf16 differs from fp32 only in the
    cos/sin values' own rounding."""
    args = M.ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                       intermediate_size=64, rope_theta=500000.0, max_seq_len=8192,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 1024})
    exact = M.rope_inv_freq(args)
    for m in (M.Transformer.from_args(args, dtype=torch.bfloat16), M.Transformer.from_args(args).half()):
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, exact)
    with torch.device("meta"):
        empty = M.Transformer(args)
    empty.to_empty(device="cpu")
    assert torch.equal(empty.inv_freq, exact)


def test_mistral_without_sliding_window_has_transformers_default(tmp_path):
    """A Mistral config.json without sliding_window has transformers' default window (4096): a longer
    context is refused, the command-line option named, and loads within it match transformers."""
    def drop(cfg):
        cfg.pop("sliding_window", None)
        cfg["max_position_embeddings"] = 32768
    d, hf = _saved_hf("mistral-headdim", tmp_path, drop)
    window = hf.config.sliding_window
    assert window is not None and window < 32768
    with pytest.raises(ValueError, match=f"'sliding_window' is {window} < context 32768.*--context {window}"):
        M.load_model(d)
    ours, _ = M.load_model(d, max_seq_len=window)
    x = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_saved_dtype_is_what_transformers_auto_loads(tmp_path):
    """A bf16 checkpoint (config.json: dtype bfloat16) loaded in fp32 and saved: config.json names the saved
    dtype wherever transformers looks, so from_pretrained(dtype="auto") gets fp32; saved in bf16, bf16."""
    from transformers import AutoModelForCausalLM

    _hf_model(_hf_configs()["llama-gqa-tied"]).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _save_word_tokenizer(tmp_path / "bf16")
    m, tok = M.load_model(str(tmp_path / "bf16"))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        M.save_model(m.to(dtype), tok, str(tmp_path / name))
        assert AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype="auto").dtype == dtype


def test_scripts_context_option_loads_a_model_with_a_shorter_window(tmp_path):
    """stepagent's --context is the max_seq_len its loads pass: a Mistral whose sliding window (64) is
    shorter than its context (256) is refused with that advice, and loads when it is followed."""

    d, _ = _saved_hf("mistral-headdim", tmp_path, lambda cfg: cfg.update(sliding_window=64))
    with pytest.raises(SystemExit, match="--context 64"):  # one line from every entry point that loads
        SFT.load(d, S.Config())
    model, _ = SFT.load(d, RT.parse_config(S.Config, ["--context", "64", "--max_new_tokens", "8"]))
    assert model.args.max_seq_len == 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama with a trained ChatML byte-level BPE tokenizer."""
    d = str(tmp_path_factory.mktemp("tiny"))
    text = ["Thought: I need red shoes.\nAction: search[red shoes]", "Observation: [SEP] B0A1 [SEP] $12.00",
            "click[Buy Now] the quick brown fox jumps over the lazy dog 0123456789"] * 20
    tok = T.train_tokenizer(text, 400, d)
    args = M.ModelArgs(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=128, max_seq_len=512, tie_embeddings=True)
    model = M.Transformer.from_args(args, seed=0).eval()
    return model, tok


def _greedy_by_full_forwards(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cached_greedy_equals_full_forwards_and_ragged_batch(tiny):
    model, tok = tiny
    prompts = [tok.encode("Thought: I need"), tok.encode("the quick brown fox jumps over"), tok.encode("B0A1")]
    batch, lps = G.generate(model, prompts, 12, stop_ids=[])
    for p, got, lp in zip(prompts, batch, lps):
        assert got == _greedy_by_full_forwards(model, p, 12)
        alone, alone_lp = G.generate(model, [p], 12, stop_ids=[])
        assert alone[0] == got
        assert torch.allclose(torch.tensor(alone_lp[0]), torch.tensor(lp), atol=1e-5)
        # the returned log-probs are the model's own: rescoring the sequence gives the same numbers
        full = torch.tensor([p + got])
        tm = torch.zeros_like(full, dtype=torch.bool)
        tm[0, len(p):] = True
        with torch.no_grad():
            scored = M.token_logprobs(model, full, tm)[0, len(p):]
        assert torch.allclose(scored, torch.tensor(lp), atol=1e-5)


def test_chat_cache_reuses_turns_and_equals_fresh_prefill(tiny):
    """Multi-turn generation through a ChatCache equals a fresh prefill of every prompt: growing
    conversations, an edit in the middle (reuse only up to it), rows leaving, early stops."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    convs = [rnd(n) for n in (5, 37, 12, 60, 21)]
    cache, rows = G.ChatCache(model, 5), list(range(5))
    for turn in range(4):
        fresh, fresh_lp = G.generate(model, convs, 10, stop_ids=[7, 9])
        kept = [list(c) for c in cache.ids]
        got, got_lp = G.generate(model, convs, 10, stop_ids=[7, 9], cache=cache)
        assert got == fresh
        for a, b in zip(got_lp, fresh_lp):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
        assert cache.ids == convs  # the cache now holds exactly the prompts
        if turn:  # the previous prompt was a prefix of this one except where edited
            assert all(len(k) > 0 for k in kept)
        convs = [c + o + rnd(3 + 7 * r) for r, (c, o) in enumerate(zip(convs, got))]
        if turn == 1:
            convs[1] = convs[1][:4] + convs[1][9:]  # dropped turns, as fit_context does
        if turn == 2:
            rows = [0, 2, 4]
            cache.keep(rows)
            convs = [convs[r] for r in rows]
    assert len(cache.ids) == 3
    with pytest.raises(ValueError, match="ChatCache has 3 rows for 2 prompts"):
        G.generate(model, convs[:2], 4, cache=cache)


def test_chat_cache_prefills_rows_in_length_groups(tiny):
    """Rows are prefilled in groups of similar new-token counts (one long re-prefill must not pad
    every row to its length); grouped or not, in any order, the tokens equal a fresh prefill's."""
    model, _ = tiny
    assert G._length_groups([5, 37, 12, 60, 21]) == [[1, 3], [2, 4], [0]]  # 60 37 | 21 12 | 5
    assert G._length_groups([30, 40, 35]) == [[0, 1, 2]]
    g = torch.Generator().manual_seed(2)
    for lengths in ([30, 40, 35], [3, 90, 8, 44]):  # one group, not longest-first; several groups
        prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths]
        fresh, _ = G.generate(model, prompts, 8, stop_ids=[])
        got, _ = G.generate(model, prompts, 8, stop_ids=[], cache=G.ChatCache(model, len(prompts)))
        assert got == fresh


def test_rows_finishing_early_leave_the_other_rows_unchanged(tiny):
    """Finished rows stay in the decode batch until half are done (then the caches are compacted):
    every row's tokens and log-probs still equal those of the row generated alone."""
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():  # larger weights: greedy text that does not repeat one token, so rows stop apart
        for p in model.parameters():
            p.mul_(10 if p.dim() == 2 else 1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in (4, 30, 9, 17, 25, 6)]
    free = [G.generate(model, [p], 12, stop_ids=[])[0][0] for p in prompts]
    stop = [free[0][2], free[3][5], free[5][8]]  # rows 0, 3 and 5 (at least) stop early, at different steps
    alone = [G.generate(model, [p], 12, stop_ids=stop) for p in prompts]
    assert len({len(a[0][0]) for a in alone}) >= 3
    for cache in (None, G.ChatCache(model, len(prompts))):
        got, lps = G.generate(model, prompts, 12, stop_ids=stop, cache=cache)
        for (a_ids, a_lp), ids, lp in zip(alone, got, lps):
            assert ids == a_ids[0]
            assert torch.allclose(torch.tensor(lp), torch.tensor(a_lp[0]), atol=1e-5)


def test_stop_ids_strings_and_early_finish(tiny):
    model, tok = tiny
    p = tok.encode("Thought: I need")
    free, _ = G.generate(model, [p], 20, stop_ids=[])
    # stop at the 4th greedy token's id: output is everything before its first occurrence
    sid = free[0][3]
    cut, _ = G.generate(model, [p], 20, stop_ids=[sid])
    assert cut[0] == free[0][: free[0].index(sid)]
    # a stop string: generation ends at the token that completes it
    text4 = tok.decode(free[0][:4])
    target = text4[-2:] if len(text4.strip()) >= 2 else None
    if target:
        got, _ = G.generate(model, [p, tok.encode("B0A1")], 20, stop=[target], stop_ids=[], tokenizer=tok)
        assert target in tok.decode(got[0]) and len(got[0]) <= 4
        assert target not in tok.decode(got[0][:-1])


def test_sampling_respects_top_k_and_generator(tiny):
    model, tok = tiny
    p = [tok.encode("the quick")]
    g = lambda s: torch.Generator().manual_seed(s)
    a, _ = G.generate(model, p, 8, temperature=1.0, generator=g(3), stop_ids=[])
    b, _ = G.generate(model, p, 8, temperature=1.0, generator=g(3), stop_ids=[])
    assert a == b
    greedy, _ = G.generate(model, p, 8, stop_ids=[])
    k1, _ = G.generate(model, p, 8, temperature=1.0, top_k=1, generator=g(4), stop_ids=[])
    assert k1 == greedy  # top-k 1 is greedy
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    draws = {int(G.sample(logits, 1.0, top_p=0.5, generator=g(i))) for i in range(30)}
    assert draws == {1}  # the smallest set reaching mass 0.5 is the top token alone
    exact = torch.tensor([[0.5, 0.25, 0.25]]).log()  # the top token's mass is exactly top_p (0.5 in float32)
    assert {int(G.sample(exact, 1.0, top_p=0.5, generator=g(i))) for i in range(30)} == {0}
    assert {int(G.sample(exact, 1.0, top_p=0.0, generator=g(i))) for i in range(30)} == {0}
    two = {int(G.sample(exact, 1.0, top_p=0.75, generator=g(i))) for i in range(60)}
    assert len(two) == 2 and 0 in two  # 0.75 is reached by two tokens: the third (tied) is dropped


def test_token_logprobs_matches_log_softmax_and_src(tiny):
    model, _ = tiny
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    tm = torch.zeros(2, 16, dtype=torch.bool)
    tm[0, 5:9] = True
    tm[1, 1:] = True
    with torch.no_grad():
        lp = M.token_logprobs(model, x, tm)
        ref = model(x).log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp[:, 1:][tm[:, 1:]], ref[tm[:, 1:]], atol=1e-5)
    assert (lp[~tm] == 0).all()
    # an explicit src: column 10 predicted from column 3's output
    src = torch.arange(16).expand(2, 16) - 1
    src = src.clone()
    src[0, 10] = 3
    tm2 = torch.zeros(2, 16, dtype=torch.bool)
    tm2[0, 10] = True
    with torch.no_grad():
        lp2 = M.token_logprobs(model, x, tm2, src=src)
        want = model(x)[0, 3].log_softmax(-1)[x[0, 10]]
    assert torch.allclose(lp2[0, 10], want, atol=1e-6)


def test_explicit_mask_and_positions_equal_separate_rows(tiny):
    """Two sequences packed in one row with a block-diagonal mask and restarting positions give
    the same logits as two separate forwards (the basis of stepagent.pack_row's packed rows)."""
    model, _ = tiny
    a = torch.randint(3, 300, (1, 7))
    b = torch.randint(3, 300, (1, 5))
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])
    seg = torch.tensor([0] * 7 + [1] * 5)
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    mask = (causal & (seg[:, None] == seg[None, :]))[None]
    with torch.no_grad():
        packed = model(row, pos, mask)
        assert torch.allclose(packed[:, :7], model(a), atol=1e-5)
        assert torch.allclose(packed[:, 7:], model(b), atol=1e-5)


def test_grad_ckpt_same_logprobs_and_gradients_with_less_stored(tiny):
    """--grad_ckpt: a packed row's log-probs and every gradient are those without it (fp32 and
    under bf16 autocast), while the tensors autograd stores in forward shrink (the blocks'
    activations are recomputed in backward instead)."""

    model, _ = tiny
    model = copy.deepcopy(model).requires_grad_(True)
    traj, spans = list(range(3, 123)), [(20, 30), (60, 72), (100, 110)]
    row = S.pack_row(traj, spans, [(t, [5, 6, 7, 8]) for t in range(3) for _ in range(3)])

    def run(ckpt: bool, amp: str):
        model.grad_ckpt, stored = ckpt, [0]
        model.zero_grad()

        def keep(t):
            stored[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), RT.autocast(model.device, amp):
            (e, c), = S.score_packed(model, [row])
        loss = e.sum() - 2 * c.sum()
        loss.backward()
        return torch.cat([e, c]).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, stored[0]

    for amp in ("none", "bf16"):
        lp, grads, stored = run(False, amp)
        lp2, grads2, stored2 = run(True, amp)
        assert torch.equal(lp, lp2)
        for n in grads:
            assert torch.allclose(grads[n], grads2[n], rtol=1e-5, atol=1e-7), n
        assert stored2 < stored / 2, (stored2, stored)


def test_chat_mask_marks_assistant_turns_only(tiny):
    _, tok = tiny
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "find red shoes"},
            {"role": "assistant", "content": "Thought: search.\nAction: search[red shoes]"},
            {"role": "user", "content": "Observation: ok"}, {"role": "assistant", "content": "Action: click[B0A1]"}]
    ids, mask = tok.encode_chat(msgs)
    assert len(ids) == len(mask)
    got = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert got == "Thought: search.\nAction: search[red shoes]<|im_end|>Action: click[B0A1]<|im_end|>"
    gen, _ = tok.encode_chat(msgs[:2], add_generation_prompt=True)
    assert tok.decode(gen, skip_special=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt,template,special", [
    ("llama3", "{{ '<|start_header_id|>' }}", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("llama2", "{{ '[INST] <<SYS>>' }}", ["<s>", "</s>"]),
    ("plain", "", ["<s>", "</s>"]),
])
def test_other_chat_formats_render_and_mask(fmt, template, special, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello there general kenobi"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    bos, eos = special[0], special[-1]
    json.dump({"bos_token": bos, "eos_token": eos, "chat_template": template},
              open(tmp_path / "tokenizer_config.json", "w"))
    tok = T.Tokenizer(str(tmp_path))
    assert tok.format == fmt
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "general kenobi"}]
    text, _ = tok.render_chat(msgs)
    want = {"llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\ngeneral kenobi<|eot_id|>",
            "llama2": "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello [/INST] general kenobi </s>",
            "plain": "System: be brief\nUser: hello\nAssistant: general kenobi</s>\n"}[fmt]
    assert text == want
    ids, mask = tok.encode_chat(msgs)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False).strip() == \
        "general kenobi" + {"llama3": "<|eot_id|>", "llama2": " </s>", "plain": "</s>"}[fmt]
    assert eos in [tok.decode([i], skip_special=False) for i in tok.stop_ids]


# Chat templates written here in the style of the model families' own (a Qwen2.5 tools branch, Llama 3.0 and
# 3.1, Llama 2, Mistral v0.2 and v0.3): our rendering is checked against transformers' apply_chat_template.
QWEN25_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}"
    "{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
    "{%- endif %}{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
_LLAMA3_TURNS = ("{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
                 " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
                 "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
LLAMA30_STYLE = "{{- bos_token }}" + _LLAMA3_TURNS
LLAMA31_STYLE = (
    "{{- bos_token }}{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message + '<|eot_id|>' }}" + _LLAMA3_TURNS)
LLAMA2_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = false %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}{%- for message in loop_messages %}{%- if loop.index0 == 0 and system_message != false %}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{%- else %}"
    "{%- set content = message['content'] %}{%- endif %}{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + content.strip() + ' ' + eos_token }}{%- endif %}{%- endfor %}")


def _mistral_style(v3: bool) -> str:
    """v0.2: ' [INST] ', the system text in the first user turn; v0.3: '[INST] ', in the chat's last
    message (when a user turn), replies trimmed."""
    o, c = ("[INST] ", "[/INST]") if v3 else (" [INST] ", " [/INST]")
    return ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
            "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
            f"{{%- if loop.{'last' if v3 else 'first'} and system_message is defined %}}"
            f"{{{{- '{o}' + system_message + '\\n\\n' + message['content'] + '{c}' }}}}"
            f"{{%- else %}}{{{{- '{o}' + message['content'] + '{c}' }}}}{{%- endif %}}"
            "{%- elif message['role'] == 'assistant' %}"
            f"{{{{- ' ' + message['content']{' | trim' if v3 else ''} + eos_token }}}}{{%- endif %}}{{%- endfor %}}")


_CHAT_TEXT = ["User: find red shoes\nAssistant: Thought: search.\nAction: search[red shoes]\n be brief  hi there",
              "Observation: ok [SEP] B0A1 $12.00 Action: click[B0A1] You are an agent. general kenobi",
              "<<SYS>> <</SYS>> [INST] [/INST] Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024"]


MISTRAL_V01_FIRST = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                     "{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}"
                     "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                     "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('user and assistant only') }}"
                     "{% endif %}{% endfor %}")  # Mistral-7B-Instruct-v0.1's first template (no system turn)


def _chat_tokenizer(path, template: str, special: list[str], metaspace: bool = False, **config) -> str:
    """A small BPE (byte-level as SmolLM2's, or Metaspace as Llama 2's and Mistral's) with these special
    tokens (bos, ..., eos) and chat template, in a folder both our Tokenizer and transformers read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>" if metaspace else None))
    if metaspace:
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = sorted(set("".join(_CHAT_TEXT)))
    else:
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk.train_from_iterator(_CHAT_TEXT * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=(["<unk>"] if metaspace else []) + special, initial_alphabet=alphabet))
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0], "eos_token": special[-1],
           "chat_template": template, **config}
    json.dump(cfg, open(os.path.join(path, "tokenizer_config.json"), "w"))
    return str(path)


def _hf_chat(hf_tok, msgs, gen: bool, **kw):
    """transformers' rendering of a chat: (text, ids)."""
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, **kw)
    return text, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


_SYS = [{"role": "system", "content": " You are an agent. "}]
_TURNS = [{"role": "user", "content": "  find red shoes"},
          {"role": "assistant", "content": "Thought: search.\nAction: search[red shoes] "},
          {"role": "user", "content": "Observation: ok [SEP] B0A1 $12.00"},
          {"role": "assistant", "content": " Action: click[B0A1]"}]
_CHATS = [_TURNS, _TURNS[:3], _SYS + _TURNS, _SYS + _TURNS[:1], _SYS + _TURNS[:3]]


def _assert_renders_as_transformers(tok, hf_tok, chats=_CHATS, **kw):
    for msgs in chats:
        for gen in (False, True):
            text, ids = _hf_chat(hf_tok, msgs, gen, **kw)
            assert tok.render_chat(msgs, gen)[0] == text, (msgs, gen)
            assert tok.encode_chat(msgs, gen)[0] == ids, (msgs, gen)


def test_default_system_is_the_texts_not_the_templates_code(tmp_path):
    """A Qwen2.5-style template opens a system turn in its tools branch too, around Jinja code: the default
    system prompt is the literal turn's text, and chats without a system message render as transformers'."""
    d = _chat_tokenizer(tmp_path, QWEN25_STYLE, ["<|im_start|>", "<|im_end|>"])
    tok = T.Tokenizer(d)
    assert tok.format == "chatml"
    assert tok.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    _assert_renders_as_transformers(tok, transformers.AutoTokenizer.from_pretrained(d))


def test_chat_template_jinja_is_read_and_kept(tmp_path):
    """transformers >= 5 saves the template as chat_template.jinja, not in tokenizer_config.json: it is read
    (with its default system prompt) and Tokenizer.save keeps it, for us and for transformers."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(_chat_tokenizer(tmp_path / "a", QWEN25_STYLE,
                                                                        ["<|im_start|>", "<|im_end|>"]))
    hf_tok.save_pretrained(tmp_path / "b")
    assert os.path.exists(tmp_path / "b" / "chat_template.jinja")
    assert "chat_template" not in json.load(open(tmp_path / "b" / "tokenizer_config.json"))
    tok = T.Tokenizer(str(tmp_path / "b"))
    _assert_renders_as_transformers(tok, hf_tok)
    os.makedirs(tmp_path / "c")
    tok.save(str(tmp_path / "c"))
    _assert_renders_as_transformers(T.Tokenizer(str(tmp_path / "c")), hf_tok)
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "c")).chat_template == hf_tok.chat_template


def test_llama31_system_block_and_llama30_unchanged(tmp_path):
    """A Llama 3.1/3.2 template ("Cutting Knowledge Date") opens every chat with a system turn holding the
    cutoff and the date (transformers' default date_string, 26 Jul 2024), with or without a system
    message; a Llama 3.0 template has none. Both as transformers renders them."""
    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    for name, template in (("31", LLAMA31_STYLE), ("30", LLAMA30_STYLE)):
        d = _chat_tokenizer(tmp_path / name, template, special)
        tok = T.Tokenizer(d)
        assert tok.format == "llama3"
        _assert_renders_as_transformers(tok, transformers.AutoTokenizer.from_pretrained(d), date_string="26 Jul 2024")
        assert ("Cutting Knowledge Date" in tok.render_chat(_TURNS[:1])[0]) == (name == "31")


def test_llama2_template_renders_as_transformers(tmp_path):
    """Llama 2's template (<<SYS>>) is the llama2 format, whitespace kept and stripped as the template does
    (the first user turn's leading spaces stay after the system block)."""
    d = _chat_tokenizer(tmp_path, LLAMA2_STYLE, ["<s>", "</s>"], metaspace=True)
    tok = T.Tokenizer(d)
    assert tok.format == "llama2"
    _assert_renders_as_transformers(tok, transformers.AutoTokenizer.from_pretrained(d))


def test_mistral_templates_render_as_transformers(tmp_path):
    """Mistral's [INST] templates (no <<SYS>>; v0.2 and v0.3 spacing and system placement) are the mistral
    format, not Llama 2's; the reply's tokens (space, content, eos) are exactly what follows the
    generation prompt's tokens, and exactly the assistant mask there."""
    for v3 in (False, True):
        d = _chat_tokenizer(tmp_path / f"v{int(v3)}", _mistral_style(v3), ["<s>", "</s>"], metaspace=True)
        tok = T.Tokenizer(d)
        assert tok.format == "mistral"
        _assert_renders_as_transformers(tok, transformers.AutoTokenizer.from_pretrained(d))
        # v0.3 moves the system text to the last message: with one, a prompt is no prefix of its reply's chat
        for prior in ([_TURNS[:1], _TURNS[:3]] + ([] if v3 else [_SYS + _TURNS[:1], _SYS + _TURNS[:3]])):
            prompt, prompt_mask = tok.encode_chat(prior, add_generation_prompt=True)
            full, mask = tok.encode_chat(prior + [_TURNS[1]])
            assert full[:len(prompt)] == prompt and mask == prompt_mask + [1] * (len(full) - len(prompt))
    # v0.1's first template: no space before a reply, one after its eos (not the reply's: unmasked)
    tok = T.Tokenizer(_chat_tokenizer(tmp_path / "v01", MISTRAL_V01_FIRST, ["<s>", "</s>"], metaspace=True))
    assert tok.format == "mistral"
    _assert_renders_as_transformers(tok, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "v01")),
                                    chats=[_TURNS, _TURNS[:3], _TURNS[:1]])
    text, spans = tok.render_chat(_TURNS)
    assert [text[a:b] for a, b in spans] == [m["content"] + "</s>" for m in _TURNS[1::2]] and text.endswith("</s> ")


def test_plain_generation_prompt_is_a_token_prefix_of_the_chat(tmp_path):
    """The plain format's generation prompt "Assistant:" leaves the space to the reply, which a tokenizer
    merges into its first word: the prompt's ids are a prefix of the chat with the reply, and the reply's
    tokens (space, content, eos) are exactly the assistant mask."""
    tok = T.Tokenizer(_chat_tokenizer(tmp_path, "", ["<s>", "</s>"], chat_format="plain"))
    assert tok.format == "plain"
    for prior in (_TURNS[:1], _SYS + _TURNS[:3]):
        prompt, prompt_mask = tok.encode_chat(prior, add_generation_prompt=True)
        full, mask = tok.encode_chat(prior + [_TURNS[1]])
        assert full[:len(prompt)] == prompt
        assert mask == prompt_mask + [1] * (len(full) - len(prompt) - 1) + [0]  # the reply, then its newline
        assert tok.decode(full[len(prompt):], skip_special=False) == " " + _TURNS[1]["content"] + "</s>\n"


# ----------------------------------------------------------------------------- bad inputs


def _good_dir(tmp_path):
    hf = _hf_model(_hf_configs()["llama-gqa-tied"])
    hf.save_pretrained(tmp_path)
    _save_word_tokenizer(tmp_path)
    return tmp_path


def test_bad_inputs_name_the_problem(tmp_path):
    d = _good_dir(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        M.load_model(str(tmp_path / "nowhere"))
    cfg = json.load(open(d / "config.json"))
    # unknown model_type
    json.dump({**cfg, "model_type": "gpt2"}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="'model_type' is 'gpt2'"):
        M.load_model(str(d))
    json.dump({**cfg, "hidden_act": "gelu"}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="'hidden_act'"):
        M.load_model(str(d))
    json.dump({**cfg, "model_type": "mistral", "sliding_window": 16}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="'sliding_window' is 16"):
        M.load_model(str(d))
    # wrong shape: a config whose sizes disagree with the weights
    json.dump({**cfg, "intermediate_size": 96}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"wrong shape: .*mlp.down_proj.weight"):
        M.load_model(str(d))
    json.dump({**cfg, "num_hidden_layers": 3}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"missing: model.layers.2"):
        M.load_model(str(d))
    json.dump({**cfg, "num_hidden_layers": 1}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"unexpected: model.layers.1"):
        M.load_model(str(d))
    json.dump(cfg, open(d / "config.json", "w"))
    M.load_model(str(d))  # restored: loads again
    # missing tokenizer
    os.rename(d / "tokenizer.json", d / "tok.bak")
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        M.load_model(str(d))
    os.rename(d / "tok.bak", d / "tokenizer.json")
    # truncated safetensors
    st = d / "model.safetensors"
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors"):
        M.load_model(str(d))
    os.remove(st)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_model(str(d))


def test_save_is_atomic_over_an_existing_checkpoint(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    M.save_model(model, tok, str(tmp_path / "ck"))
    before = open(tmp_path / "ck" / "model.safetensors", "rb").read()

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupt in the middle of writing the new checkpoint

    monkeypatch.setattr(T.Tokenizer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        M.save_model(model, tok, str(tmp_path / "ck"))
    assert open(tmp_path / "ck" / "model.safetensors", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp folder left behind


def test_a_save_killed_between_its_renames_is_restored(tiny, tmp_path, monkeypatch):
    """save_model swaps the new folder in by two renames; killed between them, the old checkpoint sits
    in .ck.old-*: restore_checkpoint (called before every resume and by the next save) moves it back,
    and a later save leaves no leftovers."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]  # its weights change below; the fixture is the module's
    ck = str(tmp_path / "ck")
    M.save_model(model, tok, ck, extra={"trainer_state.json": {"step": 1}})
    before = open(os.path.join(ck, "model.safetensors"), "rb").read()
    rename, calls = os.rename, []

    def second_fails(a, b):
        calls.append(a)
        if len(calls) == 2:  # path -> .old-* went through; .tmp-* -> path is where the kill lands
            raise KeyboardInterrupt
        rename(a, b)

    monkeypatch.setattr(M.os, "rename", second_fails)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # other weights, so the restored file is seen to be the old one
    with pytest.raises(KeyboardInterrupt):
        M.save_model(model, tok, ck, extra={"trainer_state.json": {"step": 2}})
    monkeypatch.undo()
    assert not os.path.exists(ck) and [n[:8] for n in os.listdir(tmp_path)] == [".ck.old-"]
    M.restore_checkpoint(ck)
    assert open(os.path.join(ck, "model.safetensors"), "rb").read() == before
    assert json.load(open(os.path.join(ck, "trainer_state.json"))) == {"step": 1} and os.listdir(tmp_path) == ["ck"]
    os.makedirs(tmp_path / ".ck.tmp-left")  # a save killed while writing, before its renames
    M.save_model(model, tok, ck, extra={"trainer_state.json": {"step": 2}})
    assert os.listdir(tmp_path) == ["ck"] and json.load(open(os.path.join(ck, "trainer_state.json"))) == {"step": 2}
    M.restore_checkpoint(str(tmp_path / "absent" / "ck"))  # nothing there: nothing to do


def test_bench_peak_names_the_card():
    import bench_train as bench  # the training bench's FLOP counts and peaks
    assert bench.peak_bf16("NVIDIA H100 80GB HBM3") == bench.peak_bf16("NVIDIA H200") == 989e12  # SXM
    assert bench.peak_bf16("NVIDIA H100 PCIe") == 756e12 and bench.peak_bf16("NVIDIA H100 NVL") == 835e12
    assert bench.peak_bf16("NVIDIA H200 NVL") == 835e12 and bench.peak_bf16("cpu") is None


def test_bench_train_flops_equal_torchs_count():
    """bench.py train's MFU numerator: the formula equals torch's own count of the matrix products
    of a forward+backward (math attention, so the attention products are counted too), for an SFT
    batch and for padded packed step-DPO rows (GQA, a partial target mask)."""
    import bench_train as bench  # the training bench's FLOP counts and peaks
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    args = M.ModelArgs(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=96, tie_embeddings=True, max_seq_len=512)
    m = M.Transformer.from_args(args)

    def counted(fn):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            fn().backward()
        return fc.get_total_flops()

    x = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    tm = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    tm[:, 0] = False
    assert counted(lambda: SFT.sft_loss(m, x, tm)) == bench.train_flops(args, [40] * 3, int(tm.sum()))
    traj, spans = list(range(3, 63)), [(10, 15), (30, 36), (50, 55)]
    cands = [(t, [5, 6, 7]) for t in range(3) for _ in range(2)]
    rows = [S.pack_row(traj, spans, cands), S.pack_row(traj[:30], spans[:1], cands[:2])]
    N = max(len(r[0]) for r in rows)  # the shorter row is padded to N: the counted work
    n_targets = sum(int(r[3].sum()) for r in rows)
    got = counted(lambda: sum(e.sum() + c.sum() for e, c in S.score_packed(m, rows, slack=math.inf)))
    scores = bench.block_scores(AT.pad_rows(rows, "cpu")[3])  # the trajectory blocks and the candidates'
    assert scores == 60 * 60 + 18 * (50 + 18) + 30 * 30 + 6 * (10 + 6) < 2 * N * N  # 6 candidates seeing up to step 2
    assert got == bench.train_flops(args, [N] * len(rows), n_targets, scores)


def test_importing_model_flushes_denormals_in_every_cpu_thread():
    """model.py turns on flush-to-zero at import, so torch's worker threads, started later, copy it:
    a product below float32's smallest normal (1e-20 squared) comes out 0 in every element of a
    two-thread elementwise op, whichever thread computed it (set after the threads start, only the
    calling thread's share would). Without the import the same op keeps the denormals (the control)."""
    import subprocess
    import sys

    code = "import torch{}; torch.set_num_threads(2); print(int((torch.full((1 << 22,), 1e-20) ** 2 != 0).sum()))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def nonzero(imports):
        return int(subprocess.run([sys.executable, "-c", code.format(imports)], cwd=root, capture_output=True,
                                  text=True, check=True).stdout)

    assert nonzero("") == 1 << 22  # this CPU keeps denormals unless told otherwise
    assert nonzero(", model") == 0
