"""Submit main_linprobe.py to SLURM with submitit: every flag of main_linprobe.py plus the launcher's
(--ngpus --nodes --timeout --job_dir --partition ... --dry_run; see engine/launch/slurm.py).

    python scripts/submitit_linprobe.py --nodes 8 --ngpus 8 --partition gpu [main_linprobe.py flags]
"""
import argparse
import sys

from engine.launch.slurm import launch

import main_linprobe

if __name__ == "__main__":
    parser = argparse.ArgumentParser("Submitit for MAE linear probing", parents=[main_linprobe.get_args_parser()])
    sys.exit(launch(parser, "engine.linprobe:main", "mae_linprobe",
                    preflight="engine.linprobe:preflight"))
