"""Training: the jitted train step (`step`), its optimiser, metrics and FLOPs, the grain input pipeline,
train-state checkpoints, and the plumbing of a run around them (`run`, `preemption`)."""
