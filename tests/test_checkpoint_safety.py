"""Checkpoints and the metrics log under attack and accident: planted pickles are refused, a damaged newest
checkpoint gives way to the previous one, a resumed run's history has each step once, a deleted run
folder or a full disk stops the run with one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from launcher.cli import main
from ngdiff.checkpoint import FILES, agree, checkpoint_problem, load_checkpoint
from ngdiff.config import load_config
from ngdiff.errors import UserError
from ngdiff.metrics_log import JsonlSink, read_jsonl
from ngdiff.pipeline import run_training
from ngdiff.trainer import Trainer
from parallel.base import DistContext
from parallel.safe_load import UnsafeCheckpointError, weights_only_loads
from tests.conftest import tiny_run_overrides


def overrides(tiny_model_dir, tofu_split, out, *extra) -> list[str]:
    return tiny_run_overrides(tiny_model_dir, tofu_split, "autolr.enabled=false", f"output_dir={out}", *extra)


def train(tiny_model_dir, tofu_split, out, *extra, on_trainer=None):
    cfg = load_config(None, overrides(tiny_model_dir, tofu_split, out, *extra))
    return run_training(cfg, DistContext(), on_trainer=on_trainer)


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


class Planted:
    """A pickle that, unpickled without weights_only, writes `marker`: what an attacker would plant."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, checkpoint: Path, raw: bool = False) -> None:
    """Replace `path` with a planted pickle (torch's format, or a `raw` one as in a distributed checkpoint's
    `.metadata`) and record its size, as an attacker who read files.json would."""
    if raw:
        path.write_bytes(pickle.dumps(Planted(marker)))
    else:
        torch.save({"torch": Planted(marker)}, path)
    if (checkpoint / FILES).is_file():
        sizes = json.loads((checkpoint / FILES).read_text())
        sizes[str(path.relative_to(checkpoint))] = path.stat().st_size
        (checkpoint / FILES).write_text(json.dumps(sizes))


def error_line(err: str) -> str:
    """The CLI's one error line (the log lines beside it come from the run's logging)."""
    lines = [line for line in err.splitlines() if line.startswith("ngdiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def steps_in(out: Path) -> list[int]:
    return [row["step"] for row in read_jsonl(out / "metrics.jsonl")]


# --- planted pickles --------------------------------------------------------------------------------------
def test_a_planted_rng_file_is_refused_and_never_run(tiny_model_dir, tofu_split, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "ran"
    train(tiny_model_dir, tofu_split, out, "train.max_steps=2", "train.save_every=1")
    planted = step_dir(out, 2) / "rng_rank0.pt"
    plant(planted, marker, step_dir(out, 2))
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as refused:
        train(tiny_model_dir, tofu_split, out, "train.max_steps=3", "train.save_every=1", "train.resume=auto")
    assert not marker.exists()
    assert str(planted) in str(refused.value) and "posix.system" in str(refused.value)


def test_distributed_checkpoint_metadata_and_values_load_weights_only(tmp_path):
    """FSDP's checkpoint (torch.distributed.checkpoint): its `.metadata` is a plain pickle."""
    from parallel.fsdp import FSDPBackend

    backend = FSDPBackend.__new__(FSDPBackend)  # the save/load methods need only a model and an optimizer
    backend.model = torch.nn.Linear(3, 2)
    backend.optimizer = torch.optim.AdamW(backend.model.parameters(), lr=0.25)
    backend.model(torch.ones(1, 3)).sum().backward()
    backend.optimizer.step()
    saved = backend.model.weight.detach().clone()
    backend.save_checkpoint(tmp_path)
    with torch.no_grad():
        backend.model.weight.zero_()
    backend.optimizer.param_groups[0]["lr"] = 1.0
    backend.load_checkpoint(tmp_path)  # the genuine checkpoint still loads
    assert torch.equal(backend.model.weight, saved) and backend.optimizer.param_groups[0]["lr"] == 0.25

    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to load"):
        backend.load_checkpoint(tmp_path)
    assert not marker.exists()


def test_deepspeed_checkpoint_engine_loads_weights_only(tmp_path):
    """ZeRO-3's files go through DeepSpeed's checkpoint engine, which asks for weights_only=False: inside
    `weights_only_loads` it gets weights-only loading (this fails if DeepSpeed stops calling torch.load)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from parallel.zero3 import checkpoint_globals

    engine, marker = TorchCheckpointEngine(), tmp_path / "ran"
    genuine = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights, "w": torch.ones(2)}
    engine.save(genuine, str(tmp_path / "optim_states.pt"))
    torch.save({"module": Planted(marker)}, tmp_path / "model_states.pt")
    with weights_only_loads(checkpoint_globals(), where=tmp_path):
        loaded = engine.load(str(tmp_path / "optim_states.pt"), map_location="cpu")
        assert loaded["zero_stage"] is ZeroStageEnum.weights and loaded["loss_scaler"].cur_scale == 1.0
        with pytest.raises(UnsafeCheckpointError, match=r"model_states\.pt: refused to load"):
            engine.load(str(tmp_path / "model_states.pt"), map_location="cpu")
    assert not marker.exists()


# --- damaged checkpoints ----------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated model file": lambda step: truncate(step / "engine" / "model_optimizer.pt"),
    "broken trainer state": lambda step: (step / "trainer_state.json").write_text('{"step": 3, "lr"'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_gives_way_to_the_previous_one(
    tiny_model_dir, tofu_split, tmp_path, damage, caplog
):
    out = tmp_path / "run"
    train(tiny_model_dir, tofu_split, out, "train.max_steps=3", "train.save_every=1")
    DAMAGE[damage](step_dir(out, 3))
    with caplog.at_level(logging.WARNING, logger="ngdiff.checkpoint"):
        resumed = train(tiny_model_dir, tofu_split, out, "train.max_steps=4", "train.save_every=1", "train.resume=auto")
    assert resumed.trainer.step_index == 4 and len(resumed.results) == 2  # steps 3 and 4, from step 2's checkpoint
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(step_dir(out, 3)) in warning[0] and "previous checkpoint" in warning[0]
    assert steps_in(out) == [1, 2, 3, 4]


def test_no_intact_checkpoint_left_is_one_line(tiny_model_dir, tofu_split, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, tofu_split, out, "train.max_steps=2", "train.save_every=1")
    assert main(["train", *args]) == 0
    for step in (1, 2):
        truncate(step_dir(out, step) / "engine" / "model_optimizer.pt")
    assert main(["train", *args, "train.resume=auto"]) == 2
    err = error_line(capsys.readouterr().err)
    assert f"{step_dir(out, 2)}: engine/model_optimizer.pt holds" in err and "no intact checkpoint" in err


def test_checkpoint_problem_names_a_missing_file(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 2}')
    (tmp_path / FILES).write_text(json.dumps({"rng_rank1.pt": 10}))
    assert checkpoint_problem(tmp_path) == "rng_rank1.pt is missing"


class TwoRanks:
    """A backend stand-in for rank 0 of 2: its all-reduces add what the peer rank contributes."""

    def __init__(self, *peer: float):
        self.ctx = DistContext(rank=0, world_size=2)
        self.peer = torch.tensor(peer, dtype=torch.float64)

    def all_reduce_sum(self, tensor):
        return tensor + self.peer

    def load_checkpoint(self, directory):
        pass  # this rank's part loads


def test_ranks_must_agree_on_the_checkpoint(tmp_path):
    agree(TwoRanks(3.0, 9.0), tmp_path / "step_00000003")
    with pytest.raises(UserError, match="another rank from another checkpoint"):
        agree(TwoRanks(2.0, 4.0), tmp_path / "step_00000003")


def test_a_rank_that_cannot_load_stops_every_rank(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 3}')
    assert load_checkpoint(TwoRanks(0.0), tmp_path) == {"step": 3}
    with pytest.raises(UserError, match="another rank could not load its part of the checkpoint"):
        load_checkpoint(TwoRanks(1.0), tmp_path)  # the peer's load failed


# --- the metrics log across a resume ----------------------------------------------------------------------
class Crash(Exception):
    pass


def crash_in_step(index: int):
    def hook(trainer) -> None:
        original = trainer.unlearning_step

        def step():
            if trainer.step_index == index:
                raise Crash
            return original()

        trainer.unlearning_step = step

    return hook


def test_a_resumed_run_logs_each_step_once(tiny_model_dir, tofu_split, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):  # steps 1-3 logged, the last checkpoint at step 2
        train(tiny_model_dir, tofu_split, out, "train.max_steps=5", "train.save_every=2", on_trainer=crash_in_step(3))
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"step": 2, "eval_forget": 1.5}\n{"step": 4, "lo')  # an evaluation row, a row cut short
    train(tiny_model_dir, tofu_split, out, "train.max_steps=5", "train.save_every=2", "train.resume=auto")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 2, 3, 4, 5]
    assert rows[2] == {"step": 2, "eval_forget": 1.5}


def test_jsonl_sink_resumed_at_keeps_lines_it_cannot_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    sink = JsonlSink(path, append=True)
    sink.resumed_at(2)
    sink.log({"loss": 0.5}, 3)
    sink.finish()
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3, "loss": 0.5}\n'


@pytest.mark.parametrize("stop", ["stop_forget_loss", "stop_request"])
def test_the_step_that_stops_a_run_is_logged(tiny_model_dir, tofu_split, tmp_path, stop):
    from tests.conftest import stop_requested_in_step

    extra = ["train.max_steps=20", "train.log_every=5"]
    if stop == "stop_forget_loss":
        outcome = train(tiny_model_dir, tofu_split, tmp_path / "run", *extra, "train.stop_forget_loss=0.01")
        stopped_at = 1
    else:
        outcome = train(tiny_model_dir, tofu_split, tmp_path / "run", *extra, on_trainer=stop_requested_in_step(1))
        stopped_at = 2
    assert outcome.trainer.step_index == stopped_at
    assert steps_in(tmp_path / "run") == [stopped_at]


# --- the run folder deleted, the disk full ----------------------------------------------------------------
def deleting_the_run_folder_in_step(out: Path, index: int):
    original = Trainer.unlearning_step

    def step(trainer):
        if trainer.step_index == index:
            shutil.rmtree(out)
        return original(trainer)

    return step


@pytest.mark.parametrize("log_every", [1, 100])  # found by the next metrics row, or else by the next checkpoint
def test_deleting_the_run_folder_stops_the_run(tiny_model_dir, tofu_split, tmp_path, capsys, log_every):
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, tofu_split, out, "train.max_steps=4", "train.save_every=2")
    with patch.object(Trainer, "unlearning_step", deleting_the_run_folder_in_step(out, 1)):
        code = main(["train", *args, f"train.log_every={log_every}"])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert f"run folder {out}" in err and "deleted or replaced" in err
    assert not out.exists()  # nothing recreated it


def full_disk_on_save(after: int, error: BaseException):
    """torch.save that fails once `after` saves went through."""
    original, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > after:
            raise error
        return original(obj, f, *args, **kwargs)

    return save


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/3"),
        RuntimeError("basic_ios::clear: iostream error"),
    ],
    ids=["enospc", "stream-writer", "iostream"],
)
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_one(
    tiny_model_dir, tofu_split, tmp_path, capsys, error
):
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, tofu_split, out, "train.max_steps=4", "train.save_every=2")
    with patch("torch.save", full_disk_on_save(2, error)):  # step 2's model and RNG files, then the disk is full
        code = main(["train", *args])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{out / 'checkpoints'}: could not write the checkpoint" in err
    assert "no space left" in err or "failed writing" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert checkpoint_problem(step_dir(out, 2)) is None


def test_a_full_disk_while_exporting_is_one_line(tiny_model_dir, tofu_split, tmp_path, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
        )

    out = tmp_path / "run"
    with patch("safetensors.torch.save_file", full):
        code = main(["train", *overrides(tiny_model_dir, tofu_split, out, "train.max_steps=1")])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{out / 'final'}: could not write the exported model: no space left on device" in err
    assert not (out / "final").exists()  # the partial shard and the folder made for it are gone


def test_read_jsonl_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "loss": \n')
    with pytest.raises(UserError, match=rf"{path}, line 3: not a JSON record"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=rf"{path}, line 2: not a JSON object but list"):
        read_jsonl(path)


# --- the sharded engines, end to end on a 1-rank group (a process of their own) ---------------------------
SHARDED_RESUME = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.test_checkpoint_safety import Planted, plant, step_dir, train
from ngdiff.errors import UserError

model, forget, retain, out, backend, planted_name = sys.argv[2:8]
split, out = {"forget": forget, "retain": retain}, Path(out)
extra = [f"parallel.backend={backend}", "optim.name=adamw", "train.save_every=1"]
train(model, split, out, *extra, "train.max_steps=2")
genuine = train(model, split, out, *extra, "train.max_steps=3", "train.resume=auto")  # from step 2: the real files load
planted = next(step_dir(out, 3).rglob(planted_name))
plant(planted, out.parent / "ran", step_dir(out, 3), raw=planted.name == ".metadata")
try:
    train(model, split, out, *extra, "train.max_steps=4", "train.resume=auto")
    refused = None
except UserError as err:
    refused = str(err)
print("RESULT", json.dumps({"steps": len(genuine.results), "refused": refused, "planted": str(planted)}))
"""


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("backend", "planted_name"),
    [("zero3", "*_model_states.pt"), ("zero3", "*_optim_states.pt"), ("fsdp", ".metadata")],
)
def test_sharded_engines_resume_their_own_files_and_refuse_planted_ones(
    tiny_model_dir, tofu_split, tmp_path, backend, planted_name
):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    args = [str(repo), str(tiny_model_dir), str(tofu_split["forget"]), str(tofu_split["retain"]), str(tmp_path / "r")]
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_RESUME, *args, backend, planted_name],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["steps"] == 1  # resumed at step 2 from DeepSpeed's / torch's genuine files
    assert result["refused"] is not None and f"{result['planted']}: refused to load" in result["refused"]
    assert not (tmp_path / "ran").exists()
