"""Meta `consolidated.NN.pth` loader: shard merging, rotary permutation, safe unpickling.

The same random weights are written as a Hugging Face checkpoint (save_pretrained) and as a
Meta checkpoint (torch.save of Meta's names in Meta's interleaved rotary layout, split into
2 model-parallel shards along Meta's axes, bf16 as Meta ships them). Both load to the same
canonical tensors bit for bit, and the logits match transformers' float32 forward.
"""

import io
import json
import os
import pickle
import zipfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_fixtures import build_model, tiny_llama_config
from engine.loaders import CheckpointError, open_checkpoint
from engine.loaders.meta import load_meta
from engine.loaders.torch_zip import load_torch_zip
from engine.model import prefill
from engine.sharding import make_mesh
from engine.weights import load_params

REL_TOL = 1e-4
# Meta's FFN width for dim 64: int(0.75 * int(2 * 256 / 3)) = 127 -> rounded up to 32: 128.
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1,
          "multiple_of": 32, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 10000.0}


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta's interleaved rows (inverse of convert_llama_weights_to_hf's permute)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_state_dict(model) -> dict:
    """A HF LlamaForCausalLM's weights under Meta's names and rotary layout."""
    sd = model.state_dict()
    cfg = model.config
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            f"layers.{i}.attention.wq.weight": unpermute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
            f"layers.{i}.attention.wk.weight": unpermute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    return out


def split_axis(name: str):
    """Meta's model-parallel split axis for a tensor name (None: replicated)."""
    if name == "tok_embeddings.weight":
        return 1
    if name == "output.weight":
        return 0
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


def write_meta_checkpoint(path, model, n_shards: int = 2, params: dict = PARAMS):
    """torch.save `n_shards` consolidated.NN.pth files (bf16) + params.json for `model`'s weights.

    Shards are saved as views (torch.chunk), so some tensors are non-contiguous slices of a
    larger storage with an offset: the reader must honour storage offset and stride.
    """
    os.makedirs(path, exist_ok=True)
    sd = {k: v.to(torch.bfloat16) for k, v in meta_state_dict(model).items()}
    for r in range(n_shards):
        shard = {}
        for name, w in sd.items():
            axis = split_axis(name)
            shard[name] = w if axis is None else torch.chunk(w, n_shards, dim=axis)[r]
        if r == 0:
            shard["rope.freqs"] = torch.ones(8, dtype=torch.bfloat16)  # as Llama 2 ships it
        torch.save(shard, os.path.join(path, f"consolidated.{r:02d}.pth"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)


def bf16_model(seed: int = 0):
    """A tiny float32 HF Llama whose weights are exactly representable in bf16 (as Meta ships them)."""
    model = build_model(tiny_llama_config(intermediate_size=128, tie_word_embeddings=False), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def tiny_sentencepiece(path):
    """Train a tiny character-level sentencepiece model (ids < 256) at `path`."""
    import sentencepiece as spm
    text = ["the quick brown fox jumps over the lazy dog", "hello world", "llamas eat grass"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=40,
                                   model_type="char", minloglevel=2, bos_id=1, eos_id=2, unk_id=0)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def tokens_for_test(seed=0, n=2, s=9):
    return np.random.default_rng(seed).integers(3, 256, size=(n, s), dtype=np.int32)


def logits_of(ckpt, tokens, quantize=False):
    cfg = ckpt.config
    params = load_params(cfg, ckpt, make_mesh("cpu"), jnp.float32, quantize=quantize)
    fwd = jax.jit(lambda p, t: prefill(p, cfg, t, jnp.float32, all_logits=True)[0])
    return np.asarray(fwd(params, jnp.asarray(tokens)))


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= REL_TOL * scale, f"max |diff| {err:.3g} > {REL_TOL} * logit scale {scale:.3g}"


@pytest.fixture(scope="module")
def meta_and_hf(tmp_path_factory):
    """(model, meta dir, hf dir): one set of weights in both formats; tokenizer.model in the meta dir's parent."""
    root = tmp_path_factory.mktemp("llama")
    model = bf16_model(seed=5)
    write_meta_checkpoint(root / "tiny-meta", model)
    tiny_sentencepiece(root / "tokenizer.model")
    model.save_pretrained(str(root / "tiny-hf"), safe_serialization=True)
    return model, root / "tiny-meta", root / "tiny-hf"


def test_torch_zip_views_dtypes():
    """Offsets, strides (a transpose, a column slice), bf16/f16/int64 come back exactly."""
    import tempfile
    t = torch.randn(6, 8).to(torch.bfloat16)
    ref = {"slice": t[:, 1:5], "rows": t[2:4], "t": t.t(), "full": t, "i64": torch.arange(5),
           "f16": torch.randn(3).half(), "empty": torch.zeros(0, 4)}
    with tempfile.TemporaryDirectory() as d:
        torch.save(ref, os.path.join(d, "x.pth"))
        got = load_torch_zip(os.path.join(d, "x.pth"))
        for k, v in ref.items():
            a = got[k].numpy()
            assert a.shape == tuple(v.shape)
            np.testing.assert_array_equal(a.astype(np.float64), v.double().numpy(), err_msg=k)


def test_meta_two_shards_equal_hf(meta_and_hf):
    model, meta_dir, hf_dir = meta_and_hf
    meta = open_checkpoint(str(meta_dir))
    assert meta.format == "meta"
    cfg = meta.config
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.num_kv_heads, cfg.head_dim) == (256, 128, 2, 16)
    hf = open_checkpoint(str(hf_dir))
    assert hf.format == "hf"
    hf_tensors = dict(hf.tensors())
    names = []
    for name, arr in meta.tensors():
        names.append(name)
        np.testing.assert_array_equal(np.asarray(arr, np.float32), np.asarray(hf_tensors[name], np.float32),
                                      err_msg=name)
    assert sorted(names) == sorted(hf_tensors)
    tokens = tokens_for_test()
    ours_meta = logits_of(meta, tokens)
    np.testing.assert_array_equal(ours_meta, logits_of(hf, tokens))
    assert_close(ours_meta, reference_logits(model, tokens))


def test_meta_one_shard_and_parent_tokenizer(meta_and_hf, tmp_path):
    model, meta_dir, _ = meta_and_hf
    write_meta_checkpoint(tmp_path / "one", model, n_shards=1,
                          params={**PARAMS, "vocab_size": 256})
    ckpt = load_meta(str(tmp_path / "one"))
    assert ckpt.tokenizer is None  # none next to the shards or in the parent
    tokens = tokens_for_test(1)
    assert_close(logits_of(ckpt, tokens), reference_logits(model, tokens))
    tok = load_meta(str(meta_dir)).tokenizer  # tokenizer.model sits in the parent dir
    assert tok is not None and tok.decode(tok.encode("hello world")) == "hello world"


def test_ffn_width_mismatch(meta_and_hf, tmp_path):
    model, _, _ = meta_and_hf
    write_meta_checkpoint(tmp_path / "bad", model, params={**PARAMS, "ffn_dim_multiplier": None})
    with pytest.raises(CheckpointError, match=r"params\.json.*192.*w1\.weight has 128"):
        load_meta(str(tmp_path / "bad"))


# --- malicious pickles ------------------------------------------------------------------

class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _write_pth(path, payload: bytes, extra: dict = None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("consolidated/data.pkl", payload)
        z.writestr("consolidated/byteorder", "little")
        for k, v in (extra or {}).items():
            z.writestr(k, v)


@pytest.mark.parametrize("fn,global_name", [(os.system, f"{os.system.__module__}.system"),
                                            (eval, "builtins.eval")])
def test_malicious_pickle_refused(tmp_path, fn, global_name):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w').write('x')"
    d = tmp_path / "evil"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(PARAMS))
    # the payload inside a dict, as a state-dict value would be
    _write_pth(d / "consolidated.00.pth", pickle.dumps({"tok_embeddings.weight": _Evil(fn, arg)}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(d))
    msg = str(e.value)
    assert global_name in msg and "consolidated.00.pth" in msg, msg
    assert not marker.exists()


def test_out_of_bounds_view_refused(tmp_path):
    """An allowed rebuild call whose size/stride points past its storage fails, not reads stray memory."""
    p = tmp_path / "x.pth"
    torch.save({"w": torch.zeros(4)}, str(p))
    with zipfile.ZipFile(p) as z:
        prefix = [n for n in z.namelist() if n.endswith("/data.pkl")][0][:-len("data.pkl")]
        pkl = z.read(prefix + "data.pkl")
        files = {n: z.read(n) for n in z.namelist() if n != prefix + "data.pkl"}
    bad = pkl.replace(b"K\x04\x85", b"K\x40\x85")  # size (4,) -> (64,)
    assert bad != pkl
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(prefix + "data.pkl", bad)
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match="past its storage"):
        load_torch_zip(str(p))["w"].numpy()


def test_legacy_and_missing_storage(tmp_path):
    p = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, str(p), _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_torch_zip(str(p))
    q = tmp_path / "nostorage.pth"
    torch.save({"w": torch.zeros(2)}, str(q))
    with zipfile.ZipFile(q) as z:
        keep = {n: z.read(n) for n in z.namelist() if "/data/" not in n}
    with zipfile.ZipFile(q, "w") as z:
        for n, b in keep.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match=r"nostorage\.pth.*storage .*missing"):
        load_torch_zip(str(q))
