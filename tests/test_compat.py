"""parallel.compat: every patch of a library internal is active on the installed versions, no code outside the
layer names such an internal, a missing internal is reported (warning or clear error) instead of silently
ignored, and fsdp still imports and runs on gloo without FSDP2's private collective classes."""

from __future__ import annotations

import ast
import logging
import textwrap
from pathlib import Path

import pytest

from parallel import compat
from tests.test_backend_imports import run_with_classes

ROOT = Path(__file__).parents[1]

# internals that only parallel/compat may name: attributes, names, and modules
PRIVATE_ATTRIBUTES = {
    "_create_fp32_partitions",
    "cdb",
    "_partition_all_parameters",
    "_reassign_or_swap_out_partitioned_parameters",
    "fp32_partitioned_groups_flat",
    "is_deepspeed_available",
    "_init_weights",
    "_get_fsdp_state",
    "_fsdp_param_groups",
    "_unsafe_preserve_version_counter",
    "foreach_reduce_scatter_copy_in",
    "_get_metadata_path",
    "__init_subclass__",
    "HfDeepSpeedConfig",
}
PRIVATE_MODULES = ("torch.distributed.fsdp._fully_shard", "transformers.integrations")


def test_every_registered_patch_is_active_on_the_installed_versions():
    """A library upgrade that removes or renames an internal the code relies on fails here, by name."""
    assert len(compat.REGISTRY) >= 10
    inactive = {
        row["name"]: f"{row['reason']}; {row['versions']}" for row in compat.status(load=True) if not row["active"]
    }
    assert inactive == {}
    for patch in compat.REGISTRY.values():
        assert patch.verified and patch.why and patch.targets, patch.name


def private_name(node: ast.AST) -> str | None:
    """The private internal `node` names (an attribute, a name, an import, `torch.load = ...`), or None."""
    if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
        return node.attr
    if isinstance(node, ast.Name) and node.id in PRIVATE_ATTRIBUTES:
        return node.id
    if isinstance(node, ast.Import | ast.ImportFrom):
        from_import = isinstance(node, ast.ImportFrom)
        modules = [node.module or ""] if from_import else [alias.name for alias in node.names]
        names = [alias.name for alias in node.names] if from_import else []
        hits = [m for m in modules if m.startswith(PRIVATE_MODULES)] + [n for n in names if n in PRIVATE_ATTRIBUTES]
        return ", ".join(hits) or None
    if isinstance(node, ast.Assign) and any(ast.unparse(target) == "torch.load" for target in node.targets):
        return "torch.load ="
    return None


def private_uses(path: Path) -> list[str]:
    """Where a file names a private internal, as 'file:line: name'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for node in ast.walk(tree) if (name := private_name(node))
    ]


def test_no_code_outside_the_compat_layer_names_a_private_internal():
    files = [p for top in ("parallel", "ngdiff", "launcher") for p in (ROOT / top).rglob("*.py")]
    files = [p for p in files if "compat" not in p.relative_to(ROOT).parts]
    assert len(files) > 50
    found = [use for path in files for use in private_uses(path)]
    assert found == []
    # the scan sees what it looks for: the compat layer itself is full of them
    assert private_uses(ROOT / "parallel" / "compat" / "deepspeed.py")


def test_a_missing_required_internal_is_a_clear_error(monkeypatch):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    monkeypatch.delattr(DeepSpeedZeroOptimizer_Stage3, "_partition_all_parameters")
    assert "_partition_all_parameters not found" in compat.problem("deepspeed.stage3_repartition")
    inactive = r"deepspeed.stage3_repartition is inactive.*installed deepspeed \S+ \(verified 0\.19"
    with pytest.raises(compat.CompatError, match=inactive):
        compat.deepspeed.repartition(object())
    assert not {r["name"]: r for r in compat.status()}["deepspeed.stage3_repartition"]["active"]


def test_a_missing_optional_internal_warns_once_and_applies_nothing(monkeypatch, caplog):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    monkeypatch.delattr(Stage3, "_create_fp32_partitions")
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=compat.COMPAT_LOGGER):
        for _ in range(2):
            with compat.deepspeed.fp32_master_is_the_partition():
                assert "_create_fp32_partitions" not in vars(Stage3)  # nothing patched in
    warnings = [r.getMessage() for r in caplog.records if "fp32_master_is_the_partition is inactive" in r.getMessage()]
    assert len(warnings) == 1
    assert "second copy of its parameter partition" in warnings[0]


def test_start_up_lists_every_patch_once_at_debug(monkeypatch, caplog):
    monkeypatch.setattr(compat, "_logged", False)
    with caplog.at_level(logging.DEBUG, logger=compat.COMPAT_LOGGER):
        compat.log_patches()
        compat.log_patches()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compat patch ")]
    assert len(lines) == len(compat.REGISTRY)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert any("torch.load_weights_only: active; torch " in line for line in lines)


def test_verbose_logging_shows_the_patches():
    from launcher.logs import COMPAT_LOGGER, setup_logging

    assert COMPAT_LOGGER == compat.COMPAT_LOGGER
    setup_logging(0, verbose=True)
    assert logging.getLogger(COMPAT_LOGGER).isEnabledFor(logging.DEBUG)
    setup_logging(0, verbose=False)
    assert not logging.getLogger(COMPAT_LOGGER).isEnabledFor(logging.DEBUG)


FSDP_ON_GLOO_WITHOUT_PRIVATE_COLLECTIVES = textwrap.dedent(
    """
    import logging, sys
    import torch.distributed.fsdp._fully_shard._fsdp_api as api
    HIDE
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    import torch
    from torch import nn
    import parallel.fsdp
    from ngdiff.config import OptimConfig, ParallelConfig
    from parallel.base import DistContext
    from parallel.compat import problem
    from parallel.distributed import init_single_process_group

    print("problem:", problem("torch.fsdp2_custom_collectives") or "none")
    ctx = DistContext()
    init_single_process_group(ctx)
    backend = parallel.fsdp.FSDPBackend(ctx, ParallelConfig(backend="fsdp"), OptimConfig(), "fp32")
    model = backend._shard(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)), mixed=False)
    model(torch.ones(2, 4)).sum().backward()
    print("chunked:", "parallel.fsdp_gloo" in sys.modules)
    print("ran")
    """
)


@pytest.mark.parametrize("hide", [True, False], ids=["classes_absent", "classes_present"])
def test_fsdp_on_gloo_without_fsdp2_private_collectives_falls_back_and_says_so(hide):
    done = run_with_classes(FSDP_ON_GLOO_WITHOUT_PRIVATE_COLLECTIVES, hide)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.strip().endswith("ran")  # sharded, forward and backward on gloo either way
    if hide:
        assert "problem: torch.distributed.fsdp._fully_shard._fsdp_api:AllGather not found" in out
        assert "chunked: False" in out  # the private subclasses were never imported
        warning = "WARNING compat patch torch.fsdp2_custom_collectives is inactive"
        assert out.count(warning) == 1, out
        assert "gloo runs of fsdp use gloo's own collectives" in out
    else:
        assert "problem: none" in out and "chunked: True" in out and "inactive" not in out


def test_deepspeeds_collectives_are_not_replaced_silently_where_its_backend_holds_none(monkeypatch, caplog):
    import deepspeed.comm.comm as ds_comm

    class Backend:  # a DeepSpeed communication backend that keeps no collective functions of its own
        pass

    def mine(*args, **kwargs):
        return None

    monkeypatch.setattr(ds_comm, "cdb", Backend())
    with caplog.at_level(logging.WARNING, logger=compat.COMPAT_LOGGER):
        assert compat.deepspeed.use_collectives(mine, mine) is False
    assert "deepspeed.gloo_collectives is inactive: Backend has no all_gather_function" in caplog.text
    holder = Backend()
    holder.all_gather_function = holder.reduce_scatter_function = None
    monkeypatch.setattr(ds_comm, "cdb", holder)
    assert compat.deepspeed.use_collectives(mine, mine) is True
    assert holder.all_gather_function is mine and holder.reduce_scatter_function is mine


def test_a_model_built_on_meta_gets_the_rotary_tables_of_a_normal_build(tiny_model_dir):
    """fsdp builds the model on `meta` and fills what no checkpoint stores: the rotary frequency tables must
    equal those of `from_pretrained` on every supported transformers (4.x's `_init_weights` leaves them
    as `to_empty` left them: garbage)."""
    import torch

    from ngdiff.modeling import model_factory
    from parallel.loading import init_non_persistent_buffers

    source = model_factory(str(tiny_model_dir))
    reference = dict(source().named_buffers())
    model = source.build_empty().module
    model.to_empty(device="cpu")
    for _, buffer in model.named_buffers():
        buffer.fill_(float("nan"))  # what to_empty leaves is arbitrary: make a missed table certain to show
    init_non_persistent_buffers(model)
    rebuilt = dict(model.named_buffers())
    assert any("inv_freq" in name for name in rebuilt), sorted(rebuilt)
    assert rebuilt.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=0, msg=name)
    for module in model.modules():  # 4.x's rotary modules read this alias, not the buffer
        if hasattr(module, "original_inv_freq"):
            torch.testing.assert_close(module.original_inv_freq, module.inv_freq, rtol=0, atol=0)


def test_without_the_readers_metadata_path_the_folders_metadata_is_read(monkeypatch, tmp_path, caplog):
    """torch < 2.9's FileSystemReader has no `_get_metadata_path`: fsdp resumes read `.metadata` at the
    checkpoint folder's root, where those versions write it, and a warning says the patch is inactive."""
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(tmp_path))
    monkeypatch.delattr(FileSystemReader, "_get_metadata_path", raising=False)
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=compat.COMPAT_LOGGER):
        path = compat.torch.dcp_metadata_path(reader)
    assert Path(path) == tmp_path / ".metadata"
    assert "torch.dcp_metadata_path is inactive" in caplog.text
