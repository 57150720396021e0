"""Hugging Face safetensors loader: logits parity with transformers, sharding, bf16, errors.

Each case saves a tiny random `*ForCausalLM` with `save_pretrained`, loads it through
`open_checkpoint` + `load_params`, and compares `prefill(..., all_logits=True)` against
transformers' float32 forward at every position. Tolerance: max |ours - ref| <= 1e-4 *
max |ref| (float32 on both sides; observed errors are <= 5e-7 of the logit scale).
"""

import json
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_fixtures import (safetensors_header, save_tiny_model, tiny_gemma2_config, tiny_gemma_config,
                         tiny_llama_config, tiny_mistral_config)
from engine.loaders import CheckpointError, open_checkpoint
from engine.loaders.hf import load_hf
from engine.model import prefill
from engine.sharding import make_mesh
from engine.weights import load_params

REL_TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # with head_dim 16: high, medium and low bands

CASES = {
    "llama_mha": lambda: tiny_llama_config(num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": lambda: tiny_llama_config(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "llama_tied": lambda: tiny_llama_config(tie_word_embeddings=True),
    "llama3_rope": lambda: tiny_llama_config(rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE)),
    "gemma": lambda: tiny_gemma_config(),
    "gemma2": lambda: tiny_gemma2_config(),
    "mistral_window": lambda: tiny_mistral_config(),
}


def _tokens(seed=0, n=3, s=10):
    return np.random.default_rng(seed).integers(3, 256, size=(n, s), dtype=np.int32)


def _reference(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _ours(path, tokens):
    ckpt = open_checkpoint(str(path))
    cfg = ckpt.config
    params = load_params(cfg, ckpt, make_mesh("cpu"), jnp.float32, quantize=False)
    fwd = jax.jit(lambda p, t: prefill(p, cfg, t, jnp.float32, all_logits=True)[0])
    return ckpt, np.asarray(fwd(params, jnp.asarray(tokens)))


def _assert_close(ours, ref):
    assert ours.shape == ref.shape
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= REL_TOL * scale, f"max |diff| {err:.3g} > {REL_TOL} * logit scale {scale:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model = save_tiny_model(tmp_path, CASES[case](), seed=1)
    tokens = _tokens()
    ckpt, ours = _ours(tmp_path, tokens)
    assert ckpt.format == "hf"
    if case == "llama3_rope":
        assert ckpt.config.rope_scaling and ckpt.config.rope_scaling["factor"] == 8.0
    if case == "gemma":
        assert ckpt.config.family == "gemma" and ckpt.config.tie_embeddings
    if case == "mistral_window":
        assert ckpt.config.sliding_window == 4 and ckpt.config.sliding_layers == (0, 1)
    if case == "gemma2":
        c = ckpt.config
        assert c.post_norms and c.sliding_window == 4 and c.sliding_layers == (0, 2)
        assert c.attn_logit_softcap == 5.0 and c.final_logit_softcap == 3.0 and c.query_scale == 24
    _assert_close(ours, _reference(model, tokens))


def test_bf16_checkpoint(tmp_path):
    """bf16 on disk is read bit-exact: compare with transformers loading the same file as f32."""
    from transformers import AutoModelForCausalLM
    save_tiny_model(tmp_path, tiny_llama_config(), seed=2, dtype=torch.bfloat16)
    header_dtypes = {v["dtype"] for k, v in safetensors_header(tmp_path / "model.safetensors").items()}
    assert header_dtypes == {"BF16"}
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = _tokens(1)
    _, ours = _ours(tmp_path, tokens)
    _assert_close(ours, _reference(ref_model, tokens))


def test_sharded_checkpoint_and_tokenizer(tmp_path):
    model = save_tiny_model(tmp_path, tiny_llama_config(), seed=3, max_shard_size="40KB", tokenizer=True)
    with open(tmp_path / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2
    tokens = _tokens(2)
    ckpt, ours = _ours(tmp_path, tokens)
    _assert_close(ours, _reference(model, tokens))
    tok = ckpt.tokenizer
    ids = tok.encode("hello world")
    assert ids[0] == 1 and max(ids) < 256 and tok.decode(ids) == "hello world"


def test_no_tokenizer_is_none(tmp_path):
    save_tiny_model(tmp_path, tiny_llama_config(num_hidden_layers=1), seed=0)
    assert load_hf(str(tmp_path)).tokenizer is None


# --- errors: each names the offending file (and tensor, where there is one) ---------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    save_tiny_model(path, tiny_llama_config(num_hidden_layers=1), seed=4, max_shard_size="40KB")
    return path


def test_missing_shard(sharded_dir, tmp_path):
    path = shutil.copytree(sharded_dir, tmp_path / "m")
    with open(path / "model.safetensors.index.json") as f:
        victim = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(path / victim)
    with pytest.raises(CheckpointError, match=victim):
        open_checkpoint(str(path))


@pytest.mark.parametrize("keep", ["data", "header"])
def test_truncated_file(sharded_dir, tmp_path, keep):
    path = shutil.copytree(sharded_dir, tmp_path / "m")
    victim = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]
    size = os.path.getsize(path / victim)
    with open(path / victim, "r+b") as f:
        f.truncate(size - 100 if keep == "data" else 20)
    with pytest.raises(CheckpointError, match=rf"{victim}.*truncated"):
        open_checkpoint(str(path))


def test_missing_tensor(sharded_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    path = shutil.copytree(sharded_dir, tmp_path / "m")
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    file = index["weight_map"].pop("model.layers.0.mlp.up_proj.weight")
    tensors = load_file(str(path / file))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        open_checkpoint(str(path))


def test_unsupported_model_type(sharded_dir, tmp_path):
    path = shutil.copytree(sharded_dir, tmp_path / "m")
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"config\.json.*gpt2"):
        open_checkpoint(str(path))


def test_missing_config(sharded_dir, tmp_path):
    path = shutil.copytree(sharded_dir, tmp_path / "m")
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_hf(str(path))


def test_mistral_window_in_decode_equals_transformers_generate(tmp_path):
    """Mistral's window (4 positions, every layer) holds through the engine's cache as decoding
    passes it: greedy tokens equal transformers' generate. A window that spans the whole cache
    masks nothing and is dropped, which leaves the fused attention paths open."""
    from engine.batcher import ContinuousBatcher
    from engine.config import make_settings
    from engine.llm import load_engine
    from engine.request import Request, SamplingParams
    model = save_tiny_model(tmp_path, tiny_mistral_config(), seed=3)
    prompt = [1, 40, 41, 42, 43, 44]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    loaded = load_engine(make_settings(str(tmp_path), batch_size=2, max_cache_length=32, context_size=16,
                                       decode_steps=4, dtype="float32", weight_dtype="float32"))
    assert loaded.engine.model_config.sliding_layers == (0, 1)
    r, = ContinuousBatcher(loaded.engine, loaded.params).run(
        [Request(id=0, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=12, ignore_eos=True))])
    assert r.completion_token_ids == want
    cfg = loaded.engine.model_config
    assert cfg.within_cache(5) is cfg and cfg.within_cache(4).sliding_window is None
