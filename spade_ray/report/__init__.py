"""The self-contained HTML report of a score or evaluate run."""
