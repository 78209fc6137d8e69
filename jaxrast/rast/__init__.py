"""RAST decoding: the combination z = z_base + Σ λ_i (z_rl_i − z_ref_i), sampling, the model
ensemble, the continuous-batching engine and its scheduler, the static path, the decoding job."""
