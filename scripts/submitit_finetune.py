"""Submit main_finetune.py to SLURM with submitit: every flag of main_finetune.py plus the launcher's
(--ngpus --nodes --timeout --job_dir --partition ... --dry_run; see engine/launch/slurm.py).

    python scripts/submitit_finetune.py --nodes 8 --ngpus 8 --partition gpu [main_finetune.py flags]
"""
import argparse
import sys

from engine.launch.slurm import launch

import main_finetune

if __name__ == "__main__":
    parser = argparse.ArgumentParser("Submitit for MAE fine-tuning", parents=[main_finetune.get_args_parser()])
    sys.exit(launch(parser, "engine.finetune:main", "mae_finetune", preflight="engine.finetune:preflight"))
