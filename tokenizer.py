"""The tokenizer: `tokenizers` plus a checkpoint's special tokens and chat format (ChatML, Llama 3,
Llama 2, Mistral, plain), with the assistant-token mask SFT and scoring need; `train_tokenizer`
makes the tiny preset's byte-level BPE."""
from __future__ import annotations

import json
import os
import re

CHAT_FORMATS = ("chatml", "llama3", "llama2", "mistral", "plain")


def _token_str(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    """`tokenizers.Tokenizer` plus the checkpoint's special tokens and chat format."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{tj}: missing tokenizer (this project reads tokenizer.json only)")
        try:
            self.tk = HFTokenizer.from_file(tj)
        except Exception as e:
            raise ValueError(f"{tj}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        cfg_path = os.path.join(path, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        self.template = self.config.get("chat_template") or ""
        if isinstance(self.template, list):  # several named templates: take the default
            self.template = next((t["template"] for t in self.template if t.get("name") == "default"), "")
        jinja = os.path.join(path, "chat_template.jinja")  # where transformers >= 5 saves it
        if not self.template and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                self.template = f.read()
        vocab = self.tk.get_vocab()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_id = vocab.get(self.bos_token) if self.bos_token else None
        self.eos_id = vocab.get(self.eos_token) if self.eos_token else None
        pad = _token_str(self.config.get("pad_token"))
        self.pad_id = vocab.get(pad, self.eos_id) if pad else (self.eos_id if self.eos_id is not None else 0)
        self.format = self.config.get("chat_format") or self._detect_format(vocab)
        if self.format not in CHAT_FORMATS:
            raise ValueError(f"{cfg_path}: field 'chat_format' is {self.format!r}; choose from {CHAT_FORMATS}")
        end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": self.eos_token}.get(self.format)
        self.end_of_turn = end if end in vocab else self.eos_token
        self.stop_ids = sorted({i for i in (self.eos_id, vocab.get(self.end_of_turn or "")) if i is not None})
        t = self.template
        # the text of a literal system turn (SmolLM2's, Qwen2's default); no quotes or braces, so not Jinja code
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]*?)<\|im_end\|>", t)
        self.default_system = m.group(1) if (m and self.format == "chatml") else None
        # Llama 3.1+: a system turn always, opening with the knowledge cutoff and the date (transformers'
        # default date_string; 3.2's template reads the clock, pinned here so a chat renders the same every day)
        m = re.search(r"Cutting Knowledge Date: ([^'\"{}\\\n]*)", t)
        self.system_prefix = f"Cutting Knowledge Date: {m.group(1)}\nToday Date: 26 Jul 2024\n\n" \
            if (m and self.format == "llama3") else None
        # Mistral's templates differ in spacing, in trimming replies, in which user turn holds the system
        # text (v0.2: the first; v0.3: the chat's last message, if a user turn) and, in v0.1's first
        # template (and old GGUF files'), in a reply with no space before it and one after its eos
        self.mistral = (" [INST] " if re.search(r"""['"] \[INST\] """, t) else "[INST] ",
                        " [/INST]" if " [/INST]" in t else "[/INST]", "loop.last and system_message" in t,
                        bool(re.search(r"""content['"]\]\s*\|\s*trim""", t)),
                        bool(re.search(r"""eos_token\s*\+\s*['"] ['"]""", t))) if self.format == "mistral" else None

    def _detect_format(self, vocab) -> str:
        t = self.template
        if "<|im_start|>" in t or (not t and "<|im_start|>" in vocab):
            return "chatml"
        if "<|start_header_id|>" in t or (not t and "<|start_header_id|>" in vocab):
            return "llama3"
        if "[INST]" in t:  # Llama 2 folds the system text into <<SYS>>; Mistral has no such tags
            return "llama2" if "<<SYS>>" in t else "mistral"
        return "plain"

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if (bos and self.bos_id is not None) else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False):
        """The chat as text, plus the (start, end) character spans of the assistant turns (content
        and end-of-turn token: what the model must learn to produce)."""
        text, spans = "", []
        msgs = list(messages)
        if self.default_system and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": self.default_system}] + msgs

        def add(s, assistant=False):
            nonlocal text
            if assistant:
                spans.append((len(text), len(text) + len(s)))
            text += s

        f = self.format
        if f in ("llama3", "mistral"):
            add(self.bos_token or "")
        if f == "llama3" and self.system_prefix is not None:  # Llama 3.1+: a system turn in every chat
            own = msgs.pop(0)["content"].strip() if msgs and msgs[0]["role"] == "system" else ""
            add(f"<|start_header_id|>system<|end_header_id|>\n\n{self.system_prefix}{own}<|eot_id|>")
        sys_msg = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        for i, m in enumerate(msgs):
            role, content, is_a = m["role"], m["content"], m["role"] == "assistant"
            if f == "chatml":
                add(f"<|im_start|>{role}\n")
                add(content + "<|im_end|>", is_a) if is_a else add(content + "<|im_end|>")
                add("\n")
            elif f == "llama3":
                add(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
                add(content.strip() + "<|eot_id|>", is_a) if is_a else add(content.strip() + "<|eot_id|>")
            elif f == "llama2":
                if role == "system":
                    continue  # folded into the first user turn below
                if is_a:
                    add(f" {content.strip()} {self.eos_token}", True)
                else:
                    body = f"<<SYS>>\n{sys_msg}\n<</SYS>>\n\n{content}" if (sys_msg is not None and i == 1) else content
                    add(f"{self.bos_token}[INST] {body.strip()} [/INST]")
            elif f == "mistral":
                inst, end, sys_last, trim, v01 = self.mistral
                if role == "system":
                    continue  # opens a user turn below
                if is_a:  # the space too (v0.2+): it is what follows the prompt
                    add(("" if v01 else " ") + (content.strip() if trim else content) + (self.eos_token or ""), True)
                    add(" " if v01 else "")
                else:
                    here = sys_msg is not None and i == (len(msgs) - 1 if sys_last else 1)
                    add(inst + (f"{sys_msg}\n\n" if here else "") + content + end)
            elif is_a:  # plain: role-labelled lines, the end-of-turn token after each assistant turn
                add("Assistant:")  # the space is the reply's: tokenizers merge it into its first word, so the
                # generation prompt "Assistant:" is a token prefix of the chat
                add(f" {content}{self.eos_token or ''}", True)
                add("\n")
            else:
                add(f"{role.capitalize()}: {content}\n")
        if add_generation_prompt:
            add({"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 "llama2": "", "mistral": "", "plain": "Assistant:"}[f])
        return text, spans

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False):
        """(ids, mask): token ids of the formatted chat and a 0/1 mask of the assistant tokens."""
        text, spans = self.render_chat(messages, add_generation_prompt)
        enc = self.tk.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        j = 0
        for i, (s, e) in enumerate(enc.offsets):  # a token overlapping an assistant span is trained
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and s < spans[j][1] and e > spans[j][0]:
                mask[i] = 1
        return enc.ids, mask

    def save(self, path: str) -> None:
        self.tk.save(os.path.join(path, "tokenizer.json"))
        cfg = dict(self.config)
        cfg.setdefault("chat_format", self.format)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)
        if self.template and not cfg.get("chat_template"):  # it came from chat_template.jinja: so it goes back
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.template)


CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
                   " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def train_tokenizer(texts, vocab_size: int, path: str, whole: list[str] = ()) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, as SmolLM2) trained on `texts`, with ChatML special tokens,
    saved as tokenizer.json + tokenizer_config.json in `path`: the tiny preset's tokenizer.
    Each string in `whole` (e.g. webshop product IDs) becomes one added token, on top of vocab_size."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.add_tokens([AddedToken(w, normalized=False) for w in whole])
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "chat_template": CHATML_TEMPLATE, "chat_format": "chatml", "model_max_length": 4096}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return Tokenizer(path)
