"""The real launchers: the `ngdiff` console script under torchrun (two simulated nodes on loopback) and
under the deepspeed launcher, and a rank killed mid-run."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import torch
from dist_helpers import (
    REPO,
    common_overrides,
    deepspeed_launcher,
    free_port,
    launch_env,
    load_result,
    matrix_cases,
    max_abs_diff,
    run_launch,
)

pytestmark = pytest.mark.distributed


def final_params(output_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    return {k: v.detach() for k, v in model.state_dict().items()}


def ngdiff_args(tiny_model_dir, tofu_split, backend: str, output_dir: Path, extra: list[str] = ()) -> list[str]:
    overrides = [*common_overrides(tiny_model_dir, tofu_split), *matrix_cases()["ngdiff_sgd"]]
    return ["train", *overrides, f"parallel.backend={backend}", f"output_dir={output_dir}", *extra, "--overwrite"]


def test_console_script_two_nodes_torchrun(single_reference, tiny_model_dir, tofu_split, tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d` on loopback, one rank per "node", fsdp."""
    port = free_port()
    args = ngdiff_args(tiny_model_dir, tofu_split, "fsdp", tmp_path / "run")
    with ExitStack() as stack:
        nodes = []
        for node_rank in range(2):
            cmd = [shutil.which("torchrun"), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=ngdiff-test",
                   "--local-addr=127.0.0.1", "--no-python", "ngdiff", *args]  # fmt: skip
            log = stack.enter_context(open(tmp_path / f"node{node_rank}.log", "w"))
            nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=launch_env(), cwd=REPO))
        codes = [p.wait(timeout=600) for p in nodes]
    logs = "\n".join((tmp_path / f"node{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    reference, _ = load_result(single_reference, "single_ngdiff_sgd")
    assert max_abs_diff(reference, final_params(tmp_path / "run")) <= 1e-5


def test_console_script_deepspeed_launcher(single_reference, tiny_model_dir, tofu_split, tmp_path):
    """`deepspeed --num_gpus 2 --no_python ngdiff train ...` with the shipped ZeRO-3 JSON."""
    extra = ["parallel.deepspeed_config=configs/deepspeed/zero3.json"]
    args = ngdiff_args(tiny_model_dir, tofu_split, "zero3", tmp_path / "run", extra)
    launcher = deepspeed_launcher()
    run_launch([*launcher, "--no_python", "ngdiff", *args], tmp_path / "deepspeed.log")
    reference, _ = load_result(single_reference, "single_ngdiff_sgd")
    assert max_abs_diff(reference, final_params(tmp_path / "run")) <= 1e-5
    # DeepSpeed's shared-memory all-reduce segments (66 MiB a rank) do not outlive the job
    port = launcher[launcher.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "launcher" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_dead_rank_stops_the_others_with_a_message(tiny_model_dir, tofu_split, tmp_path):
    """SIGKILL one rank of a 2-rank run: the run ends quickly (not a hang) and names the dead rank."""
    output = tmp_path / "run"
    args = ngdiff_args(
        tiny_model_dir, tofu_split, "ddp", output, ["train.max_steps=100000", "parallel.timeout_minutes=1"]
    )
    cmd = [shutil.which("torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "launcher", *args]  # fmt: skip
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=launch_env(), cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            metrics = output / "metrics.jsonl"
            while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # training is under way
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "training never started"
                time.sleep(0.5)
            victim = rank_process(psutil.Process(proc.pid), 1)
            assert victim is not None
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    elapsed = time.monotonic() - killed_at
    text = log_path.read_text()
    assert code != 0
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f}s to exit"
    # torchrun's failure report names the killed rank and its signal (our own log lines say "[rank 1]",
    # so a bare "rank 1" would match any log of this run)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", text), text[-3000:]
    assert re.search(r"exitcode\s*:\s*-9\b", text), text[-3000:]
    print(f"run ended {elapsed:.1f}s after rank 1 was killed", file=sys.stderr)
