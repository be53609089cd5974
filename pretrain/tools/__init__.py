"""Command-line tools around training: evaluate, generate, plot and plan."""
