"""Evaluation: extract a final answer, judge it against the gold (the leaf), grade in-process
or in a worker pool, metrics and reports."""
