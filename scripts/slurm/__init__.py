"""SLURM task entry (python scripts/slurm/task_entry.py); a package so that import-linter sees it."""
