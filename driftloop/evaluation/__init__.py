"""What the loop is worth: the served predictions' error against the baselines it must beat."""
