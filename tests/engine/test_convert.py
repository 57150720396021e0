"""`python -m engine.convert` and the jetbeam format it writes.

Tiny random checkpoints (HF save_pretrained, Meta 2-shard bf16, GGUF F32) are converted and
loaded back through `open_checkpoint` + `load_params` + `prefill`:

* float conversion: logits bit-identical to loading the source (tensors are stored in the
  source's float dtype, so nothing is rounded);
* --quantize: int8 + scales equal to `load_params(source, quantize=True)` up to the rounding
  difference between numpy and XLA stated at SCALE_RTOL below; logits within 1e-3 of their scale;
  bit-identical to numpy's quantize_weight of the source tensors;
* errors: one `error: ...` line, exit status 2, nothing left at OUT or next to it.
"""

from tests import REPO
import json
import os
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_fixtures import safetensors_header, save_tiny_model, tiny_llama_config
from tests.engine.test_meta import bf16_model, logits_of, tiny_sentencepiece, tokens_for_test, write_meta_checkpoint
from engine.convert import convert, main
from engine.loaders import CheckpointError, open_checkpoint
from engine.loaders.converted import load_converted
from engine.quantize import QuantizedWeight, quantize_weight
from engine.sharding import make_mesh
from engine.weights import load_params

# --quantize runs engine.quantize.quantize_weight in numpy on the host (exact IEEE division);
# load_params(quantize=True) runs the same function under XLA, which turns x / 127 and
# x / scale into multiplications by a reciprocal. So scales can differ by 1 ulp and an int8
# value sitting on a rounding boundary by 1. Allowed: scales rtol 2.5e-7; int8 |diff| <= 1 in
# at most 0.1% of entries (observed: 1 of 8192 in one matrix); logits 1e-3 of the logit scale
# (one such flip moved them by 6e-5 of it; int8 quantization itself moves them by ~1e-2).
# Against the same numpy quantization of the source on the host the stored bytes are identical.
SCALE_RTOL = 2.5e-7
Q_MISMATCH = 1e-3
LOGIT_TOL = 1e-3

HAS_GGUF_LOADER = os.path.exists(os.path.join(REPO, "engine", "loaders", "gguf.py"))


def assert_close(ours, ref, rel):
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * logit scale {scale:.3g}"


def run_cli(*args):
    return main([str(a) for a in args])



def leftovers(parent, name):
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-hf"
    save_tiny_model(path, tiny_llama_config(), seed=7, tokenizer=True)
    return path


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "tiny-meta"
    write_meta_checkpoint(path, bf16_model(seed=8))
    tiny_sentencepiece(path / "tokenizer.model")
    return path


def test_hf_to_jetbeam_float(hf_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", out,
                   "--output_safetensors", "True") == 0
    assert sorted(os.listdir(out)) == ["jetbeam_config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert not leftovers(tmp_path, "out")
    info = json.load(open(out / "jetbeam_config.json"))
    assert info["format_version"] == 1 and info["quantized"] is False and info["source"]["format"] == "hf"
    # A standard safetensors file (the space-padded header is valid for the reference reader).
    from safetensors.numpy import load_file
    assert set(load_file(str(out / "model.safetensors"))) == set(safetensors_header(out / "model.safetensors"))
    src, conv = open_checkpoint(str(hf_dir)), open_checkpoint(str(out))
    assert conv.format == "jetbeam" and conv.config == src.config
    tokens = tokens_for_test(3)
    np.testing.assert_array_equal(logits_of(conv, tokens), logits_of(src, tokens))
    assert conv.tokenizer.encode("hello there") == src.tokenizer.encode("hello there")
    assert conv.tokenizer.chat_template == src.tokenizer.chat_template


def test_hf_to_jetbeam_quantized_matches_on_the_fly(hf_dir, tmp_path):
    out = tmp_path / "q"
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", out, "--quantize", "True") == 0
    h = safetensors_header(out / "model.safetensors")
    assert h["layers.0.wq.q"]["dtype"] == "I8" and h["layers.0.wq.scale"]["dtype"] == "F32"
    assert h["embed"]["dtype"] == "F32" and "layers.0.wq" not in h
    conv = load_converted(str(out))
    assert conv.extra["quantized"]
    kinds = {n: isinstance(v, QuantizedWeight) for n, v in conv.tensors()}
    assert kinds["layers.1.w_down"] and kinds["lm_head"] and not kinds["embed"] and not kinds["final_norm"]
    src = open_checkpoint(str(hf_dir))
    mesh = make_mesh("cpu")
    p_conv = load_params(conv.config, conv, mesh, jnp.float32, quantize=True)
    p_fly = load_params(src.config, src, mesh, jnp.float32, quantize=True)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(p_conv), jax.tree_util.tree_leaves_with_path(p_fly)):
        a, b, where = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, where
        if a.dtype == np.int8:  # a scale 1 ulp apart can move a value sitting on a .5 boundary
            diff = np.abs(a.astype(np.int32) - b)
            assert diff.max() <= 1 and (diff > 0).mean() <= Q_MISMATCH, where
        elif where.endswith(".scale"):
            np.testing.assert_allclose(a, b, rtol=SCALE_RTOL, atol=0, err_msg=where)
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
    tokens = tokens_for_test(4)
    ours, fly = logits_of(conv, tokens, quantize=True), logits_of(src, tokens, quantize=True)
    assert_close(ours, fly, LOGIT_TOL)
    assert float(np.abs(logits_of(src, tokens) - fly).max()) > 1e-3 * float(np.abs(fly).max())  # int8 is visible
    # exact: the stored int8 + scales are numpy's quantize_weight of the source tensors
    stored = dict(conv.tensors())
    for name, w in src.tensors():
        if isinstance(stored[name], QuantizedWeight):
            ref = quantize_weight(np.asarray(w))
            np.testing.assert_array_equal(stored[name].q, ref.q, err_msg=name)
            np.testing.assert_array_equal(stored[name].scale, ref.scale, err_msg=name)
        else:
            np.testing.assert_array_equal(stored[name], w, err_msg=name)
    # --quantize False is a float conversion
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", tmp_path / "f",
                   "--quantize", "False") == 0
    assert not json.load(open(tmp_path / "f" / "jetbeam_config.json"))["quantized"]


def test_sharded_output_and_jetbeam_input(hf_dir, tmp_path):
    """Several ~100 KB weight files + index; a jetbeam dir is itself a valid input."""
    out = tmp_path / "sharded"
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", out,
                   "--shard_size_gb", 1e-4) == 0
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(files)
    out2 = tmp_path / "requant"
    assert run_cli("--input_checkpoint_dir", out, "--output_checkpoint_dir", out2, "--quantize") == 0
    assert json.load(open(out2 / "jetbeam_config.json"))["source"]["format"] == "jetbeam"
    assert os.path.exists(out2 / "tokenizer.json")
    tokens = tokens_for_test(5)
    src = open_checkpoint(str(hf_dir))
    np.testing.assert_array_equal(logits_of(open_checkpoint(str(out)), tokens), logits_of(src, tokens))
    assert_close(logits_of(open_checkpoint(str(out2)), tokens, quantize=True),
                 logits_of(src, tokens, quantize=True), LOGIT_TOL)


def test_meta_to_jetbeam(meta_dir, tmp_path):
    out = tmp_path / "from-meta"
    assert run_cli("--input_checkpoint_dir", meta_dir, "--output_checkpoint_dir", out) == 0
    assert {v["dtype"] for v in safetensors_header(out / "model.safetensors").values()} == {"BF16"}  # kept as shipped
    assert os.path.exists(out / "tokenizer.model")
    src, conv = open_checkpoint(str(meta_dir)), open_checkpoint(str(out))
    assert conv.config == src.config
    tokens = tokens_for_test(6)
    np.testing.assert_array_equal(logits_of(conv, tokens), logits_of(src, tokens))
    assert conv.tokenizer.encode("hello world") == src.tokenizer.encode("hello world")


# --- GGUF ---------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_GGUF_LOADER, reason="engine/loaders/gguf.py (another task) is not there yet")
def test_gguf_to_jetbeam(tmp_path):
    pytest.importorskip("gguf")
    src_path = tmp_path / "tiny.gguf"
    model = bf16_model(seed=9)  # any float32 model; F32 GGUF stores it exactly
    from tests.gguf_fixtures import byte_vocab_fields, write_gguf
    write_gguf(src_path, model, byte_vocab_fields(model.config.vocab_size))
    out = tmp_path / "from-gguf"
    assert run_cli("--input_checkpoint_dir", src_path, "--output_checkpoint_dir", out) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    src, conv = open_checkpoint(str(src_path)), open_checkpoint(str(out))
    assert conv.config == src.config
    tokens = tokens_for_test(7)
    np.testing.assert_array_equal(logits_of(conv, tokens), logits_of(src, tokens))
    for attr in ("bos_id", "eos_ids", "add_bos", "chat_template"):
        assert getattr(conv.tokenizer, attr) == getattr(src.tokenizer, attr), attr
    text = "hello <s> world"
    assert conv.tokenizer.encode(text) == src.tokenizer.encode(text)


# --- errors -------------------------------------------------------------------------------

def test_cli_missing_input_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--input_checkpoint_dir", tmp_path / "nope", "--output_checkpoint_dir", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope" in err and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path, "out")
    with pytest.raises(SystemExit) as e:  # argparse errors: same one-line shape
        run_cli("--input_checkpoint_dir", tmp_path, "--output_checkpoint_dir", out, "--quantize", "maybe")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_error_midway_leaves_nothing(hf_dir, tmp_path, monkeypatch, capsys):
    import engine.convert as conv_mod
    real = conv_mod.open_checkpoint

    def broken(path):
        ckpt = real(path)
        inner = ckpt.tensors

        def tensors():
            for i, (name, arr) in enumerate(inner()):
                yield name, (arr[:-1] if i == 5 else arr)
        ckpt.tensors = tensors
        return ckpt

    monkeypatch.setattr(conv_mod, "open_checkpoint", broken)
    out = tmp_path / "out"
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has shape" in err and err.count("\n") == 1
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_existing_output(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("x")
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", out) == 2
    assert "not empty" in capsys.readouterr().err and (out / "precious").exists()
    assert run_cli("--input_checkpoint_dir", hf_dir, "--output_checkpoint_dir", out, "--overwrite") == 0
    assert not (out / "precious").exists() and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path, "out")


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "c"
    convert(str(hf_dir), str(out), quantize=True)
    return out


def test_converted_errors(converted, tmp_path):
    # truncated weights: names the file and the first tensor past the end
    d = shutil.copytree(converted, tmp_path / "trunc")
    size = os.path.getsize(d / "model.safetensors")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor 'lm_head\.scale'"):
        load_converted(str(d))
    # missing weights file
    d = shutil.copytree(converted, tmp_path / "missing")
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        open_checkpoint(str(d))
    # unsupported format_version
    d = shutil.copytree(converted, tmp_path / "version")
    info = json.load(open(d / "jetbeam_config.json"))
    json.dump({**info, "format_version": 99}, open(d / "jetbeam_config.json", "w"))
    with pytest.raises(CheckpointError, match=r"jetbeam_config\.json: format_version 99"):
        load_converted(str(d))
    # config disagrees with the stored shapes: names file and tensor
    d = shutil.copytree(converted, tmp_path / "shape")
    json.dump({**info, "intermediate_size": 96}, open(d / "jetbeam_config.json", "w"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'layers\.0\.w_gate\.q' is I8 \(64, 128\), "
                                              r"expected I8 \(64, 96\)"):
        load_converted(str(d))


def test_load_converted_vs_convert_timing(tmp_path, capsys):
    """Not asserted: prints how long loading a converted int8 checkpoint takes vs converting again."""
    src = tmp_path / "mid"
    save_tiny_model(src, tiny_llama_config(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                           vocab_size=4096, num_attention_heads=8, num_key_value_heads=4),
                    seed=1)
    mesh = make_mesh("cpu")

    def load(path, quantize=True):
        t = time.perf_counter()
        ckpt = open_checkpoint(str(path))
        params = load_params(ckpt.config, ckpt, mesh, jnp.float32, quantize=quantize)
        jax.block_until_ready(params)
        return time.perf_counter() - t

    load(src)  # warm up jit compilation of the on-device quantizer
    t_fly = load(src)
    t0 = time.perf_counter()
    convert(str(src), str(tmp_path / "conv"), quantize=True)
    t_convert = time.perf_counter() - t0
    t_conv = load(tmp_path / "conv")
    n = sum(os.path.getsize(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
    with capsys.disabled():
        print(f"\n[timing] {n / 1e6:.1f} MB f32 HF checkpoint: convert --quantize {t_convert:.3f}s; "
              f"load converted int8 {t_conv:.3f}s; load HF + quantize on the fly {t_fly:.3f}s")
