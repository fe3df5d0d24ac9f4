"""Models and tokenizers: the real Hugging Face loading path, and a tiny builder for tests and the demo."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ngdiff.errors import UserError
from ngdiff.model_source import loading_from
from parallel.compat.accelerate import defer_deepspeed_import
from parallel.loading import EmptyModel

# the vocabulary files transformers' tokenizers load from (fast, sentencepiece, BPE, WordPiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")


def check_tokenizer_files(path: str | Path, key: str = "model.path", trust_remote_code: bool = False) -> None:
    """A local model folder without any tokenizer file is one error saying so (transformers instead asks
    for sentencepiece, as if a converter were missing). Remote code may name its files as it likes."""
    folder = Path(path).expanduser()
    if trust_remote_code or not folder.is_dir():
        return
    if not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise UserError(
            f"{key} {path}: the folder has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer there (tokenizer.save_pretrained) or copy it from the model it came from"
        )


def load_tokenizer(path: str, trust_remote_code: bool = False, key: str = "model.path"):
    from transformers import AutoTokenizer

    check_tokenizer_files(path, key, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from (a `parallel.loading.ModelBuilder`). Calling it loads the whole model
    (`from_pretrained`); a sharding backend may instead build it empty on the `meta` device (`build_empty`)
    and fill its shards from `path`. Either way a failed load is one error naming the config `key` and what
    was tried."""

    path: str
    trust_remote_code: bool = False
    dtype: torch.dtype = torch.float32
    key: str = "model.path"

    def __call__(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with loading_from(self.key, self.path):
            return AutoModelForCausalLM.from_pretrained(
                self.path, trust_remote_code=self.trust_remote_code, dtype=self.dtype
            )

    def build_empty(self) -> EmptyModel:
        """The architecture with every parameter and buffer on `meta`: no memory, no initialisation."""
        from transformers import AutoConfig, AutoModelForCausalLM

        with loading_from(self.key, self.path):
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code, dtype=self.dtype)
        return EmptyModel(model)


def model_factory(
    path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, key: str = "model.path"
) -> ModelSource:
    """A thunk the backend calls where it wants the model built (under `zero.Init`, on `meta`, ...)."""
    return ModelSource(path, trust_remote_code, dtype, key)


@dataclass(frozen=True)
class TinyLlamaSpec:
    """The demo's model: 1.4M parameters, learns 400 TOFU pairs in a few CPU minutes."""

    vocab_size: int = 2000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 512


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, isolate_whitespace: bool = False):
    """A byte-level BPE trained locally with `tokenizers` (no hub), wrapped as a HF fast tokenizer
    that adds BOS like Llama's does. `isolate_whitespace`: every whitespace run is a token of its own, so a
    prompt that ends in a space is tokenized as the start of the same text with its continuation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if isolate_whitespace:
        split = pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated")
        core.pre_tokenizer = pre_tokenizers.Sequence([split, core.pre_tokenizer])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(
    output_dir: str | Path,
    texts: Iterable[str],
    spec: TinyLlamaSpec = TinyLlamaSpec(),
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Write a randomly initialised small Llama and its tokenizer as an ordinary HF model directory
    (the tokenizer trained on `texts`, unless one is given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    defer_deepspeed_import()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
