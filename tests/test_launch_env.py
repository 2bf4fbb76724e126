"""Process-group setup from the launchers' environments (SLURM srun, OpenMPI), as real processes."""
import socket
import subprocess

import pytest
import torch

from util.dist import first_host, slurm_master_port

from conftest import MINI, assert_ok, cli_env, main_cmd


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"),
    ("gpu[007-009,012]", "gpu007"),
    ("gpu[12,3-4],cpu1", "gpu12"),
    ("a1,b[1-2]", "a1"),
    ("rack1-n[0003-0010]-ib", "rack1-n0003-ib"),
])
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(photos, out, env_for_rank, extra=()):
    procs = []
    for rank in range(2):
        env = cli_env()
        env.update(env_for_rank(rank))
        args = [*MINI, "--data_path", photos, "--batch_size", 3, "--epochs", 1, "--output_dir", out, *extra]
        procs.append(subprocess.Popen(main_cmd("main_pretrain.py", args), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def test_srun_environment_starts_a_process_group(photos, tmp_path):
    job_id = str(free_port() - 15000)  # the port the job id maps to is free
    assert slurm_master_port(job_id) >= 15000

    def env(rank):
        return dict(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                    SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id)

    r0, r1 = launch_two(photos, tmp_path, env)
    assert_ok(r0)
    assert_ok(r1)
    assert "Start training" in r0.stdout and "Start training" not in r1.stdout  # rank 0 prints alone
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_openmpi_environment_with_dist_on_itp(photos, tmp_path):
    port = str(free_port())

    def env(rank):
        return dict(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
                    OMPI_COMM_WORLD_LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

    for r in launch_two(photos, tmp_path, env, extra=["--dist_on_itp"]):
        assert_ok(r)
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["world_size"] == 2


def test_srun_port_flag_sets_the_master_port(photos, tmp_path):
    """--port (official MixMIM flag) replaces the port derived from the job id: that one is taken here."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        job_id = str(taken.getsockname()[1] - 15000)
        port = free_port()

        def env(rank):
            return dict(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                        SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id)

        r0, r1 = launch_two(photos, tmp_path, env, extra=["--port", port])
    assert_ok(r0)
    assert_ok(r1)
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["world_size"] == 2
