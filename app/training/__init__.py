"""Layer 7: a training run: the Trainer and its hooks (kernels, callbacks), checkpoints and
resume, the run lock, the memory guard, stop signals and torch.distributed."""
