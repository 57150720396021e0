"""A RunInference `ModelHandler` for the jetbeam engine, for pipelines that compose RunInference.

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from transforms.model_handler import JetbeamModelHandler

    with beam.Pipeline() as p:
        (p | beam.Create(["The capital of France is", {"prompt": "Hi", "max_tokens": 8}])
           | RunInference(JetbeamModelHandler(model=None, max_tokens=32), inference_args={"temperature": 0.0})
           | beam.Map(lambda r: print(r.example, "->", r.inference["completion"])))

`JetbeamModelHandler(model, **settings)` takes any setting of engine/config.py by name (engine
shape, scheduler, sampling defaults), as `LLM` does. An example is a prompt string, a list of
token ids, an `engine.request.Request`, or a row dict like the batch job's (prompt /
prompt_token_ids / messages plus per-row sampling columns, and an optional "id"; without one the
id is the example's place in its batch). Examples are validated by the batch job's own function
(transforms/requests.py: same tokenizer, limits and sampling defaults) and served through the
same engine integration (transforms/serving.py). Each yields `PredictionResult(example, record,
model_id)`, `record` being the batch job's completion record, or an error record (stage
"validate" or "generate", with its reason) for an example that could not be served:
RunInference does not drop or fail the batch. The whole batch goes to the continuous batcher at
once, so batches larger than the number of decode slots keep the slots full. The batch job
itself (pipeline/build.py) uses the stateful transforms/generate.py step instead, which buffers
far more rows per engine call.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from engine.config import Settings, make_settings
from engine.request import Request, RequestError
from engine.rows import SAMPLING_COLUMNS, sampling_for_row
from transforms.read import NAMESPACE, error_record
from transforms.requests import ValidRequest, row_validator, validate
from transforms.serving import EngineCall, EngineHolder, EngineMetrics, acquire_engine


def example_row(example, prompt_column: str = "prompt") -> dict:
    """An example as a row of the batch job; RequestError for a type that is none."""
    if isinstance(example, str):
        return {prompt_column: example}
    if isinstance(example, Request):
        row = {"prompt_token_ids": list(example.prompt_token_ids)} if example.prompt_token_ids is not None \
            else {prompt_column: example.prompt}
        return {**row, **asdict(example.sampling)}
    if isinstance(example, (list, tuple)):
        return {"prompt_token_ids": list(example)}
    if isinstance(example, dict):
        return example
    raise RequestError(f"unsupported example type {type(example).__name__}")


class JetbeamModelHandler(ModelHandler[Any, PredictionResult, EngineHolder]):
    """load_model -> the process's engine and its lock (transforms/serving.acquire_engine, shared
    with the batch job's generate step); run_inference -> one PredictionResult per example."""

    def __init__(self, model: Optional[str] = None, *, settings: Optional[Settings] = None,
                 prompt_column: str = "prompt", min_batch_size: Optional[int] = None,
                 max_batch_size: Optional[int] = None, large_model: bool = False, **flat):
        self.settings = make_settings(model, settings, **flat)
        self.prompt_column = prompt_column
        self.metrics = EngineMetrics()
        slots = self.settings.engine.batch_size
        super().__init__(min_batch_size=min_batch_size or slots,
                         max_batch_size=max_batch_size or max(slots * 8, min_batch_size or 1),
                         large_model=large_model)

    def load_model(self) -> EngineHolder:
        return acquire_engine(self.settings)

    def validate_inference_args(self, inference_args: Optional[dict]):
        unknown = set(inference_args or {}) - set(SAMPLING_COLUMNS)
        if unknown:
            raise ValueError(f"inference_args may only hold sampling settings {SAMPLING_COLUMNS}, "
                             f"got {sorted(unknown)}")

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def _element(self, i: int, example) -> dict:
        row = example_row(example, self.prompt_column)
        rid = row.get("id")
        return {"id": str(i) if rid is None or rid == "" else str(rid), "row": row}

    def run_inference(self, batch: Sequence[Any], model: EngineHolder, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        out: list = [None] * len(batch)
        try:
            defaults, bad_args = sampling_for_row(dict(inference_args or {}), self.settings.sampling), None
        except RequestError as e:  # bad inference_args: every example of the batch gets the reason
            defaults, bad_args = None, f"inference_args: {e}"
        validator = row_validator(self.settings, self.prompt_column, defaults)
        valid, where = [], []
        for i, example in enumerate(batch):
            try:
                element = self._element(i, example)
            except RequestError as e:
                out[i] = error_record(i, str(e), "validate")
                continue
            if bad_args is not None:
                out[i] = error_record(element["id"], bad_args, "validate", element["row"])
                continue
            record = validate(validator, element)
            if isinstance(record, ValidRequest):
                valid.append(record)
                where.append(i)
            else:
                out[i] = record
        if valid:
            for j, _, record in EngineCall(model, valid, self.metrics, "RunInference"):
                out[where[j]] = record
        name = model.llm.model_name
        return [PredictionResult(example, record, name) for example, record in zip(batch, out)]
