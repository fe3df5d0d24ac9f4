"""A loaded tiny model and tokenizer, shared by the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ngdiff.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(str(tiny_model_dir))
