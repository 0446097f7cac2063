"""Training: the jitted train step (`step`), its optimiser, metrics and FLOPs, the grain input pipeline,
train-state checkpoints, and a run around them: set up from its config (`setup`), its workdir
(`workdirs`), its models written and read back (`run`), memory plans (`plans`) and a clean stop on a
signal (`preemption`)."""
