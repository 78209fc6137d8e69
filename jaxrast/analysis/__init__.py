"""Token-level analyses of decoded trajectories: teacher forcing through every model, reports and plots."""
