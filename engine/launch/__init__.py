"""Launch: SLURM jobs through submitit, and the signals that stop or requeue a run."""
