"""Tiny random Hugging Face checkpoints for tests (hidden 64, 2 layers, vocab 256).

`save_tiny_model` writes a real `save_pretrained` directory, so loaders are tested against
what transformers actually emits (file names, index layout, config keys of this version),
not against our own idea of it. Weights are re-drawn at a scale where every layer moves the
logits by O(1): with HF's default init (std 0.02) attention and MLP contribute so little
that a wrong rotary layout or a swapped norm would hide under any sensible tolerance.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch

VOCAB = 256


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_gemma_config(**overrides):
    from transformers import GemmaConfig
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return GemmaConfig(**kw)


def tiny_gemma2_config(**overrides):
    """Gemma 2 with every switch biting on 10-token prompts: window 4 < prompt, small soft-caps,
    query_pre_attn_scalar != head_dim; eager attention (the one that soft-caps in transformers)."""
    from transformers import Gemma2Config
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0, sliding_window=4, attn_implementation="eager")
    kw.update(overrides)
    return Gemma2Config(**kw)


def tiny_mistral_config(**overrides):
    """Mistral with its sliding window biting on 10-token prompts (window 4); eager attention."""
    from transformers import MistralConfig
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              sliding_window=4, attn_implementation="eager")
    kw.update(overrides)
    return MistralConfig(**kw)


def randomize_(model, seed: int = 0, gemma_norms: bool = False):
    """Re-draw every weight: matrices N(0, 1/fan_in), embeddings N(0, 1), norms 1 + N(0, 0.1)
    (Gemma stores w for a (1 + w) scale, so just N(0, 0.1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1:
                p.copy_(0.1 * noise + (0.0 if gemma_norms else 1.0))
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)
    return model


def build_model(config, seed: int = 0):
    """A float32 `*ForCausalLM` with randomized weights, in eval mode."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize_(model, seed, gemma_norms=config.model_type in ("gemma", "gemma2")).eval()


def save_tiny_model(path, config, seed: int = 0, dtype=torch.float32,
                    max_shard_size: Optional[str] = None, tokenizer: bool = False):
    """Build, randomize and `save_pretrained` a tiny model into `path`; returns the float32 model."""
    model = build_model(config, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    to_save = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    to_save.save_pretrained(str(path), safe_serialization=True, **kw)
    if tokenizer:
        save_tiny_tokenizer(path)
    return model


def save_tiny_tokenizer(path, chat_template: Optional[str] = None):
    """A byte-level BPE tokenizer with no merges (one token per byte) filling ids 0..255:
    0 <unk>, 1 <s>, 2 </s>, then 253 byte symbols (ASCII text round-trips exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[: VOCAB - len(specials)]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(str(path), "tokenizer.json"))
    template = chat_template or (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with open(os.path.join(str(path), "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                   "chat_template": template}, f)


def safetensors_header(path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), read directly."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h
