"""RAST decoding: the combination z = z_base + Σ λ_i (z_rl_i − z_ref_i), sampling, the per-slot
token rules, the model ensemble, and the one decoder: the continuous-batching engine with its
scheduler and speculative rounds, behind `RAST`."""
