"""The applications: the CLI, evaluate, demo, bench."""
