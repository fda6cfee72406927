"""Progressive delivery: the rollout controller, its figures, analysis and state."""
