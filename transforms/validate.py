"""validate: rows -> ValidRequests, or error records with a reason; every check happens here.

A row's prompt comes from the prompt column (text, or a list of token ids), else a
`prompt_token_ids` column, else a chat `messages` column rendered with the model's chat template;
text is tokenized and its length checked against context_size, and per-row sampling columns are
checked over the settings' defaults (the rules: engine/rows.py). Each worker process loads the
model's tokenizer once (transforms/requests.py), never its weights. A refused row becomes an
error record of stage "validate"; generate receives only ValidRequests.
"""

from __future__ import annotations

import apache_beam as beam

from engine.config import Settings
from engine.rows import ValidRequest
from transforms.read import ERRORS
from transforms.requests import row_validator, validate


class ValidateFn(beam.DoFn):
    """rows -> ValidRequests (main) | error records (ERRORS)."""

    def __init__(self, prompt_column: str, settings: Settings):
        self.prompt_column = prompt_column
        self.settings = settings
        self.validator = None

    def setup(self):
        self.validator = row_validator(self.settings, self.prompt_column)

    def process(self, element):
        out = validate(self.validator, element)
        yield out if isinstance(out, ValidRequest) else beam.pvalue.TaggedOutput(ERRORS, out)


class Validate(beam.PTransform):
    """rows -> `valid` (ValidRequests) | ERRORS."""

    def __init__(self, prompt_column: str, settings: Settings):
        super().__init__()
        self.prompt_column = prompt_column
        self.settings = settings

    def expand(self, rows):
        return rows | beam.ParDo(ValidateFn(self.prompt_column, self.settings)).with_output_types(
            ValidRequest).with_outputs(ERRORS, main="valid")
