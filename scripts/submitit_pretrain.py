"""Submit main_pretrain.py to SLURM with submitit: every flag of main_pretrain.py plus the launcher's
(--ngpus --nodes --timeout --job_dir --partition ... --dry_run; see engine/launch/slurm.py).

    python scripts/submitit_pretrain.py --nodes 8 --ngpus 8 --partition gpu [main_pretrain.py flags]
"""
import argparse
import sys

from engine.launch.slurm import launch

import main_pretrain

if __name__ == "__main__":
    parser = argparse.ArgumentParser("Submitit for MAE pretraining", parents=[main_pretrain.get_args_parser()])
    sys.exit(launch(parser, "engine.pretrain:main", "mae_pretrain", preflight="engine.pretrain:preflight"))
