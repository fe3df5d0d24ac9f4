"""The memory helpers of the sharded engines, in one process: the retain-gradient stash, the streaming
safetensors writer (files and index as save_pretrained writes them) and row-sliced checkpoint reads."""

from __future__ import annotations

import json

import pytest
import torch

from parallel.export import ShardedSafetensorsWriter
from parallel.loading import INDEX_FILE, SINGLE_FILE, load_shards, missing_tensors, safetensors_files
from parallel.stash import GradientStash


def test_fp32_stash_is_an_exact_copy():
    grads = [torch.randn(5, 3), torch.randn(7)]
    stash = GradientStash(grads)
    copies = list(stash)
    for g, c in zip(grads, copies, strict=True):
        assert torch.equal(g, c) and g.data_ptr() != c.data_ptr()
    grads[0].zero_()  # the live gradient is overwritten by the forget backward; the stash is not
    assert not torch.equal(next(iter(stash)), grads[0])


def test_bf16_stash_rounds_to_bf16_and_halves_the_bytes():
    grads = [torch.tensor([1.0 + 2**-10, 3.0, -2.0 - 2**-9])]  # bf16 keeps 8 bits of mantissa
    stash = GradientStash(grads, "bf16", offload=True)
    (back,) = list(stash)
    assert back.dtype == torch.float32
    assert back.tolist() == [1.0, 3.0, -2.0]
    assert stash.nbytes() == 3 * 2 and stash.tensors[0].device.type == "cpu"


def test_stash_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="stash_dtype"):
        GradientStash([torch.zeros(1)], "fp16")


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(10, 4), "b.weight": torch.randn(6, 4), "c.bias": torch.randn(3)}


def test_writer_splits_into_shards_with_an_index(tmp_path):
    from safetensors.torch import load_file

    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=200)  # a: 160 B, b: 96 B, c: 12 B
    for name, value in tensors().items():
        writer.add(name, value)
    assert writer.close() == (40 + 24 + 3) * 4
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 268
    assert index["weight_map"] == {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "c.bias": "model-00002-of-00002.safetensors",
    }
    files = safetensors_files(tmp_path)
    loaded = {name: load_file(str(path))[name] for name, path in files.items()}
    assert all(torch.equal(loaded[k], v) for k, v in tensors().items())
    assert not list(tmp_path.glob("*.partial"))


def test_writer_single_file_in_bf16(tmp_path):
    from safetensors.torch import load_file

    writer = ShardedSafetensorsWriter(tmp_path, dtype="bf16")
    for name, value in tensors().items():
        writer.add(name, value)
    writer.close()
    assert not (tmp_path / INDEX_FILE).exists()
    loaded = load_file(str(tmp_path / SINGLE_FILE))
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in tensors().items())


def test_load_shards_reads_whole_plain_tensors_and_names_what_is_missing(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=100)
    for name, value in tensors().items():
        writer.add(name, value)
    writer.close()
    files = safetensors_files(tmp_path)
    targets = {k: torch.empty_like(v) for k, v in tensors().items()}
    load_shards(targets.items(), files)
    assert all(torch.equal(targets[k], v) for k, v in tensors().items())

    model = torch.nn.Linear(4, 10)
    model.register_buffer("a", torch.zeros(1))  # persistent: the checkpoint must hold it
    assert missing_tensors(model, files) == ["weight", "bias", "a"]
    assert safetensors_files(tmp_path / "nowhere") is None
    with pytest.raises(ValueError, match="shape"):
        load_shards([("a.weight", torch.empty(4, 4))], files)
