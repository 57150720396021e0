"""A RunInference `ModelHandler` for the jetbeam engine, for pipelines that compose RunInference.

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from transforms.model_handler import JetbeamModelHandler

    with beam.Pipeline() as p:
        (p | beam.Create(["The capital of France is", {"prompt": "Hi", "max_tokens": 8}])
           | RunInference(JetbeamModelHandler(model=None, max_tokens=32), inference_args={"temperature": 0.0})
           | beam.Map(lambda r: print(r.example, "->", r.inference.completion)))

`JetbeamModelHandler(model, **settings)` takes any setting of engine/config.py by name (engine
shape, scheduler, sampling defaults), as `LLM` does. An example is a prompt string, a list of
token ids, an `engine.request.Request`, or a row dict like the batch job's (prompt /
prompt_token_ids / messages plus per-row sampling columns). Each yields
`PredictionResult(example, Result, model_id)`; a bad example yields a Result whose `error` says
why (RunInference does not drop or fail the batch). RunInference batches with BatchElements:
the whole batch goes to the continuous batcher at once, so batches larger than the number of
decode slots keep the slots full. The batch job itself (pipeline/build.py) uses the stateful
`transforms.generate` step instead, which buffers far more rows per engine call.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from engine.config import Settings, make_settings
from engine.rows import SAMPLING_COLUMNS, sampling_for_row, to_request_spec


class JetbeamModelHandler(ModelHandler[Any, PredictionResult, Any]):
    """load_model -> the engine and its lock (transforms/generate.EngineHolder, as the batch job
    loads it); run_inference -> one PredictionResult per example."""

    def __init__(self, model: Optional[str] = None, *, settings: Optional[Settings] = None,
                 prompt_column: str = "prompt", min_batch_size: Optional[int] = None,
                 max_batch_size: Optional[int] = None, large_model: bool = False, **flat):
        self.settings = make_settings(model, settings, **flat)
        self.prompt_column = prompt_column
        slots = self.settings.engine.batch_size
        super().__init__(min_batch_size=min_batch_size or slots,
                         max_batch_size=max_batch_size or max(slots * 8, min_batch_size or 1),
                         large_model=large_model)

    def load_model(self):
        from transforms.generate import EngineHolder
        return EngineHolder(self.settings)

    def validate_inference_args(self, inference_args: Optional[dict]):
        unknown = set(inference_args or {}) - set(SAMPLING_COLUMNS)
        if unknown:
            raise ValueError(f"inference_args may only hold sampling settings {SAMPLING_COLUMNS}, "
                             f"got {sorted(unknown)}")

    def get_metrics_namespace(self) -> str:
        return "jetbeam"

    def _request(self, i: int, example, llm, defaults):
        from engine.request import Request, RequestError
        from engine.rows import spec_to_request
        if isinstance(example, Request):
            return Request(id=i, prompt=example.prompt, prompt_token_ids=example.prompt_token_ids,
                           sampling=example.sampling, metadata=i)
        if isinstance(example, str):
            row = {self.prompt_column: example}
        elif isinstance(example, (list, tuple)):
            row = {"prompt_token_ids": list(example)}
        elif isinstance(example, dict):
            row = example
        else:
            raise RequestError(f"unsupported example type {type(example).__name__}")
        spec = to_request_spec({"id": str(i), "row": row}, self.prompt_column, defaults)
        req = spec_to_request(spec, render_chat=llm.render_chat, request_id=i)
        req.metadata = i
        return req

    def run_inference(self, batch: Sequence[Any], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        from engine.request import RequestError, Result
        holder, model = model, model.llm
        out: list = [None] * len(batch)
        try:
            defaults = sampling_for_row(dict(inference_args or {}), self.settings.sampling)
        except RequestError as e:  # bad inference_args: every example of the batch gets the reason
            defaults, bad_args = None, str(e)
        requests = []
        for i, example in enumerate(batch):
            try:
                if defaults is None:
                    raise RequestError(f"inference_args: {bad_args}")
                requests.append(self._request(i, example, model, defaults))
            except RequestError as e:
                out[i] = Result(id=i, error=str(e), metadata=i)
            except Exception as e:
                out[i] = Result(id=i, error=f"invalid example: {type(e).__name__}: {e}", metadata=i)
        with holder.lock:  # one engine, possibly many DoFn threads
            for res in model.generate(requests):
                out[res.metadata] = res
        name = model.model_name
        for i, res in enumerate(out):
            if res is None:
                res = Result(id=i, error="engine returned no result for this example", metadata=i)
            yield PredictionResult(batch[i], res, name)
