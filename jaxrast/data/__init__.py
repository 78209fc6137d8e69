"""Evaluation data: the shipped benchmark files, rows and field maps, prompt templates, resumable JSONL output."""
