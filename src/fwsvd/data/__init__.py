"""Reading task data: labelled text tables, plain text for causal LMs, tokenized batches.

The package is split by concern; imports point one way, from the top of this list down:

* :mod:`fwsvd.data.encoding` -- tokenizing and batching (:func:`encode_examples`,
  :func:`encode_token_examples`, :func:`causal_blocks`, :func:`causal_blocks_from_file`,
  :func:`draw`, :func:`batches`).
* :mod:`fwsvd.data.tasks` -- the example containers and their layouts (:class:`Examples`,
  :class:`TokenExamples`, :func:`read_labelled`, :func:`read_token_labelled`).
* :mod:`fwsvd.data.labels` -- parsing raw labels and turning them into targets
  (:func:`label_mapping`).
* :mod:`fwsvd.data.readers` -- reading ``.tsv``/``.csv``/``.jsonl``/``.json`` files and hub
  datasets into tables, detecting columns, reading plain text (:func:`read_text`, or piece by
  piece with :func:`text_chunks`).

No model code lives here: tokenizers are passed in by the caller.
"""

from .encoding import batches, causal_blocks, causal_blocks_from_file, draw, draw_outside, encode_examples, encode_token_examples
from .labels import label_mapping, model_label_mapping
from .readers import read_text, text_chunks
from .tasks import Examples, TokenExamples, read_labelled, read_token_labelled

__all__ = [
    "Examples",
    "TokenExamples",
    "batches",
    "causal_blocks",
    "causal_blocks_from_file",
    "draw",
    "draw_outside",
    "encode_examples",
    "label_mapping",
    "model_label_mapping",
    "encode_token_examples",
    "read_labelled",
    "read_text",
    "read_token_labelled",
    "text_chunks",
]
