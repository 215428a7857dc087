"""Calibration: batches from data, hooks that collect statistics, streaming, many processes, resume, statistics files."""
