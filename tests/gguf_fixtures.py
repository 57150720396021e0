"""Writing tiny GGUF files as llama.cpp's converter does, from a Hugging Face model (tests only)."""

from __future__ import annotations

import numpy as np
import torch

import gguf

Q = gguf.GGMLQuantizationType


def byte_vocab_fields(vocab_size: int):
    """(tokens, merges, types): 3 control tokens then single bytes, no merges, for a vocab-`vocab_size` model."""
    from tokenizers.pre_tokenizers import ByteLevel
    tokens = ["<unk>", "<s>", "</s>"] + sorted(ByteLevel.alphabet())[: vocab_size - 3]
    return tokens, [], [3] * 3 + [1] * (len(tokens) - 3)


def _permute(w, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half -> Meta interleaved rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _roundtrip(w, qtype):
    """What a tensor stored as qtype reads back as."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


def write_gguf(path, model, tok_fields, qtype=Q.F32, rope_factors=None, arch="llama", extra=None):
    """Write `model` as llama.cpp would; returns the torch model with the weights as stored."""
    import copy
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    stored = copy.deepcopy(model)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges, types = tok_fields
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors)

    def put(gname, hf_name, permute_heads=None):
        arr = sd[hf_name]
        if permute_heads is not None:
            arr = _permute(arr, heads, permute_heads)
        t = qtype if arr.ndim == 2 else Q.F32  # llama.cpp keeps norms in F32
        if t == Q.F32:
            w.add_tensor(gname, arr)
        elif t == Q.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, t), raw_dtype=t)
        stored.state_dict()[hf_name].copy_(torch.from_numpy(_roundtrip(sd[hf_name], t)))

    put("token_embd.weight", "model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        put(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", heads)
        put(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", kv)
        put(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight")
        put(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight")
        put(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        put(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight")
        put(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight")
        put(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight")
    put("output_norm.weight", "model.norm.weight")
    if not cfg.tie_word_embeddings:
        put("output.weight", "lm_head.weight")
    for name, arr, raw in (extra or []):
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cfg.tie_word_embeddings:
        stored.tie_weights()
    return stored
