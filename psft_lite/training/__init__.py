"""One training run: objectives, old policies, the step, the loop, guard rails, checkpoints, data parallelism."""
