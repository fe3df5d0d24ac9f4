"""Independent, cycled, resumable streams of global batches, one per task.

Each rank takes its slice of every global batch from a `DistributedSampler` (shuffled, `drop_last`),
so the union over ranks of step k's batches is the same set of examples whatever the world size:
one process and N processes train on identical global batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data.distributed import DistributedSampler

from ngdiff.data.records import DataError
from ngdiff.data.tokenize import Encoded
from ngdiff.objectives import IGNORE

MicroBatch = dict[str, torch.Tensor]


def collate(examples: Sequence[Encoded], pad_id: int) -> MicroBatch:
    """Right-pad to the longest example; padded positions are masked out of attention and loss. Examples
    with an alternate answer (DPO) add its batch under `alt_`-prefixed keys."""
    batch = pad_examples(examples, pad_id)
    if examples[0].alternate is not None:
        alternates = pad_examples([e.alternate for e in examples], pad_id)  # type: ignore[misc]
        batch.update({f"alt_{key}": value for key, value in alternates.items()})
    return batch


def pad_examples(examples: Sequence[Encoded], pad_id: int) -> MicroBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TaskStream:
    """This rank's share of each global batch of one task, as a list of micro-batches."""

    def __init__(
        self,
        examples: Sequence[Encoded],
        global_batch: int,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        seed: int,
        pad_id: int,
        name: str,
        label: str = "",
    ):
        """`name`: the role whose `train.<name>_batch_size` sets `global_batch` (errors name that key);
        `label`: the task, when a role has several (errors name its set)."""
        if global_batch % world_size:
            raise DataError(f"train.{name}_batch_size={global_batch} does not divide by the world size {world_size}")
        per_rank = global_batch // world_size
        micro = micro_batch or per_rank
        if per_rank % micro:
            raise DataError(
                f"train.{name}_batch_size={global_batch} over {world_size} rank(s) gives {per_rank} per rank, "
                f"which train.micro_batch_size={micro} does not divide"
            )
        if len(examples) < global_batch:
            raise DataError(
                f"the {label or name} set holds {len(examples)} examples, "
                f"fewer than train.{name}_batch_size={global_batch}"
            )
        self.examples = examples
        self.per_rank = per_rank
        self.micro = micro
        self.pad_id = pad_id
        self.sampler = DistributedSampler(
            range(len(examples)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch = len(examples) // global_batch
        self.epoch = 0
        self.position = 0
        self._indices: list[int] | None = None

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro

    def _epoch_indices(self) -> list[int]:
        if self._indices is None:
            self.sampler.set_epoch(self.epoch)
            self._indices = list(iter(self.sampler))
        return self._indices

    def next(self) -> list[MicroBatch]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._indices = None
        start = self.position * self.per_rank
        chosen = self._epoch_indices()[start : start + self.per_rank]
        self.position += 1
        draw = getattr(self.examples, "draw", None)  # examples drawn per access (DrawnRefusals)
        pick = (lambda i: draw(i, self.epoch)) if draw is not None else self.examples.__getitem__
        return [
            collate([pick(i) for i in chosen[k : k + self.micro]], self.pad_id)
            for k in range(0, len(chosen), self.micro)
        ]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._indices = None
