"""Crafted checkpoints (issue 18): each is refused at open, fast, in bounded memory, with a
one-line CheckpointError naming the file and the problem; pickles never run code.

Every crafted file is a tiny valid checkpoint (the `*_base` cases, which must open) with one
declared count, length, offset or shape changed. All of them are opened in one child process
that imports only the loaders (no jax) and runs under an address-space limit of 1 GiB over its
baseline, so a loader that allocated from a declared 2**62 would die there (MemoryError) rather
than pass; the child reports each refusal's message and time.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import pytest

from tests import REPO

# --------------------------------------------------------------------------- GGUF, by hand

_U32, _STR, _ARR, _I32 = 4, 8, 9, 5


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, v: int) -> bytes:
    return _kv(key, _U32, struct.pack("<I", v))


def _arr_str(key: str, items: list, count: int = None) -> bytes:
    head = struct.pack("<IQ", _STR, len(items) if count is None else count)
    return _kv(key, _ARR, head + b"".join(_s(i) for i in items))


def _arr_i32(key: str, items: list, count: int = None) -> bytes:
    head = struct.pack("<IQ", _I32, len(items) if count is None else count)
    return _kv(key, _ARR, head + struct.pack(f"<{len(items)}i", *items))


# A complete 1-block Llama: hidden 8, 2 heads of 4, FFN 8, vocabulary 4 (all matrices 8 x 8).
_GGUF_TENSORS = [("token_embd.weight", (8, 4)), ("output_norm.weight", (8,))] + [
    (f"blk.0.{n}.weight", (8,)) for n in ("attn_norm", "ffn_norm")] + [
    (f"blk.0.{n}.weight", (8, 8)) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                             "ffn_up", "ffn_down")]


def _gguf_kvs(**change) -> list:
    kvs = {"arch": _kv("general.architecture", _STR, _s("llama")),
           "name": _kv("general.name", _STR, _s("tiny")),
           "hidden": _u32("llama.embedding_length", 8), "blocks": _u32("llama.block_count", 1),
           "ffn": _u32("llama.feed_forward_length", 8), "heads": _u32("llama.attention.head_count", 2),
           "ctx": _u32("llama.context_length", 64), "model": _kv("tokenizer.ggml.model", _STR, _s("llama")),
           "tokens": _arr_str("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>", "a"]),
           "types": _arr_i32("tokenizer.ggml.token_type", [2, 3, 3, 1])}
    kvs.update(change)
    return list(kvs.values())


def write_gguf(path, kvs: list, n_kv: int = None, n_tensors: int = None, offsets: dict = None) -> str:
    """A GGUF v3 file of `_GGUF_TENSORS` (F32 zeros); counts and tensor offsets overridable."""
    infos, data = b"", b""
    for name, ne in _GGUF_TENSORS:
        off = (offsets or {}).get(name, len(data))
        infos += _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, 0, off)
        data += bytes(4 * math.prod(ne))
        data += bytes(-len(data) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(_GGUF_TENSORS) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + infos
    with open(path, "wb") as f:
        f.write(head + bytes(-len(head) % 32) + data)
    return str(path)


def _token_type_kvs(count: int) -> list:
    """The base metadata with a token_type array declaring `count` entries, its elements 4-byte
    aligned in the file: gguf.GGUFReader then reads empty views past the end, one per declared
    entry, without failing (the issue's 4 GB in 55 s)."""
    for pad in range(4):
        kvs = _gguf_kvs(name=_kv("general.name", _STR, _s("tiny" + "x" * pad)),
                        types=_arr_i32("tokenizer.ggml.token_type", [2, 3, 3, 1], count))
        start = 24 + sum(map(len, kvs[:-1])) + len(_s("tokenizer.ggml.token_type")) + 4 + 12
        if start % 4 == 0:
            return kvs
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- safetensors

_HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
              "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 4, "max_position_embeddings": 64,
              "tie_word_embeddings": True}
_HF_TENSORS = {"model.embed_tokens.weight": [4, 8], "model.norm.weight": [8]} | {
    f"model.layers.0.{n}.weight": [8] for n in ("input_layernorm", "post_attention_layernorm")} | {
    f"model.layers.0.{n}.weight": [8, 8] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                  "mlp.down_proj")}


def st_header(tensors: dict) -> dict:
    header, pos = {}, 0
    for name, shape in tensors.items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header


def write_st(path, header, data_bytes: int = None, length: int = None) -> None:
    raw = json.dumps(header).encode()
    if data_bytes is None:
        data_bytes = max([e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"] or [0]) \
            if isinstance(header, dict) else 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(data_bytes))


def write_hf(d, config: dict = None, header=None, **st) -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(_HF_CONFIG if config is None else config, f)
    write_st(os.path.join(d, "model.safetensors"), st_header(_HF_TENSORS) if header is None else header, **st)
    return str(d)


def _with(tensor: str, **entry) -> dict:
    header = st_header(_HF_TENSORS)
    header[tensor] = {**header[tensor], **entry}
    return header


def write_converted(d, layers: int = 1, header=None) -> str:
    os.makedirs(d, exist_ok=True)
    cfg = {"vocab_size": 4, "hidden_size": 8, "intermediate_size": 8, "num_layers": layers, "num_heads": 2,
           "num_kv_heads": 2, "head_dim": 4, "tie_embeddings": True, "format_version": 1, "quantized": False}
    with open(os.path.join(d, "jetbeam_config.json"), "w") as f:
        json.dump(cfg, f)
    write_st(os.path.join(d, "model.safetensors"), st_header(_CONVERTED_TENSORS) if header is None else header)
    return str(d)


_CONVERTED_TENSORS = {"embed": [4, 8], "final_norm": [8]} | {
    f"layers.0.{n}": [8] for n in ("attn_norm", "mlp_norm")} | {
    f"layers.0.{n}": [8, 8] for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}

# --------------------------------------------------------------------------- Meta .pth

_PARAMS = {"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 4, "multiple_of": 8, "norm_eps": 1e-5}
_META_TENSORS = {"tok_embeddings.weight": (4, 8), "norm.weight": (8,), "output.weight": (4, 8)} | {
    f"layers.0.{n}.weight": (8, 8) for n in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")} | {
    "layers.0.feed_forward.w1.weight": (24, 8), "layers.0.feed_forward.w3.weight": (24, 8),
    "layers.0.feed_forward.w2.weight": (8, 24), "layers.0.attention_norm.weight": (8,),
    "layers.0.ffn_norm.weight": (8,)}


def write_meta(d, params: dict = None, shapes: dict = None) -> str:
    import torch
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(_PARAMS if params is None else params, f)
    sd = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in {**_META_TENSORS, **(shapes or {})}.items()}
    torch.save(sd, os.path.join(d, "consolidated.00.pth"))
    return str(d)


def rewrite_zip(path, change) -> None:
    """Rewrite the zip at `path`, member by member, through `change(name, bytes) -> (bytes, compress)`."""
    with zipfile.ZipFile(path) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members:
            raw, compress = change(name, raw)
            z.writestr(name, raw, compress_type=compress)


def meta_with_view_past_storage(d) -> str:
    """An allowed rebuild call whose size (4,) -> (64,) reaches past its storage of 4."""
    import torch
    write_meta(d)
    path = os.path.join(d, "consolidated.00.pth")
    torch.save({"w": torch.zeros(4)}, path)
    rewrite_zip(path, lambda n, b: (b.replace(b"K\x04\x85", b"K\x40\x85") if n.endswith("data.pkl") else b,
                                    zipfile.ZIP_STORED))
    return path


def meta_with_member(d, which: str) -> str:
    """data.pkl inflating to 9 MB (a zip bomb), or a storage stored deflated."""
    write_meta(d)
    path = os.path.join(d, "consolidated.00.pth")

    def change(name, raw):
        if which == "pkl" and name.endswith("data.pkl"):
            return raw + bytes(9 << 20), zipfile.ZIP_DEFLATED
        if which == "storage" and "/data/" in name:
            return raw, zipfile.ZIP_DEFLATED
        return raw, zipfile.ZIP_STORED

    rewrite_zip(path, change)
    return str(d)


# --------------------------------------------------------------------------- the cases

def write_tokenizer(directory, tokenizer_json=None, config=None, sentencepiece=None, size=None) -> str:
    """A tokenizer directory: a real byte-level tokenizer.json unless given text (or a sparse file
    of `size` bytes); returns the path of the file the case is about."""
    from tests.tiny import byte_tokenizer
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    if sentencepiece is not None:
        path = os.path.join(directory, "tokenizer.model")
        open(path, "wb").write(sentencepiece)
        return path
    if size is not None:
        with open(path, "wb") as f:
            f.truncate(size)
    elif tokenizer_json is not None:
        open(path, "w").write(tokenizer_json)
    else:
        byte_tokenizer().tok.save(path)
    if config is not None:
        path = os.path.join(directory, "tokenizer_config.json")
        open(path, "w").write(config)
    return path


def build_cases(root) -> dict:
    """{case: (path to open, [fragments the message must hold])}; `*_base` cases must open."""
    big = 2 ** 62
    g = lambda name, kvs, **kw: write_gguf(os.path.join(root, name + ".gguf"), kvs, **kw)
    d = lambda name: os.path.join(root, name)
    far = {"blk.0.ffn_down.weight": 1 << 40}
    return {
        "gguf_base": (g("base", _gguf_kvs()), []),
        "gguf_token_type_2e62": (g("tt", _token_type_kvs(big)), ["tokenizer.ggml.token_type", str(big), "entries"]),
        "gguf_string_array_2e62": (g("sa", _gguf_kvs(tokens=_arr_str("tokenizer.ggml.tokens", ["a"], big))),
                                   ["tokenizer.ggml.tokens", str(big)]),
        "gguf_string_2e62": (g("s", _gguf_kvs(name=_kv("general.name", _STR, struct.pack("<Q", big) + b"x"))),
                             ["general.name", f"string of {big} bytes"]),
        "gguf_kv_count_2e62": (g("kv", _gguf_kvs(), n_kv=big), ["key/value count", str(big)]),
        "gguf_tensor_count_2e62": (g("tc", _gguf_kvs(), n_tensors=big), ["tensor count", str(big)]),
        "gguf_block_count_1e9": (g("bc", _gguf_kvs(blocks=_u32("llama.block_count", 10 ** 9))),
                                 ["llama.block_count = 1000000000", "1..1024"]),
        "gguf_offset_past_end": (g("off", _gguf_kvs(), offsets=far), ["blk.0.ffn_down.weight", "past the end"]),
        "hf_base": (write_hf(d("hf_base")), []),
        "hf_layers_1e9": (write_hf(d("hf_layers"), {**_HF_CONFIG, "num_hidden_layers": 10 ** 9}),
                          ["config.json", "num_hidden_layers = 1000000000"]),
        "hf_negative_offset": (write_hf(d("hf_neg"), header=_with("model.norm.weight", data_offsets=[-100, -68])),
                               ["model.safetensors", "model.norm.weight", "data_offsets [-100, -68]"]),
        "hf_header_list": (write_hf(d("hf_list"), header=[1, 2]), ["model.safetensors", "not an object"]),
        "hf_shape_1e6": (write_hf(d("hf_1e6"), header=_with("model.norm.weight", shape=[10 ** 6, 10 ** 6])),
                         ["model.safetensors", "model.norm.weight", "does not match"]),
        "hf_header_length_2e62": (write_hf(d("hf_len"), length=big),
                                  ["model.safetensors: truncated", f"header of {big} bytes"]),
        "hf_overlap": (write_hf(d("hf_overlap"), header=_with("model.norm.weight", data_offsets=[0, 32])),
                       ["model.safetensors", "overlap"]),
        "hf_wrong_shape": (write_hf(d("hf_shape"), header=_with("model.norm.weight", shape=[2, 4])),
                           ["model.safetensors", "model.norm.weight", "expected (8,)"]),
        "converted_base": (write_converted(d("conv_base")), []),
        "converted_layers_1e9": (write_converted(d("conv_layers"), layers=10 ** 9),
                                 ["jetbeam_config.json", "num_layers = 1000000000"]),
        "converted_negative_offset": (write_converted(d("conv_neg"), header={
            **st_header(_CONVERTED_TENSORS), "final_norm": {"dtype": "F32", "shape": [8], "data_offsets": [-100, -68]}}),
            ["model.safetensors", "final_norm", "data_offsets"]),
        "meta_base": (write_meta(d("meta_base")), []),
        "meta_layers_1e9": (write_meta(d("meta_layers"), {**_PARAMS, "n_layers": 10 ** 9}),
                            ["params.json", "n_layers = 1000000000"]),
        "meta_wrong_shape": (write_meta(d("meta_shape"), shapes={"layers.0.feed_forward.w2.weight": (8, 8)}),
                             ["consolidated.00.pth", "feed_forward.w2.weight", "expected (8, 24)"]),
        "meta_view_past_storage": (meta_with_view_past_storage(d("meta_view")), ["past its storage"]),
        "meta_pickle_bomb": (meta_with_member(d("meta_bomb"), "pkl"), ["consolidated.00.pth", "data.pkl declares"]),
        "meta_deflated_storage": (meta_with_member(d("meta_deflate"), "storage"),
                                  ["consolidated.00.pth", "compressed"]),
        "tokenizer_base": (write_tokenizer(d("tok_base"), config='{"chat_template": "{{ messages }}"}'), []),
        "tokenizer_json_garbage": (write_tokenizer(d("tok_garbage"), tokenizer_json="{not json"),
                                   ["tokenizer.json", "unreadable tokenizer"]),
        "tokenizer_json_600mb": (write_tokenizer(d("tok_huge"), size=600 << 20),
                                 ["tokenizer.json", "629,145,600 bytes"]),
        "tokenizer_config_list": (write_tokenizer(d("tok_cfg"), config="[1, 2]"),
                                  ["tokenizer_config.json", "must hold a JSON object, got list"]),
        "sentencepiece_garbage": (write_tokenizer(d("tok_sp"), sentencepiece=b"garbage" * 10),
                                  ["tokenizer.model", "unreadable sentencepiece model"]),
    }


_CHILD = r"""
import json, os, resource, sys, time
import engine.loaders.hf, engine.loaders.meta, engine.loaders.gguf, engine.loaders.gguf_file, engine.loaders.converted
from engine.loaders import CheckpointError, check_checkpoint
from engine.loaders.torch_zip import load_torch_zip
from engine.tokenizer import load_tokenizer
assert "jax" not in sys.modules and "torch" not in sys.modules
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
out = {}
for case, path in json.load(open(sys.argv[1])).items():
    t0 = time.perf_counter()
    try:
        if os.path.basename(path).startswith("tokenizer"):  # a model directory's tokenizer files
            load_tokenizer(os.path.dirname(path))
        else:
            load_torch_zip(path) if path.endswith(".pth") else check_checkpoint(path)
        msg = None
    except CheckpointError as e:
        msg = "CheckpointError: " + str(e)
    except BaseException as e:
        msg = f"UNEXPECTED {type(e).__name__}: {e}"[:500]
    out[case] = {"message": msg, "seconds": time.perf_counter() - t0}
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) forking test process
out["_peak_rss_mb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """(cases, {case: {"message", "seconds"}}) from one memory-limited child process."""
    root = tmp_path_factory.mktemp("hostile")
    cases = build_cases(str(root))
    spec = root / "cases.json"
    spec.write_text(json.dumps({k: p for k, (p, _) in cases.items()}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, json.loads(proc.stdout)


CASES = ["gguf_base", "gguf_token_type_2e62", "gguf_string_array_2e62", "gguf_string_2e62", "gguf_kv_count_2e62",
         "gguf_tensor_count_2e62", "gguf_block_count_1e9", "gguf_offset_past_end", "hf_base", "hf_layers_1e9",
         "hf_negative_offset", "hf_header_list", "hf_shape_1e6", "hf_header_length_2e62", "hf_overlap",
         "hf_wrong_shape", "converted_base", "converted_layers_1e9", "converted_negative_offset", "meta_base",
         "meta_layers_1e9", "meta_wrong_shape", "meta_view_past_storage", "meta_pickle_bomb",
         "meta_deflated_storage", "tokenizer_base", "tokenizer_json_garbage", "tokenizer_json_600mb",
         "tokenizer_config_list", "sentencepiece_garbage"]


@pytest.mark.parametrize("case", CASES)
def test_crafted_file_refused_fast_in_bounded_memory(refusals, case):
    cases, got = refusals
    path, fragments = cases[case]
    msg, seconds = got[case]["message"], got[case]["seconds"]
    if not fragments:  # the untouched base: the crafted cases differ from it in one field
        assert msg is None, msg
        return
    assert msg is not None, f"{case}: opened without complaint"
    assert msg.startswith(f"CheckpointError: {path}") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{case}: {fragment!r} not in {msg!r}"
    assert seconds < 1.0, f"{case}: refusal took {seconds:.2f}s"


def test_child_memory_stayed_small(refusals):
    assert set(CASES) <= set(refusals[1])
    assert refusals[1]["_peak_rss_mb"] < 512, refusals[1]["_peak_rss_mb"]


def test_base_gguf_is_valid_for_the_gguf_package(refusals):
    """The hand-written base file is real GGUF (so the crafted ones differ only where meant)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(refusals[0]["gguf_base"][0])
    assert [t.name for t in reader.tensors] == [n for n, _ in _GGUF_TENSORS]


# --------------------------------------------------------------------------- front ends

def test_llm_and_generate_name_the_file(tmp_path, capsys):
    from engine.checkpoint import CheckpointError
    from engine.generate import main
    from engine.llm import LLM
    d = write_hf(tmp_path / "m", {**_HF_CONFIG, "num_hidden_layers": 10 ** 9})
    with pytest.raises(CheckpointError, match="num_hidden_layers = 1000000000") as e:
        LLM(d)
    assert str(e.value).startswith(os.path.join(d, "config.json") + ": ")
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    assert main(["--model", d, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: CheckpointError: {d}") and "num_hidden_layers" in err[-1], err


# --------------------------------------------------------------------------- pickles stay data

class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: str) -> list:
    import builtins
    import importlib
    import subprocess as sp
    return [(os.system, (f"touch {marker}",), f"{os.system.__module__}.system"),
            (sp.Popen, (["touch", marker],), "subprocess.Popen"),
            (builtins.exec, (f"open({marker!r}, 'w')",), "builtins.exec"),
            (builtins.eval, (f"open({marker!r}, 'w')",), "builtins.eval"),
            (importlib.import_module, ("jetbeam_hostile_payload",), "importlib.import_module"),
            (builtins.getattr, (_Evil(builtins.__import__, "os"), "system"), "builtins.getattr"),
            (builtins.__import__, ("jetbeam_hostile_payload",), "builtins.__import__")]


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("which", range(7))
def test_pickle_code_never_runs(tmp_path, monkeypatch, which, protocol):
    """A __reduce__ to os.system, subprocess, exec, eval, importlib, getattr or __import__, as a state-dict value
    inside consolidated.00.pth: refused by the global's name, and the marker file never appears
    (the importlib payload is a module that would write it on import)."""
    from engine.loaders import CheckpointError, open_checkpoint
    marker = str(tmp_path / "pwned")
    (tmp_path / "jetbeam_hostile_payload.py").write_text(f"open({marker!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, args, name = _payloads(marker)[which]
    d = tmp_path / "evil"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(_PARAMS))
    payload = pickle.dumps({"tok_embeddings.weight": _Evil(fn, *args)}, protocol=protocol)
    with zipfile.ZipFile(d / "consolidated.00.pth", "w") as z:
        z.writestr("consolidated/data.pkl", payload)
        z.writestr("consolidated/byteorder", "little")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(d))
    msg = str(e.value)
    assert msg.startswith(str(d / "consolidated.00.pth") + ": refusing to load") and name in msg, msg
    assert not os.path.exists(marker)
    assert "jetbeam_hostile_payload" not in sys.modules
