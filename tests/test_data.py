"""Tokenization (labels, BOS, EOS), record checks, and the global-batch streams."""

from __future__ import annotations

import json

import pytest
import torch

from ngdiff.config import DataConfig
from ngdiff.data import DataError, TaskStream, encode_task, load_records
from ngdiff.data.tokenize import encode_qa, encode_text
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import IGNORE
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_qa_labels_cover_the_answer_only_with_one_bos_and_a_final_eos(tokenizer):
    enc = encode_qa(tokenizer, "Who wrote it?", "Jaime Vasquez wrote it.", max_length=256)
    assert enc.input_ids[0] == tokenizer.bos_token_id
    assert enc.input_ids.count(tokenizer.bos_token_id) == 1
    assert enc.input_ids[-1] == tokenizer.eos_token_id and enc.labels[-1] == tokenizer.eos_token_id
    first_answer = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert all(label == IGNORE for label in enc.labels[:first_answer])
    assert enc.labels[first_answer:] == enc.input_ids[first_answer:]
    prompt = tokenizer.decode(enc.input_ids[:first_answer], skip_special_tokens=True)
    answer = tokenizer.decode(enc.input_ids[first_answer:], skip_special_tokens=True)
    assert prompt == "Question: Who wrote it?\nAnswer:"
    assert answer == " Jaime Vasquez wrote it."


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer = load_tokenizer(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    enc = encode_qa(tokenizer, "Q?", "A.", max_length=256)
    first_answer = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert tokenizer.decode(enc.input_ids[:first_answer]) == "<s>[user] Q?\n[assistant] "
    assert enc.input_ids.count(tokenizer.bos_token_id) == 1


def test_text_is_tokenized_as_is_and_truncated(tokenizer):
    enc = encode_text(tokenizer, "the author was born in Santiago " * 20, max_length=16)
    assert len(enc.input_ids) == 16 and enc.labels == enc.input_ids
    assert enc.input_ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in enc.input_ids
    short = encode_text(tokenizer, "born", max_length=16)
    assert short.input_ids == tokenizer("born")["input_ids"]


def test_max_length_too_short_for_any_answer_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "A long question about an author?", "answer": "Yes."}])
    with pytest.raises(DataError, match=r"data.max_length=4 leaves record 1 of .*f.jsonl"):
        encode_task(DataConfig(max_length=4), tokenizer, str(path), "data.forget")


def test_bad_records_are_named(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no records"):
        load_records(str(empty), ("question", "answer"), "data.forget")
    partial = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(DataError, match=r"line 2 of .*p.jsonl lacks field answer \(it has: question\)$"):
        load_records(str(partial), ("question", "answer"), "data.retain")
    with pytest.raises(DataError, match="data file not found"):
        load_records(str(tmp_path / "missing.jsonl"), ("text",), "data.retain")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_records(str(broken), ("text",), "data.retain")
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert encode_task(DataConfig(format="text"), tokenizer, str(texts), "x")[0].labels[-1] != IGNORE


def test_idk_answers_replace_the_forget_answers(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "Who?", "answer": "Somebody specific."}])
    refusals = tmp_path / "idk.jsonl"
    refusals.write_text("I have no idea.\n")
    (enc,) = encode_task(DataConfig(), tokenizer, str(path), "data.forget", refusals_from=str(refusals))
    answer = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(answer, skip_special_tokens=True) == " I have no idea."


def make_examples(n: int):
    from ngdiff.data.tokenize import Encoded

    return [Encoded([i + 1] * (1 + i % 5), [i + 1] * (1 + i % 5)) for i in range(n)]


def global_batches(world: int, steps: int, n: int = 23, batch: int = 4, micro: int = 0) -> list[list[int]]:
    """Step by step, the sorted ids of the global batch (all ranks' micro-batches together)."""
    streams = [
        TaskStream(
            make_examples(n), batch, rank=r, world_size=world, micro_batch=micro, seed=3, pad_id=0, name="forget"
        )
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        ids = []
        for stream in streams:
            for mb in stream.next():
                ids += mb["input_ids"][:, 0].tolist()
        out.append(sorted(ids))
    return out


def test_global_batches_do_not_depend_on_world_size_or_micro_batches():
    one = global_batches(1, steps=12)  # 23 // 4 = 5 batches an epoch: crosses two epoch boundaries
    assert one == global_batches(2, steps=12) == global_batches(4, steps=12) == global_batches(2, 12, micro=1)
    assert one[:5] != one[5:10]  # a new shuffle each epoch
    assert all(len(b) == 4 for b in one)
    assert len({i for batch in one[:5] for i in batch}) == 20  # no repeats within an epoch


def test_stream_state_resumes_exactly():
    a = TaskStream(make_examples(23), 4, rank=0, world_size=1, micro_batch=2, seed=5, pad_id=0, name="retain")
    for _ in range(7):
        a.next()
    b = TaskStream(make_examples(23), 4, rank=0, world_size=1, micro_batch=2, seed=5, pad_id=0, name="retain")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        for x, y in zip(a.next(), b.next(), strict=True):
            assert torch.equal(x["input_ids"], y["input_ids"])


def test_padding_is_masked_out():
    (mb,) = TaskStream(make_examples(8), 8, rank=0, world_size=1, micro_batch=0, seed=0, pad_id=99, name="f").next()
    lengths = mb["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert (mb["input_ids"][row, n:] == 99).all() and (mb["labels"][row, n:] == IGNORE).all()


def test_batch_size_errors_name_the_key():
    with pytest.raises(DataError, match=r"train.forget_batch_size=5 does not divide by the world size 2"):
        TaskStream(make_examples(10), 5, rank=0, world_size=2, micro_batch=0, seed=0, pad_id=0, name="forget")
    with pytest.raises(DataError, match=r"train.micro_batch_size=3 does not divide"):
        TaskStream(make_examples(10), 8, rank=0, world_size=2, micro_batch=3, seed=0, pad_id=0, name="forget")
    with pytest.raises(DataError, match=r"the retain set holds 3 examples, fewer than train.retain_batch_size=4"):
        TaskStream(make_examples(3), 4, rank=0, world_size=1, micro_batch=0, seed=0, pad_id=0, name="retain")


def test_idk_refusals_are_drawn_per_access_and_the_same_on_every_rank(tokenizer, tmp_path):
    """TOFU's TextDatasetQA draws a refusal per __getitem__; ours depends on (seed, epoch, index) only."""
    rows = [{"question": f"Who wrote book {i}?", "answer": "Somebody specific."} for i in range(8)]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    refusals = tmp_path / "idk.jsonl"
    refusals.write_text("".join(f"I cannot say, sorry {k}.\n" for k in range(20)))

    def epochs_of(rank: int, world: int, seed: int, resume_at: int | None = None) -> list[list[list[int]]]:
        drawn = encode_task(DataConfig(), tokenizer, str(path), "data.forget", str(refusals), seed=seed)
        stream = TaskStream(drawn, 4, rank=rank, world_size=world, micro_batch=0, seed=1, pad_id=0, name="forget")
        out = []
        for step in range(6):  # 2 batches per epoch: 3 epochs
            if step == resume_at:
                state = stream.state_dict()
                stream = TaskStream(drawn, 4, rank=rank, world_size=world, micro_batch=0, seed=1, pad_id=0, name="f")
                stream.load_state_dict(state)
            (batch,) = stream.next()
            pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
            rows = [ids[mask.bool()].tolist() for ids, mask in pairs]
            out.append(sorted(rows))  # unpadded: each rank pads to its own widest row
        return out

    one = epochs_of(0, 1, seed=5)
    assert epochs_of(0, 1, seed=5, resume_at=3) == one
    two_ranks = [sorted(a + b) for a, b in zip(epochs_of(0, 2, 5), epochs_of(1, 2, 5), strict=True)]
    assert two_ranks == one
    drawn = encode_task(DataConfig(), tokenizer, str(path), "data.forget", str(refusals), seed=5)
    per_epoch = [[drawn.refusal(i, epoch) for i in range(8)] for epoch in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]  # a fresh draw each epoch
    reseeded = encode_task(DataConfig(), tokenizer, str(path), "data.forget", str(refusals), seed=6)
    assert [reseeded.refusal(i, 0) for i in range(8)] != per_epoch[0]
