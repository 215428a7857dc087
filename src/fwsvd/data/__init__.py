from fwsvd.data.readers import (
    Examples,
    TokenExamples,
    batches,
    causal_blocks,
    encode_examples,
    encode_token_examples,
    label_mapping,
    read_labelled,
    read_text,
    read_token_labelled,
)

__all__ = [
    "Examples",
    "TokenExamples",
    "batches",
    "causal_blocks",
    "encode_examples",
    "label_mapping",
    "encode_token_examples",
    "read_labelled",
    "read_text",
    "read_token_labelled",
]
