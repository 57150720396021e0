"""Tokenizers: sentencepiece `tokenizer.model`, Hugging Face `tokenizer.json`, or one built in memory.

All share one small interface so the batcher never cares where the vocabulary came from.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence


class Tokenizer:
    """encode/decode plus the special ids and the chat template."""

    bos_id: Optional[int] = None
    eos_ids: tuple = ()
    add_bos: bool = True
    chat_template: Optional[str] = None

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def max_token_chars(self) -> int:
        """The most characters one token stands for: the length of its longest vocabulary entry
        (an upper bound of a token's text), computed once. It bounds the characters a prompt of
        context_size tokens can have, so an oversized prompt is refused without tokenizing it."""
        if getattr(self, "_max_chars", None) is None:
            self._max_chars = max(1, max((len(self.token_text(i)) for i in range(self.vocab_size)), default=1))
        return self._max_chars

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render role/content messages with the model's chat template (Jinja, as transformers does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        bos = self.token_text(self.bos_id) if self.bos_id is not None else ""
        eos = self.token_text(self.eos_ids[0]) if self.eos_ids else ""
        return self._compiled_template().render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_template_cache", None)  # a compiled Jinja template does not pickle: compiled again
        return state

    def _compiled_template(self):
        """The chat template compiled once per template text: compiling takes about as long as a
        whole row's validation otherwise, and every row renders with the same template."""
        cached = getattr(self, "_template_cache", None)
        if cached is None or cached[0] != self.chat_template:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            cached = self._template_cache = (self.chat_template, env.from_string(self.chat_template))
        return cached[1]


# What a tokenizer file may weigh before its parser allocates for it: the largest public ones are
# ~35 MB (tokenizer.json of 256k-token vocabularies), ~4 MB (sentencepiece) and well under 1 MB
# (tokenizer_config.json with its chat template).
MAX_BYTES = {"tokenizer": 512 << 20, "sentencepiece model": 128 << 20, "tokenizer config": 32 << 20}


def _read_bounded(path: str, what: str, parse):
    """parse(path), after checking the file's size; CheckpointError naming the file otherwise."""
    from engine.checkpoint import CheckpointError
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    if size > MAX_BYTES[what]:
        raise CheckpointError(f"{path}: {what} file of {size:,} bytes, over the {MAX_BYTES[what]:,} accepted")
    try:
        return parse(path)
    except CheckpointError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: unreadable {what} ({type(e).__name__}: {first})") from None


def _read_config(path: str) -> dict:
    """tokenizer_config.json as a dict (bounded; CheckpointError naming it if it is not one)."""
    from engine.checkpoint import CheckpointError
    from engine.settings import read_json_object
    return read_json_object(path, CheckpointError, MAX_BYTES["tokenizer config"])


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str, chat_template: Optional[str] = None):
        import sentencepiece as spm
        self.sp = _read_bounded(path, "sentencepiece model", lambda p: spm.SentencePieceProcessor(model_file=p))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = (self.sp.eos_id(),) if self.sp.eos_id() >= 0 else ()
        self.chat_template = chat_template

    def _encode(self, text):
        return list(self.sp.encode(text))

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, token_id):
        return self.sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built by a loader) plus its special ids."""

    def __init__(self, tok, bos_id=None, eos_ids=(), add_bos: bool = True,
                 chat_template: Optional[str] = None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str) -> "HFTokenizer":
        """tokenizer.json, with special ids and chat template from tokenizer_config.json when present."""
        from tokenizers import Tokenizer as _Tok
        tok = _read_bounded(os.path.join(directory, "tokenizer.json"), "tokenizer", _Tok.from_file)
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        cfg = _read_config(cfg_path) if os.path.exists(cfg_path) else {}

        def special(name):
            v = cfg.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if isinstance(v, str) else None

        bos = special("bos_token")
        eos = special("eos_token")
        # A tokenizer.json whose post-processor already adds BOS must not get a second one;
        # encode() only prepends when the first id is not BOS.
        add_bos = bool(cfg.get("add_bos_token", bos is not None))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, bos_id=bos, eos_ids=(eos,) if eos is not None else (), add_bos=add_bos,
                   chat_template=template)

    def _encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id):
        return self.tok.id_to_token(int(token_id)) or ""

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()


def load_tokenizer(path: Optional[str]) -> Optional[Tokenizer]:
    """A tokenizer from a file or a model directory; None when there is none (token-id requests only)."""
    if not path:
        return None
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_dir(path)
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            template = None
            cfg_path = os.path.join(path, "tokenizer_config.json")
            if os.path.exists(cfg_path):
                template = _read_config(cfg_path).get("chat_template")
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"), chat_template=template)
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        return HFTokenizer.from_dir(os.path.dirname(path) or ".") if os.path.basename(path) == "tokenizer.json" \
            else HFTokenizer(_read_bounded(path, "tokenizer", __import__("tokenizers").Tokenizer.from_file))
    return SentencePieceTokenizer(path)
