"""Where a run's numbers go: metrics.jsonl, the live progress display, and the trackers."""
