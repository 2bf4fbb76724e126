"""Benchmarks and the device check: `python -m benchmarks.benchmark` (step, loader, plan modes),
`python -m benchmarks.gpu_check` (scripts/gpu_check.sh); flops.py and memory_plan.py are what they measure with."""
