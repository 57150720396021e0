"""Command-line options of the jetbeam batch job (`python run_pipeline.py --help`).

`JetbeamOptions` is an ordinary Beam `PipelineOptions` view, so the same flags work for
every runner (the local FnApiRunner, Dataflow, Flink, ...) next to Beam's own flags.
"""

from __future__ import annotations

import json
import os

from apache_beam.options.pipeline_options import PipelineOptions

# The shipped sample prompts: what a run with no flags serves.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(REPO_ROOT, "data", "prompts.jsonl")
DEFAULT_OUTPUT = "output"

# A runner that needs no network: Beam's DirectRunner (2.77) first tries the Prism runner,
# which downloads a Go binary from GitHub. The FnApiRunner is what DirectRunner falls back
# to for batch jobs, and it honours --direct_num_workers / --direct_running_mode.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"

# Sampling flags and the per-row columns that override them (same names).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")

# Flags passed to the engine as EngineConfig fields (engine/config.py) when set.
ENGINE_FIELDS = ("batch_size", "max_cache_length", "context_size", "quantize_weights",
                 "quantize_kv_cache", "dtype", "platform", "tokenizer_path", "decode_steps",
                 "prefill_batch", "min_prefill_bucket", "min_refill", "kv_page_size", "kv_cache_tokens",
                 "schedule", "schedule_window")


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


class JetbeamOptions(PipelineOptions):
    """Input/output, model, engine and sampling flags of the batch inference job."""

    @classmethod
    def _add_argparse_args(cls, parser):
        io = parser.add_argument_group("input / output")
        io.add_argument(
            "--input", default=DEFAULT_INPUT,
            help="Glob (or comma-separated globs) of Parquet (*.parquet) or JSONL (*.jsonl, *.json, "
                 "OpenAI batch files) inputs, local or gs://. Default: the sample prompts in data/.")
        io.add_argument(
            "--output", default=DEFAULT_OUTPUT,
            help="Output directory, local or gs://: completions-*.parquet, errors-*.jsonl, "
                 "metrics.json, metrics.csv. Default: ./output")
        io.add_argument("--prompt_column", default="prompt",
                        help="Column holding the prompt text (or a list of token ids). Rows without it "
                             "may carry 'messages' (chat, rendered with the model's chat template) or "
                             "'prompt_token_ids'. Default: prompt")
        io.add_argument("--id_column", default="id",
                        help="Column holding a stable row id; rows without one get "
                             "'<file basename>:<row number>'. Default: id")
        io.add_argument("--skip_existing", type=_bool, nargs="?", const=True, default=False,
                        help="Serve only ids not yet in the output directory's completions (resume a "
                             "partial or failed run). Without it, a run replaces earlier outputs.")

        model = parser.add_argument_group("model / engine")
        model.add_argument(
            "--model", default=None,
            help="None (default): the embedded SmolLM2-135M-Instruct GGUF; a config name from "
                 "configs/models (random weights, e.g. tiny-llama); a JetStream-style model.json; a "
                 "checkpoint directory (HF, Meta, converted) or a .gguf file.")
        model.add_argument("--batch_size", type=int, default=None,
                           help="Decode slots per engine (sequences generated concurrently). Default: "
                                "the engine's (8).")
        model.add_argument("--max_cache_length", type=int, default=None,
                           help="KV cache tokens per slot (prompt + completion).")
        model.add_argument("--context_size", type=int, default=None,
                           help="Longest prompt accepted, in tokens; longer rows become error rows.")
        model.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                           help="Compute dtype. Default: bfloat16 on accelerators, float32 on CPU.")
        model.add_argument("--quantize_weights", type=_bool, nargs="?", const=True, default=None,
                           help="int8 weights.")
        model.add_argument("--quantize_kv_cache", type=_bool, nargs="?", const=True, default=None,
                           help="int8 KV cache.")
        model.add_argument("--platform", default=None,
                           help='Devices one engine uses: "auto" (default), "cpu", "gpu=1", "tpu=8".')
        model.add_argument("--tokenizer_path", default=None,
                           help="A tokenizer file/directory that overrides the checkpoint's.")
        model.add_argument("--decode_steps", type=int, default=None,
                           help="Decode steps per host round-trip (engine knob).")
        model.add_argument("--prefill_batch", type=int, default=None,
                           help="Prompts prefilled together per length bucket (engine knob).")
        model.add_argument("--min_prefill_bucket", type=int, default=None,
                           help="Smallest prompt-length bucket compiled for prefill (engine knob).")
        model.add_argument("--min_refill", type=int, default=None,
                           help="Refill free decode slots only once this many are free (engine knob; "
                                "default 1). With mixed prompt/reply lengths, 8 made fewer, fuller "
                                "prefill calls and ran 5%% faster on an H100 (BENCHMARKS.md).")
        model.add_argument("--kv_page_size", type=int, default=None,
                           help="Paged KV cache: tokens per page (engine knob; default 0, one "
                                "max_cache_length region per slot). Slots share one pool and hold only "
                                "the pages their prompt + max_tokens need, so mixed lengths fit more "
                                "slots: +26%% output tok/s on a ShareGPT-like mix on an H100 (BENCHMARKS.md).")
        model.add_argument("--kv_cache_tokens", type=str, default=None,
                           help="Tokens in the paged KV cache's pool (default batch_size * max_cache_length), "
                                "or 'auto': what the accelerator has free after the weights and the "
                                "compiled programs' workspace (the number chosen is logged).")
        model.add_argument("--schedule", choices=["longest_first", "arrival"], default=None,
                           help="Order in which buffered rows take decode slots (engine knob): "
                                "longest max_tokens first (the default; the long rows no longer decode "
                                "alone at the end of each flush) or arrival order.")
        model.add_argument("--schedule_window", type=int, default=None,
                           help="Rows ordered together by --schedule longest_first (default 4096).")
        model.add_argument("--engine_config", default=None,
                           help="JSON object of further EngineConfig fields, e.g. '{\"attention\": \"xla\"}'.")
        model.add_argument("--num_engines", type=int, default=None,
                           help="Engine shards: rows are keyed onto this many shards; each shard is "
                                "served by one resident engine (one per worker process). Default: 1 "
                                "for local runs (Beam's FnApiRunner runs stateful steps on one "
                                "worker), else max(--num_workers, --max_num_workers, 1).")
        model.add_argument("--flush_rows", type=int, default=None,
                           help="Rows buffered per engine shard before they are fed to the engine "
                                "in one continuous-batching run. Each run's last sequences leave "
                                "slots idle, so a flush should hold several waves of slots. "
                                "Default: max(256, 8 x the engine's decode slots)")
        model.add_argument("--flush_seconds", type=float, default=30.0,
                           help="A shard's buffer is also flushed this many seconds (processing "
                                "time) after its first row arrived; < 0 disables. Default: 30. "
                                "(Beam's local FnApiRunner fires it as soon as the bundle is done.)")

        sampling = parser.add_argument_group(
            "sampling (defaults; per-row columns of the same names override them)")
        sampling.add_argument("--max_tokens", type=int, default=48,
                              help="Most tokens generated per row. Default: 48 (the sample job takes "
                                   "1-2 minutes on 2 CPU cores)")
        sampling.add_argument("--temperature", type=float, default=0.0,
                              help="0 = greedy (default).")
        sampling.add_argument("--top_k", type=int, default=0, help="0 = no top-k cut (default).")
        sampling.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass (default 1).")
        sampling.add_argument("--seed", type=int, default=None,
                              help="Sampling seed of every row (per-row 'seed' overrides). Default: "
                                   "drawn per request.")
        sampling.add_argument("--stop", action="append", default=None,
                              help="Stop string (repeatable); excluded from the completion.")

    # ---- helpers ----
    def sampling_defaults(self) -> dict:
        out = {f: getattr(self, f) for f in SAMPLING_FIELDS}
        out["stop"] = list(out["stop"] or [])
        return out

    def engine_kwargs(self) -> dict:
        """EngineConfig overrides for `LLM(model, **kwargs)`: only the flags that were set."""
        out = {}
        if self.engine_config:
            extra = json.loads(self.engine_config) if isinstance(self.engine_config, str) else self.engine_config
            if not isinstance(extra, dict):
                raise ValueError("--engine_config must be a JSON object")
            out.update(extra)
        for f in ENGINE_FIELDS:
            v = getattr(self, f, None)
            if v is not None:
                out[f] = v
        return out
