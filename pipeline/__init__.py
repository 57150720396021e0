"""Pipeline assembly and options.

Importing Beam logs "apitools not found, and bigquery client libraries are not available" on
every command (its BigQuery client is an optional extra; jetbeam never uses BigQuery). That one
message is dropped here, before any pipeline module imports Beam.
"""

import logging


class _NoBigQueryClientWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_NoBigQueryClientWarning())
