"""validate: rows -> requests ready for the engine, or error records with a reason.

A row becomes `{"id", "row", "prompt" | "prompt_token_ids" | "messages", "sampling"}`.
The prompt comes from the prompt column (text, or a list of token ids), else a
`prompt_token_ids` column, else a chat `messages` column (rendered with the model's chat
template in the generate step, where the tokenizer lives). Per-row columns named like the
sampling settings (engine/request.py's SamplingParams) override the defaults;
null/NaN means "use the default". Prompt length is checked by the engine (it needs the
tokenizer): such rows come back from generate as error records.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from engine.request import RequestError, SamplingParams
from engine.rows import to_request_spec
from transforms.read import ERRORS, NAMESPACE, error_record


class ValidateFn(beam.DoFn):
    """rows -> request specs (main) | error records (ERRORS)."""

    def __init__(self, prompt_column: str, sampling_defaults: SamplingParams):
        self.prompt_column = prompt_column
        self.defaults = sampling_defaults
        self.valid = Metrics.counter(NAMESPACE, "rows_valid")
        self.invalid = Metrics.counter(NAMESPACE, "rows_invalid")

    def process(self, element):
        try:
            spec = to_request_spec(element, self.prompt_column, self.defaults)
        except RequestError as e:
            self.invalid.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(element.get("id"), str(e), "validate",
                                                                element.get("row")))
            return
        except Exception as e:  # anything unexpected about a row is that row's problem
            self.invalid.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(
                element.get("id"), f"invalid row: {type(e).__name__}: {e}", "validate", element.get("row")))
            return
        self.valid.inc()
        yield spec


class Validate(beam.PTransform):
    def __init__(self, prompt_column: str, settings):
        super().__init__()
        self.prompt_column = prompt_column
        self.defaults = settings.sampling

    def expand(self, rows):
        return rows | beam.ParDo(ValidateFn(self.prompt_column, self.defaults)).with_outputs(
            ERRORS, main="valid")
