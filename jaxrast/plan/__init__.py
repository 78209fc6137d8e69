"""Memory planning: exact parameter counts from config.json and memory per device of RAST decoding vs GRPO."""
