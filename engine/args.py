"""Command-line flags shared by the training CLIs.

Official flag names, meanings and defaults are kept so facebookresearch/mae commands run
unchanged; the flags after them are this project's additions.
"""
import argparse

import torch

from .data import BUNDLED_DATA, DATA_FORMATS


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags every training CLI has (batch, schedule, data, output, runtime, distributed)."""
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU/process (effective batch = batch_size * accum_iter * processes)")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="accumulate gradients over this many iterations per optimizer step")
    parser.add_argument("--input_size", default=224, type=int, help="image size")

    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute learning rate")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * effective_batch / 256")
    parser.add_argument("--min_lr", type=float, default=0., metavar="LR", help="lower lr bound of the cosine")
    parser.add_argument("--warmup_epochs", type=int, default=40, metavar="N", help="epochs of linear lr warmup")

    parser.add_argument("--data_path", default=BUNDLED_DATA, type=str,
                        help="dataset folder with train/<class>/<images>, WebDataset .tar shards (a folder, with "
                             "train/ val/ subfolders or split-named shards, or a pattern like "
                             "/data/in22k-train-{000000..004095}.tar), or a Hugging Face dataset on disk (a "
                             "save_to_disk folder, or parquet files per split) (default: the bundled sample photos)")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save checkpoints and log.txt; "
                        "empty for no saving")
    parser.add_argument("--log_dir", default="./output_dir", help="where to write tensorboard logs")
    parser.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="resume from this checkpoint")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch (without --resume)")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true",
                        help="pin CPU memory in the DataLoader for faster transfer to the GPU")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    parser.add_argument("--world_size", default=1, type=int,
                        help="kept for official commands only: the number of processes is the launcher's "
                             "(torchrun, srun); another value is ignored with a warning")
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                        help="kept for official commands only (torch.distributed.launch passes it); ignored: the "
                             "local rank comes from the launcher's environment (LOCAL_RANK, SLURM_LOCALID)")
    parser.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI variables")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--port", default=None, type=int,
                        help="master port when srun starts the tasks (official MixMIM flag; default: 15000 + "
                             "job id %% 20000)")

    extra = parser.add_argument_group("additions to the official flags")
    extra.add_argument("--config", default=None, metavar="FILE",
                       help="a recipe file (YAML; configs/ has the published ones): its keys are these flags' "
                            "names and set their values; flags given on the command line win. Every run writes "
                            "its resolved config to <output_dir>/config.yaml, which --config takes back")
    extra.add_argument("--print_config", action="store_true",
                       help="print the resolved config (defaults, --config, command line, accum_iter and lr "
                            "resolved for the number of processes) as YAML and exit, touching no data")
    extra.add_argument("--effective_batch", type=int, default=None, metavar="N",
                       help="the effective batch (batch_size * accum_iter * processes) the recipe asks for: "
                            "sets --accum_iter from --batch_size and the number of processes, so one command "
                            "serves 8 or 64 GPUs; the lr scaling uses N as always")
    extra.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                       help="autocast precision (default: bf16 on GPUs that support it, else fp16; none on CPU)")
    extra.add_argument("--compile", action="store_true", help="torch.compile the model")
    extra.add_argument("--deterministic", action="store_true",
                       help="deterministic GPU kernels (torch.use_deterministic_algorithms, fixed cuBLAS workspace, "
                            "no cuDNN autotuning): bit-identical resume on GPUs too, at some speed cost")
    extra.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="clip gradient norm")
    extra.add_argument("--print_freq", type=int, default=20, help="print progress every N iterations")
    extra.add_argument("--save_every", type=int, default=20,
                       help="write checkpoint-<epoch>.pth every N epochs (and after the last)")
    extra.add_argument("--save_every_steps", type=int, default=0,
                       help="also refresh checkpoint-last.pth every N iterations inside an epoch (0: off)")
    extra.add_argument("--keep_last", type=int, default=0,
                       help="keep only the K newest checkpoint-<epoch>.pth (0: keep all)")
    extra.add_argument("--no_auto_resume", action="store_true",
                       help="do not resume from <output_dir>/checkpoint-last.pth when it exists")
    extra.add_argument("--on_nonfinite", choices=["stop", "skip", "rollback"], default=None,
                       help="what a non-finite loss does: stop training (default), skip that optimizer step, or "
                            "rollback: reload the last checkpoint in-process and replay without the samples of "
                            "that step (listed in the log and in the checkpoints)")
    extra.add_argument("--skip_nonfinite", action="store_true", help="the same as --on_nonfinite skip")
    extra.add_argument("--max_rollbacks", type=int, default=3, metavar="N",
                       help="--on_nonfinite rollback: stop once N windows of samples were skipped")
    extra.add_argument("--step_timeout_s", type=float, default=None, metavar="S",
                       help="hang watchdog: end the process (stacks in <output_dir>/hang/, exit code 124) when no "
                            "optimizer step completes within S seconds (default: max(600, 20x the median step "
                            "time); 0: no watchdog)")
    extra.add_argument("--startup_timeout_s", type=float, default=1200, metavar="S",
                       help="hang watchdog: the allowance of start-up up to the first optimizer step (compile "
                            "included), of a checkpoint save and of an evaluation")
    extra.add_argument("--dist_timeout_s", type=float, default=1800, metavar="S",
                       help="process-group timeout: a collective that waits longer fails")
    extra.add_argument("--grad_ckpt", action="store_true",
                       help="activation checkpointing: recompute each block in the backward pass (less memory "
                            "for ViT-H or large batches, about a third more compute)")
    extra.add_argument("--data_format", choices=DATA_FORMATS, default="auto",
                       help="what --data_path holds: folder (ImageNet layout), wds (WebDataset tar shards), hf "
                            "(a Hugging Face dataset on disk); auto: detected from what is there")
    extra.add_argument("--image_column", default=None,
                       help="hf: the image column (default: the Image feature, else image/img/jpg)")
    extra.add_argument("--label_column", default=None,
                       help="hf: the label column (default: the ClassLabel feature, else label/labels/cls)")
    extra.add_argument("--data_order", choices=["auto", "global", "shard"], default="auto",
                       help="training order: global (a random permutation of all samples, as for folders) or "
                            "shard (tar shards: shuffle the shards, then the samples within windows of "
                            "--shuffle_shards shards, so that each shard is read once per epoch); auto: shard "
                            "for tar shards, else global")
    extra.add_argument("--shuffle_shards", type=int, default=4, metavar="K",
                       help="--data_order shard: shards shuffled together (and open at once per loader worker)")
    extra.add_argument("--dist_strategy", choices=["ddp", "fsdp"], default="ddp",
                       help="how the model is spread over the processes: 'ddp' keeps a whole replica (weights, "
                            "gradients, AdamW state: 16 bytes per parameter) on each; 'fsdp' shards every "
                            "transformer block over the processes with FSDP2 (models beyond ViT-H: ViT-2B, "
                            "ViT-6.5B), with sharded checkpoint directories (README: Sharded training)")
    extra.add_argument("--fsdp_shard_size", type=int, default=0, metavar="N",
                       help="with --dist_strategy fsdp: shard inside groups of N processes (e.g. the GPUs of "
                            "one node) and replicate across the groups (hybrid sharding); 0: shard over all")
    extra.add_argument("--async_save", action="store_true",
                       help="with --dist_strategy fsdp: write checkpoints in the background (training waits "
                            "only for the copy to host memory; the next save waits for the write)")
    extra.add_argument("--data_pipeline", choices=["uint8", "device_decode", "pil"], default=None,
                       help="training images: 'uint8' decodes JPEGs to uint8 tensors, crops and flips them "
                            "in the workers and normalises on the device (2x the images/s per worker); "
                            "'device_decode' leaves the JPEG decoding (nvjpeg on CUDA), crop and flip to the "
                            "training device, the workers only read files and draw the crops; "
                            "'pil' is the official PIL pipeline. Default: uint8 for pretraining and linear "
                            "probing, pil for fine-tuning (RandAugment works on PIL images)")
    perf = parser.add_argument_group("performance: MFU in the progress line, the profiler")
    perf.add_argument("--peak_tflops", type=float, default=None, metavar="TFLOPS",
                      help="the device's peak for MFU (default: the dense bf16/fp16/tf32 peak of A100, H100, H200 "
                           "from NVIDIA's data sheets, on CPU a measured matmul)")
    perf.add_argument("--profile", action="store_true",
                      help="write a torch.profiler trace (tensorboard, Perfetto) of --profile_steps training steps "
                           "into <output_dir>/profile/, with ranges for data wait, forward, backward, optimizer "
                           "step and checkpoint save; on CUDA also a memory snapshot; training goes on")
    perf.add_argument("--profile_steps", type=int, nargs=2, default=[10, 5], metavar=("START", "COUNT"),
                      help="the steps profiled: COUNT steps from step START of the run (default: 10 5, after warm-up)")
    perf.add_argument("--profile_ranks", type=int, nargs="+", default=[0], metavar="RANK",
                      help="the ranks that profile (default: 0)")
    wandb = parser.add_argument_group("Weights & Biases (optional; off without --wandb_project; WANDB_MODE=offline "
                                      "for nodes without network, then `wandb sync`)")
    wandb.add_argument("--wandb_project", default="", help="log to this W&B project (needs the wandb package)")
    wandb.add_argument("--wandb_run_name", default="", help="the W&B run's display name (default: W&B's)")
    wandb.add_argument("--wandb_entity", default="", help="the W&B team or user (default: your default entity)")
    wandb.add_argument("--wandb_tags", default="", help="comma-separated W&B run tags")


def add_monitor_args(parser: argparse.ArgumentParser) -> None:
    """The representation monitor of pretraining (engine/monitor.py; README: Is pretraining working?)."""
    g = parser.add_argument_group("representation monitor (k-NN and linear-probe top-1 of the encoder's features "
                                  "on a labelled dataset; off by default)")
    g.add_argument("--monitor_every", default=0, type=int, metavar="N",
                   help="measure every N epochs and after the last (0: off); the first run also measures the "
                        "initial weights")
    g.add_argument("--monitor_data_path", default="", metavar="PATH",
                   help="labelled images with a train and a val split, in any format --data_path takes "
                        "(default: --data_path, which then needs a val split)")
    g.add_argument("--monitor_train_size", default=10000, type=int, metavar="N",
                   help="images in the k-NN memory bank and the probe's training set: a class-balanced subset "
                        "of the train split, fixed by --seed")
    g.add_argument("--monitor_val_size", default=5000, type=int, metavar="N",
                   help="val images scored: a class-balanced subset of the val split, fixed by --seed")


def add_classification_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the fine-tuning and linear-probing CLIs."""
    parser.add_argument("--finetune", default="", help="initialise the encoder from this pretraining checkpoint")
    parser.add_argument("--global_pool", action="store_true", default=None,
                        help="average the patch tokens (then fc_norm) for the head (default for fine-tuning, "
                             "and for MixMIM, which has no class token)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="use the class token (after the final norm) for the head (ViT linear-probing default)")
    parser.add_argument("--nb_classes", default=1000, type=int, help="number of classification types")
    parser.add_argument("--eval", action="store_true", help="only evaluate --resume on <data_path>/val")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="shard evaluation over the processes (each sample counted exactly once)")
