"""Command line, configuration, and process launch for ngdiff (torchrun, deepspeed, Slurm, W&B)."""
