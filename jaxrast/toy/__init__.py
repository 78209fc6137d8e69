"""The embedded toy family: a synthetic chain task on which RL activates a latent careful style."""
