"""`pretrain-launch` without starting training: cluster detection, rendered commands and
sbatch scripts, and bad input refused in one line before anything starts."""

import re
import sys

import pytest

from launch import cli
from launch.commands import torchrun_command
from launch.config import TorchrunLauncher
from parallel.cluster_env import ClusterEnvError, detect, first_slurm_host
from launch.node import torchrun_argv
from launch.slurm import render_sbatch
from launch.config import SlurmLauncher

# --- cluster detection ---------------------------------------------------------------------


def test_detects_each_launcher():
    single = detect({})
    assert (single.rank, single.world_size, single.source, single.master_port) == (0, 1, "single", None)

    torchrun = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                       "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x",
                       # torchrun under srun, one task per node: Slurm's world is the nodes
                       "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.master_addr,
            torchrun.master_port, torchrun.source) == (3, 1, 4, "n1", 29400, "torchrun")

    slurm = detect({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[007-010,012],cpu1", "SLURM_JOB_ID": "12345"})
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.master_addr, slurm.source) == \
        (5, 1, 8, "gpu007", "slurm")
    assert slurm.master_port == 20000 + 12345 % 20000
    assert slurm.as_environ()["MASTER_ADDR"] == "gpu007" and slurm.as_environ()["RANK"] == "5"
    # The batch script itself (no step) runs `pretrain` as a world of one.
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1

    mpi = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1"})
    assert (mpi.rank, mpi.world_size, mpi.master_addr, mpi.master_port, mpi.source) == \
        (2, 4, "10.0.0.1", 29500, "openmpi")

    assert first_slurm_host("node1") == "node1" and first_slurm_host("a[1-3]") == "a1"


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
      "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
     "RANK=1 but SLURM_PROCID=0 with WORLD_SIZE=SLURM_NTASKS=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1",
      "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "RANK=0 but OMPI_COMM_WORLD_RANK=1"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2: expected 0 <= rank < world size 2"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT are not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': expected an integer"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
])
def test_contradicting_launcher_variables_fail_in_one_line(env, expected):
    with pytest.raises(ClusterEnvError) as err:
        detect(env)
    assert expected in str(err.value) and "\n" not in str(err.value)


# --- rendered commands -----------------------------------------------------------------------


def test_torchrun_commands():
    single = torchrun_command(TorchrunLauncher(nproc_per_node=4, max_restarts=2), ["a=1"])
    assert single[1:] == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=4",
                          "--max_restarts=2", "--standalone", "-m", "pretrain.main", "a=1"]
    host = torchrun_command(TorchrunLauncher(nnodes=2, rdzv_endpoint="127.0.0.1:29411"), [])
    assert "--rdzv_backend=c10d" in host and "--rdzv_conf=is_host=1" in host
    assert "--rdzv_endpoint=127.0.0.1:29411" in host and "--local_addr=127.0.0.1" in host
    static = torchrun_command(TorchrunLauncher(nnodes=3, node_rank=2, master_addr="10.1.2.3"), [],
                              probe=False)
    assert {"--node_rank=2", "--master_addr=10.1.2.3", "--master_port=29500"} <= set(static)


def test_slurm_node_entry_points_every_node_at_the_first():
    env = {"SLURM_JOB_NODELIST": "gpu[04-07]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2",
           "SLURM_JOB_ID": "777"}
    argv = torchrun_argv(["--nproc_per_node=8", "-m", "pretrain.main", "x=1"], env)
    assert argv[1:] == ["-m", "torch.distributed.run", "--nnodes=4", "--rdzv_backend=c10d",
                        f"--rdzv_endpoint=gpu04:{20000 + 777}", "--rdzv_id=slurm-777",
                        "--rdzv_conf=is_host=0", "--nproc_per_node=8", "-m", "pretrain.main", "x=1"]
    first = torchrun_argv(["--rdzv-port=29999"], {**env, "SLURM_NODEID": "0"})
    assert "--rdzv_conf=is_host=1" in first and "--rdzv_endpoint=gpu04:29999" in first


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_sbatch_for_one_and_sixty_four_nodes(tmp_path):
    one = render_sbatch(SlurmLauncher(time="00:30:00", signal_seconds=60), ["optim.lr=0.001"],
                        tmp_path / "run", tmp_path)
    assert sbatch_lines(one) == [
        "--job-name=pretrain", "--nodes=1", "--ntasks-per-node=1", "--time=00:30:00",
        f"--output={tmp_path}/run/logs/slurm-%j.out", "--open-mode=append", "--requeue",
        "--signal=B:USR1@60"]
    big = SlurmLauncher(nodes=64, gpus_per_node=8, cpus_per_node=96, mem="0", partition="gpu",
                        account="proj", qos="high", time="2-00:00:00", job_name="llama8b",
                        output="/logs/%x-%j.out", requeue=False, signal_seconds=600,
                        save_wait_seconds=300, rdzv_port=29555, max_restarts=3,
                        setup=["module load cuda/12.4", "export NCCL_DEBUG=WARN"],
                        directives=["--exclusive", "--constraint=h100"])
    script = render_sbatch(big, ["model=llama_8b", "trainer.run_dir=/runs/a b"], tmp_path / "run", tmp_path)
    assert sbatch_lines(script) == [
        "--job-name=llama8b", "--nodes=64", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--cpus-per-task=96", "--mem=0", "--partition=gpu", "--account=proj", "--qos=high",
        "--time=2-00:00:00", "--output=/logs/%x-%j.out", "--open-mode=append", "--no-requeue",
        "--signal=B:USR1@600", "--exclusive", "--constraint=h100"]
    assert "module load cuda/12.4\nexport NCCL_DEBUG=WARN\n" in script
    assert "SAVE_WAIT_SECONDS=300" in script and "REQUEUE=0" in script
    srun = re.search(r"^srun .*\\\n(.*) &$", script, re.M)
    assert srun.group(0).startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=96")
    assert srun.group(1).split()[1:] == [
        "-m", "launch.node", "--rdzv-port=29555", "--nproc_per_node=8", "--max_restarts=3", "-m",
        "pretrain.main", "model=llama_8b", "'trainer.run_dir=/runs/a", "b'"]
    # USR1 is trapped by the script, forwarded to the steps, then the job requeues itself.
    assert 'trap on_usr1 USR1' in script and 'scancel --signal=USR1 "$SLURM_JOB_ID"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script


# --- bad input ------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["pretrain-launch", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.cli()
    return exit_.value.code, capsys.readouterr()


@pytest.mark.parametrize("args,expected", [
    (["launcher.nproc_per_node=3", "parallel.tensor=2"],
     "launcher=local starts 3 ranks (launcher.nproc_per_node=3): expected a multiple of "
     "parallel.tensor x parallel.pipeline = 2"),
    (["launcher=slurm", "launcher.nodes=3", "launcher.gpus_per_node=8", "parallel.tensor=8",
      "parallel.pipeline=2", "model.num_attention_heads=8", "model.num_query_groups=8"],
     "launcher=slurm starts 24 ranks (launcher.nodes=3 x 8 per node): expected a multiple of "
     "parallel.tensor x parallel.pipeline = 16"),
    (["launcher=torchrun", "launcher.nnodes=2", "launcher.rdzv_endpoint=no-such-host.invalid:29400",
      "trainer.micro_batch_size=4"], "cannot resolve host 'no-such-host.invalid'"),
    (["launcher=torchrun", "launcher.nnodes=2", "launcher.rdzv_endpoint=nonsense"],
     "launcher.rdzv_endpoint=nonsense: expected HOST:PORT"),
    (["launcher=slurm", "launcher.sbatch=/nonexistent/sbatch"],
     "launcher.sbatch=/nonexistent/sbatch: not installed"),
    (["launcher=slurm", "launcher.time=90:00", "launcher.signal_seconds=6000"],
     "launcher.signal_seconds=6000: expected less than launcher.time=90:00 (5400 s)"),
    (["launcher=local", "launcher.partition=gpu"], "Key 'partition' is not in struct"),
    (["launcher=deepspeed", "launcher.hostfile=/nonexistent/hosts"],
     "launcher.hostfile=/nonexistent/hosts: no such file"),
    (["launcher=nosuch"], "Could not find 'launcher/nosuch'"),
    (["-m", "optim.lr=1e-3,-1"], "optim.lr=-1.0: expected > 0"),
])
def test_bad_input_fails_in_one_line(monkeypatch, capsys, tmp_path, args, expected):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(monkeypatch, capsys, *args)
    errors = [line for line in out.err.splitlines() if line.startswith("pretrain-launch: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], out.err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unreachable_endpoint_is_probed_before_starting(monkeypatch, capsys, tmp_path):
    # TEST-NET-1 (RFC 5737): routable on paper, nothing ever answers.
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(monkeypatch, capsys, "launcher=torchrun", "launcher.nnodes=2",
                        "launcher.rdzv_endpoint=192.0.2.1:29400", "launcher.probe_seconds=1",
                        "trainer.micro_batch_size=4")
    assert code == 2, out
    assert out.err.strip().splitlines()[-1].startswith(
        "pretrain-launch: error: launcher.rdzv_endpoint=192.0.2.1:29400: nothing accepts TCP connections")
    assert "torch.distributed.run" not in out.out


def test_hostfile_slots_must_fit_the_layout(monkeypatch, capsys, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n")
    code, out = run_cli(monkeypatch, capsys, "launcher=deepspeed", f"launcher.hostfile={hostfile}",
                        "launcher.include='node1:0,1,2@node2'", "parallel.tensor=2")
    assert code == 2 and "starts 7 ranks (the slots of launcher.hostfile" in out.err
    code, out = run_cli(monkeypatch, capsys, "--dry-run", "launcher=deepspeed",
                        f"launcher.hostfile={hostfile}", "launcher.exclude=node2:3", "parallel.tensor=1",
                        "trainer.micro_batch_size=1", "trainer.global_batch_size=7")
    assert code == 0, out.err
    command = out.out.strip().splitlines()[-1]
    assert f"--hostfile={hostfile}" in command and "--exclude=node2:3" in command
    assert "--module pretrain.main" in command


def test_slurm_multirun_writes_one_job_per_point(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(monkeypatch, capsys, "-m", "--dry-run", "launcher=slurm", "launcher.nodes=2",
                        "trainer.global_batch_size=16", "optim.lr=1e-3,3e-3",
                        f"trainer.run_dir={tmp_path / 'sweep'}")
    assert code == 0, out.err
    scripts = sorted((tmp_path / "sweep").glob("*/job.sbatch"))
    assert [s.parent.name for s in scripts] == ["0_optim.lr=0.001", "1_optim.lr=0.003"]
    for script, lr in zip(scripts, ("0.001", "0.003")):
        text = script.read_text()
        assert "#SBATCH --nodes=2" in text and f"optim.lr={lr}" in text
        assert f"RUN_DIR={script.parent}" in text


def test_slurm_refuses_a_run_dir_a_live_job_holds(monkeypatch, capsys, tmp_path):
    from pretrain.checkpoint.run_lock import RunDirLock

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = ("--dry-run", "launcher=slurm", "launcher.nodes=2", "trainer.global_batch_size=16",
            f"trainer.run_dir={run_dir}")
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    script = (run_dir / "job.sbatch").read_bytes()
    lock = RunDirLock(run_dir)  # this process stands for the running job
    lock.acquire()
    try:
        code, out = run_cli(monkeypatch, capsys, *args, "launcher.time=02:00:00")
    finally:
        lock.release()
    assert code == 2 and out.err.count("\n") == 1, out.err
    assert f"trainer.run_dir={run_dir}: in use by pid {lock.me.pid}" in out.err
    assert (run_dir / "job.sbatch").read_bytes() == script  # left as it was
    assert run_cli(monkeypatch, capsys, *args, "launcher.time=02:00:00")[0] == 0  # free again
    assert (run_dir / "job.sbatch").read_bytes() != script
