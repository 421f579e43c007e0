"""Training under DeepSpeed: `loop.train(cfg)` runs a configured job; `engine` builds the DeepSpeed
engine, `schedule` the learning rate, `metrics` throughput figures, `checkpointing` save/resume/export."""
