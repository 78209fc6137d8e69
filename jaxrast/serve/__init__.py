"""Serving: RAST behind an OpenAI-compatible HTTP API (`jaxrast serve`)."""
