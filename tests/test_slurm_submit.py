"""`ngdiff slurm submit` without a cluster: the script it renders, and every way it refuses bad input.

A stand-in `sbatch` on PATH records whether it was called, so "fails before sbatch" is observed,
not assumed. The real cluster runs the same scripts in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.slurm_env import SlurmJob, expand_nodelist
from tests.conftest import tofu_rows, write_jsonl

SECRET = "hf_tok_9d8c7b6a5f4e3d2c1b0a99887766554433"


@pytest.fixture
def base(tiny_model_dir, tofu_split, tmp_path) -> list[str]:
    return [
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
        f"output_dir={tmp_path / 'run'}",
        "train.max_steps=4",
    ]


def sharded() -> str:
    """A multi-process backend override."""
    return "parallel.backend=ddp"


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` that logs its arguments and prints job id 4242 (or fails if told to)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls"
    script = bin_dir / "sbatch"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ -n "$FAKE_SBATCH_ERROR" ]; then echo "sbatch: error: $FAKE_SBATCH_ERROR" >&2; exit 1; fi\n'
        "echo 4242\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_dry_run_prints_a_torchrun_script_and_submits_nothing(base, fake_sbatch, tmp_path, capsys):
    args = [*base, sharded(), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "04:00:00"]
    assert main(["slurm", "submit", *args, "--account", "proj1", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert not fake_sbatch.exists() and not (tmp_path / "run").exists()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --time=04:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%x-%j.out",
        'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
    ):
        assert line in script.splitlines(), line
    assert "--nproc-per-node=4 --rdzv-backend=c10d" in script and "train.resume=auto" in script
    # the launcher survives the warning signal (runs under launcher.signals); the workers act on it
    assert "-m launcher.signals torch.distributed.run --nnodes" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell


def test_deepspeed_launcher_gets_a_hostfile(base, capsys):
    args = ["slurm", "submit", *base, sharded(), "--nodes", "2", "--gpus-per-node", "8", "--launcher", "deepspeed"]
    assert main([*args, "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert 'do echo "$node slots=8"; done > "$HOSTFILE"' in script
    assert "deepspeed.launcher.runner" in script and "--no_ssh" in script and '--node_rank="$SLURM_NODEID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_submit_writes_config_and_script_next_to_the_run_and_prints_the_job_id(base, fake_sbatch, tmp_path, capsys):
    assert main(["slurm", "submit", *base, "--nodes", "1", "--gpus-per-node", "1"]) == 0
    assert capsys.readouterr().out.strip() == "4242"
    run = tmp_path / "run"
    script = run / "slurm" / "job.sbatch"
    assert fake_sbatch.read_text().split() == ["--parsable", str(script)]
    assert os.access(script, os.X_OK)
    assert "resume: auto" in (run / "config.yaml").read_text()
    # resubmitting the same run continues it; a different run in the same folder is refused
    assert main(["slurm", "submit", *base, "--nodes", "1", "--gpus-per-node", "1"]) == 0
    capsys.readouterr()
    assert main(["slurm", "submit", *base, "optim.lr=0.5", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert len(fake_sbatch.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--nodes", "0", "--nodes must be a positive integer"), ("--gpus-per-node", "-2", "--gpus-per-node must be")],
)
def test_non_positive_resources_are_refused(base, fake_sbatch, capsys, flag, value, message):
    args = {"--nodes": "1", "--gpus-per-node": "1", flag: value}
    assert main(["slurm", "submit", *base, *(x for kv in args.items() for x in kv)]) == 2
    assert message in capsys.readouterr().err
    assert not fake_sbatch.exists()


def test_invalid_config_fails_before_sbatch(base, fake_sbatch, tmp_path, capsys):
    assert main(["slurm", "submit", *base, "optim.lr=-1", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "optim.lr must be positive" in capsys.readouterr().err
    assert main(["slurm", "submit", *base, "method.combiner=ngdif", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "did you mean ngdiff" in capsys.readouterr().err
    # two nodes x one GPU is two processes: the single backend cannot run them
    assert main(["slurm", "submit", *base, "--nodes", "2", "--gpus-per-node", "1"]) == 2
    assert "parallel.backend=single runs one process" in capsys.readouterr().err
    assert not fake_sbatch.exists() and not (tmp_path / "run").exists()


def test_missing_sbatch_is_a_clear_error(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["slurm", "submit", *base, "--nodes", "1", "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert not (tmp_path / "run").exists()


def test_sbatch_refusal_shows_its_message(base, fake_sbatch, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "Batch job submission failed: Invalid account")
    assert main(["slurm", "submit", *base, "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid account" in (
        capsys.readouterr().err
    )


def test_secrets_stay_out_of_script_and_config(base, fake_sbatch, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET[::-1])
    assert main(["slurm", "submit", *base, "--nodes", "1", "--gpus-per-node", "1"]) == 0
    written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert SECRET not in written and SECRET[::-1] not in written
    capsys.readouterr()
    # a credential pasted into the config is refused before anything is written or submitted
    leaked = [*base, f"output_dir={tmp_path / 'other'}", f"logging.run_name={SECRET}"]
    assert main(["slurm", "submit", *leaked, "--nodes", "1", "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err
    assert "logging.run_name holds the value of a credential" in err and SECRET not in err
    assert not (tmp_path / "other").exists() and len(fake_sbatch.read_text().splitlines()) == 1


def test_expand_nodelist_matches_scontrol_syntax():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("n[1-2]") == ["n1", "n2"]
    assert expand_nodelist("rack[1-2]-n[8-9]") == ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_nodelist("n[1-2")


def test_slurm_job_names_the_run_after_the_job():
    env = {
        "SLURM_JOB_ID": "977",
        "SLURM_JOB_NAME": "ngdiff-tofu",
        "SLURM_JOB_NODELIST": "gpu[3-4]",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_RESTART_COUNT": "2",
    }
    job = SlurmJob.from_env(env)
    assert job is not None and job.run_name == "ngdiff-tofu-977" and job.group == "slurm-977"
    assert job.nodes == ("gpu3", "gpu4") and job.restart_count == 2
    assert "on node 1 (gpu4)" in job.describe() and "restart 2" in job.describe()
    array = SlurmJob.from_env({**env, "SLURM_ARRAY_JOB_ID": "970", "SLURM_ARRAY_TASK_ID": "7"})
    assert array.run_name == "ngdiff-tofu-970_7" and array.group == "slurm-970"  # a sweep shares a group
    assert SlurmJob.from_env({}) is None


def test_container_runtimes_wrap_each_node_launcher(base, capsys):
    one = ["--nodes", "1", "--gpus-per-node", "1", "--dry-run"]
    assert (
        main(["slurm", "submit", *base, *one, "--container-image", "nvcr.io#acme/ngdiff:0.1", "--mount", "/data"]) == 0
    )
    pyxis = capsys.readouterr().out
    assert "--container-image='nvcr.io#acme/ngdiff:0.1' --container-mounts=" in pyxis and ",/data " in pyxis
    assert "PYTHON=python" in pyxis  # the image's interpreter, not this machine's
    assert main(["slurm", "submit", *base, *one, "--apptainer", "/images/ngdiff.sif"]) == 0
    apptainer = capsys.readouterr().out
    assert "apptainer exec --nv --bind" in apptainer and "/images/ngdiff.sif" in apptainer
    for script in (pyxis, apptainer):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    both = ["--container-image", "img", "--apptainer", "x.sif"]
    assert main(["slurm", "submit", *base, *one, *both]) == 2
    assert "choose one container runtime" in capsys.readouterr().err


def test_paths_that_sbatch_lines_cannot_carry_are_refused(base, tmp_path, fake_sbatch, capsys):
    args = [*base, f"output_dir={tmp_path / 'with space'}", "--nodes", "1", "--gpus-per-node", "1"]
    assert main(["slurm", "submit", *args]) == 2
    assert "contains whitespace" in capsys.readouterr().err and not fake_sbatch.exists()


@pytest.fixture
def sequence_base(tiny_model_dir, tofu_split, tmp_path) -> list[str]:
    return [
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']},{tofu_split['forget_b']}",
        f"data.retain={tofu_split['retain']}",
        f"output_dir={tmp_path / 'seq'}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "train.max_steps=1",
        "logging.progress=false",
        "eval.max_items=2",
        "eval.max_new_tokens=2",
    ]


def test_sequence_dry_run_runs_ngdiff_sequence_from_its_own_config(sequence_base, fake_sbatch, tmp_path, capsys):
    for launcher, module in (("torchrun", "-m launcher sequence"), ("deepspeed", "--module launcher sequence")):
        args = [*sequence_base, sharded(), "--nodes", "1", "--gpus-per-node", "2", "--launcher", launcher]
        assert main(["slurm", "submit", "--sequence", *args, "--dry-run"]) == 0
        script = capsys.readouterr().out
        assert f'{module} "$4" train.resume=auto' in script and "launcher train" not in script
        assert f"CONFIG={tmp_path / 'seq' / 'slurm' / 'sequence.yaml'}" in script.splitlines()
        assert "#SBATCH --requeue" in script.splitlines()
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not fake_sbatch.exists() and not (tmp_path / "seq").exists()


def test_sequence_refusals_come_before_sbatch(sequence_base, tofu_split, fake_sbatch, tmp_path, capsys):
    one = ["--nodes", "1", "--gpus-per-node", "1"]
    # sequence keys belong to --sequence; a sequence of one set, or an invalid mode, is refused as the command would
    assert main(["slurm", "submit", *sequence_base, "sequence.mode=chain", *one]) == 2
    assert "sequence.mode is read by `ngdiff sequence` only" in capsys.readouterr().err
    single = [*sequence_base, f"data.forget={tofu_split['forget']}"]
    assert main(["slurm", "submit", "--sequence", *single, *one]) == 2
    assert "two" in capsys.readouterr().err
    assert main(["slurm", "submit", "--sequence", *sequence_base, "sequence.mode=nope", *one]) == 2
    assert "sequence.mode" in capsys.readouterr().err
    assert not fake_sbatch.exists() and not (tmp_path / "seq").exists()


def test_submitted_sequence_is_what_the_job_runs_and_resubmits_continue(sequence_base, fake_sbatch, tmp_path, capsys):
    """The folder claimed at submission is accepted by the job's own command, which runs the sequence from
    slurm/sequence.yaml; resubmitting the finished sequence, or with a set appended, continues it."""
    one = ["--nodes", "1", "--gpus-per-node", "1"]
    sequence_base = [*sequence_base, "sequence.mode=chain"]
    assert main(["slurm", "submit", "--sequence", *sequence_base, *one]) == 0
    assert capsys.readouterr().out.strip() == "4242"
    seq = tmp_path / "seq"
    job_config = seq / "slurm" / "sequence.yaml"
    assert "resume: auto" in job_config.read_text() and "mode: chain" in job_config.read_text()
    assert main(["sequence", str(job_config), "train.resume=auto"]) == 0  # what the job runs on its node
    record = json.loads((seq / "sequence.json").read_text())
    assert [r["mode"] for r in record["requests"]] == ["chain", "chain"]
    assert [r["steps"] for r in record["requests"]] == [1, 1] and all(r["final"] for r in record["requests"])
    # a requeued or resubmitted job skips what is finished
    assert main(["slurm", "submit", "--sequence", *sequence_base, *one]) == 0
    assert main(["sequence", str(job_config), "train.resume=auto"]) == 0
    assert json.loads((seq / "sequence.json").read_text())["requests"] == record["requests"]
    # a set appended to data.forget: the job keeps both requests and runs the third
    third = write_jsonl(tmp_path / "third.jsonl", tofu_rows(100)[84:92])
    forget = next(o for o in sequence_base if o.startswith("data.forget="))
    appended = [*sequence_base, f"{forget},{third}"]
    assert main(["slurm", "submit", "--sequence", *appended, *one]) == 0
    assert main(["sequence", str(job_config), "train.resume=auto"]) == 0
    longer = json.loads((seq / "sequence.json").read_text())
    assert longer["requests"][:2] == record["requests"] and longer["requests"][2]["steps"] == 1
    capsys.readouterr()
    # another method in the same folder is refused, as `ngdiff sequence` refuses it
    assert main(["slurm", "submit", "--sequence", *sequence_base, "optim.lr=0.5", *one]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert len(fake_sbatch.read_text().splitlines()) == 3
