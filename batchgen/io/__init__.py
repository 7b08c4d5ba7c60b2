"""batchgen's file I/O: input readers, the output schema, crash-safe part files and the final merge.

Reading: `open_input(path)` returns an `InputSource` that streams `SourceRow`s in batches.
Writing: `output_schema` fixes the columns, `PartWriter` appends results as part files,
`scan_checkpoint` tells a resumed run what is done, and `finalize` writes the output in input order.
"""

from batchgen.io.merge import MergeResult, finalize
from batchgen.io.parts import Checkpoint, PartFile, PartWriter, list_parts, output_format, scan_checkpoint
from batchgen.io.readers import FORMATS, InputSource, SourceRow, detect_format, open_input
from batchgen.io.schema import INDEX_COLUMN, RESULT_COLUMNS, RESULT_FIELDS, output_schema, state_schema

__all__ = [
    "FORMATS",
    "INDEX_COLUMN",
    "RESULT_COLUMNS",
    "RESULT_FIELDS",
    "Checkpoint",
    "InputSource",
    "PartFile",
    "PartWriter",
    "SourceRow",
    "detect_format",
    "MergeResult",
    "finalize",
    "list_parts",
    "open_input",
    "output_format",
    "output_schema",
    "scan_checkpoint",
    "state_schema",
]
