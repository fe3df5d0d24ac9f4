"""Attacks: RTN quantization against a dequantise-by-hand reference; relearning resumable."""

from __future__ import annotations

import pytest
import torch

from ngdiff.attacks.quantize import quantized, rtn_dequantized


def test_int8_per_row_absmax_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [2.0, 1.0, -0.3]])
    # row 0: scale 1/127 -> round(-63.5) = -64 (half to even), round(31.75) = 32
    expected = torch.tensor([[127, -64, 32], [0, 0, 0], [127, round(63.5), round(-0.3 * 127 / 2)]]) * torch.tensor(
        [[1 / 127], [1.0], [2 / 127]]
    )
    assert torch.allclose(rtn_dequantized(w, 8), expected.float())


def test_int4_groupwise_by_hand():
    w = torch.tensor([[0.7, -0.1, 0.35, 1.4]])
    # groups of 2: [0.7, -0.1] scale 0.1 -> [7, -1]; [0.35, 1.4] scale 0.2 -> [round(1.75)=2, 7]
    expected = torch.tensor([[0.7, -0.1, 0.4, 1.4]])
    assert torch.allclose(rtn_dequantized(w, 4, group_size=2), expected, atol=1e-6)


def test_quantized_context_restores_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with quantized(model, "int4") as n:
        assert n == 2
        assert torch.allclose(model[0].weight, rtn_dequantized(before[0], 4, 128))
        assert not torch.equal(model[0].weight, before[0])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_relearning_resumes_to_the_same_curve(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from ngdiff.attacks.relearn import RelearnConfig, relearning_curve
    from ngdiff.attacks.scoring import Scoring
    from ngdiff.modeling import load_tokenizer
    from tests.conftest import tofu_rows

    tok = load_tokenizer(str(tiny_model_dir))
    rows = tofu_rows(6)
    how = Scoring(max_new_tokens=3, batch_size=4)

    def curve(steps: int, state):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        return relearning_curve(model, tok, "m", rows, RelearnConfig(steps, 1e-2, 2), how, state)["curve"]

    straight = curve(2, None)
    assert straight[2]["answer_loss"] < straight[0]["answer_loss"]
    curve(1, tmp_path / "state.pt")  # interrupted after one step
    resumed = curve(2, tmp_path / "state.pt")
    assert [p["step"] for p in resumed] == [0, 1, 2]
    for a, b in zip(straight, resumed, strict=True):
        assert a["answer_loss"] == pytest.approx(b["answer_loss"], rel=1e-5)


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_a_planted_relearning_state_is_refused_not_run(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from ngdiff.attacks.relearn import RelearnConfig, relearning_curve
    from ngdiff.attacks.scoring import Scoring
    from ngdiff.modeling import load_tokenizer
    from parallel.safe_load import UnsafeCheckpointError
    from tests.conftest import tofu_rows

    state = tmp_path / "relearn_state.pt"
    torch.save({"identity": "x", "curve": [], "payload": _Planted()}, state)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    how = Scoring(max_new_tokens=3, batch_size=4)
    with pytest.raises(UnsafeCheckpointError, match=r"relearn_state\.pt: refused to load"):
        relearning_curve(model, load_tokenizer(str(tiny_model_dir)), "m", tofu_rows(4), RelearnConfig(1), how, state)
    assert "planted code ran" not in capsys.readouterr().out
