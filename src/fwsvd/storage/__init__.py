"""Storage: atomic writes, the compression record and its transformers quantizer, int8 factors, loading and saving model folders."""
