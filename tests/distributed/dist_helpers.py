"""Helpers of the distributed tests: launchers, the case matrix, result loading and comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from itertools import product
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
BACKENDS = ("ddp", "fsdp", "zero3")
COMBINERS = ("ngdiff", "gdiff", "mgda", "pcgrad")
# the other Gram-matrix combiners (ngdiff/combiners.py, ngdiff/torchjd_adapter.py): one case each (SGD, no
# AutoLR), not the product above, whose cost is per combiner; krum needs 3 tasks: it runs in the k = 3 block
GRAM_COMBINERS = ("blur", "gru", "upgrad", "dualproj", "cagrad", "aligned_mtl", "fairgrad", "gradvac", "pcd")
GRAM_COMBINERS += ("torchjd_mgda", "torchjd_pcgrad", "torchjd_imtlg")
LR = {"sgd": 0.05, "adamw": 1e-4}  # small AdamW lr: Adam turns last-bit gradient noise into O(lr) moves
STEPS = 4


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return env


def run_launch(cmd: list[str], log: Path, timeout: float = 1200) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=launch_env(), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        pytest.fail(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{tail}")


def run_cases(out: Path, common: list[str], launches: list[tuple[list[str], list[dict], str]]) -> Path:
    """Each (launcher prefix, cases, label) is one launch of the worker, which runs all its cases in one
    process group and writes their results to `out` (its spec and log: `out/LABEL.json`, `.log`)."""
    for prefix, cases, label in launches:
        spec = out / f"{label}.json"
        spec.write_text(json.dumps({"common": common, "cases": cases}))
        run_launch([*prefix, str(WORKER), str(spec), str(out)], out / f"{label}.log")
    return out


def torchrun(nproc: int = 2) -> list[str]:
    return [
        shutil.which("torchrun") or "torchrun",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]


def deepspeed_launcher(nproc: int = 2) -> list[str]:
    return [
        shutil.which("deepspeed") or "deepspeed",
        "--num_gpus",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def common_overrides(model: Path, split: dict[str, Path]) -> list[str]:
    return [
        f"model.path={model}",
        f"data.forget={split['forget']}",
        f"data.retain={split['retain']}",
        f"train.max_steps={STEPS}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "autolr.every=2",
    ]


def two_forget_sets(split: dict[str, Path] | None) -> list[str]:
    """data.forget of the k = 3 cases: two forget sets (and the one retain set of the common overrides)."""
    return [f"data.forget={split['forget']},{split['forget_b']}"] if split else []


def matrix_cases(split: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """case name -> overrides (without the backend): every combiner x optimizer x AutoLR on/off, and k = 3
    tasks (two forget sets) for NGDiff, MGDA and PCGrad; one SGD case per GRAM_COMBINERS combiner, and
    k = 3 for TorchJD's UPGrad and Krum. The names do not depend on `split`; running the
    k = 3 cases needs it (their data.forget)."""
    cases = {}
    for combiner, optim, autolr in product(COMBINERS, LR, (False, True)):
        name = f"{combiner}_{optim}" + ("_autolr" if autolr else "")
        cases[name] = [
            f"method.combiner={combiner}",
            f"optim.name={optim}",
            f"optim.lr={LR[optim]}",
            f"autolr.enabled={str(autolr).lower()}",
        ]
    # NPO: the frozen reference model is sharded by the backend too (prepare_frozen)
    cases["npo_gdiff_sgd"] = [
        "method.forget_objective=npo",
        "method.combiner=gdiff",
        "optim.name=sgd",
        f"optim.lr={LR['sgd']}",
        "autolr.enabled=false",
    ]
    cases.update(objective_cases(split))
    # activation checkpointing recomputes the forward inside backward: same gradients, sharded or not
    cases["ngdiff_sgd_ckpt"] = [*cases["ngdiff_sgd"], "model.gradient_checkpointing=true"]
    for name in ("ngdiff_sgd", "mgda_sgd", "pcgrad_adamw_autolr"):
        cases[f"k3_{name}"] = [*cases[name], *two_forget_sets(split)]
    sgd = cases["ngdiff_sgd"][1:]
    for combiner in GRAM_COMBINERS:
        cases[f"{combiner}_sgd"] = [f"method.combiner={combiner}", *sgd]
    for combiner in ("upgrad", "krum"):
        cases[f"k3_{combiner}_sgd"] = [f"method.combiner={combiner}", *sgd, *two_forget_sets(split)]
    # global batch 8 in micro-batches of 2: 1 rank x 4 accumulation steps vs 2 ranks x 2
    cases["accum"] = [
        *cases["ngdiff_adamw_autolr"],
        "train.forget_batch_size=8",
        "train.retain_batch_size=8",
        "train.micro_batch_size=2",
    ]
    return cases


# open-unlearning's objectives (ngdiff/objectives/): IdkDPO and UNDIAL read the sharded frozen reference,
# RMU hooks a decoder layer of the trained and the frozen model (the tiny model has two)
NEW_OBJECTIVES = {
    # DPO's forget gradient is 2/beta = 20 times NPO's scale: a smaller step keeps fp32 last bits from growing
    "idkdpo": ["method.forget_objective=idkdpo", "optim.lr=0.01"],
    # DPO: the same loss with the record's own alternate answer (another author's) preferred to the refusal
    "dpo": ["method.forget_objective=dpo", "data.alternate_key=alternate", "optim.lr=0.01"],
    "wga": ["method.forget_objective=wga"],
    "satimp": ["method.forget_objective=satimp"],
    "undial": ["method.forget_objective=undial"],
    "ceu": ["method.forget_objective=ceu"],
    "pdu": ["method.forget_objective=pdu"],
    "rmu": [
        "method.forget_objective=rmu",
        "method.retain_objective=rmu",
        "method.rmu_layer=model.layers.1",
        "method.rmu_trainable=model.layers.1.*",  # the other parameters frozen: FSDP2 and ZeRO-3 accept them
    ],
}


def objective_cases(split: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """One case per new objective: GDiff, SGD, no AutoLR. DPO reads its preferred answers from the forget
    records' `alternate` field: running its case needs `split` (its data.forget), as the k = 3 cases do."""
    gdiff_sgd = ["method.combiner=gdiff", "optim.name=sgd", f"optim.lr={LR['sgd']}", "autolr.enabled=false"]
    objectives = {**NEW_OBJECTIVES, "dpo": [*NEW_OBJECTIVES["dpo"], *forget_with_alternates(split)]}
    return {f"obj_{name}_gdiff_sgd": [*gdiff_sgd, *overrides] for name, overrides in objectives.items()}


def forget_with_alternates(split: dict[str, Path] | None) -> list[str]:
    """data.forget of the DPO case: the forget rows, each with another author's answer as `alternate`."""
    return [f"data.forget={split['forget_alternates']}"] if split else []


def backend_cases(backend: str, split: dict[str, Path]) -> list[dict]:
    cases = [
        {"name": f"{backend}_{name}", "overrides": [f"parallel.backend={backend}", *o]}
        for name, o in matrix_cases(split).items()
    ]
    base = matrix_cases()["ngdiff_adamw_autolr"]
    # killed after step 3 (checkpoint at step 2), resumed with train.resume=auto
    cases.append(
        {
            "name": f"{backend}_resume",
            "overrides": [f"parallel.backend={backend}", *base, "train.save_every=2"],
            "crash_after": 3,
        }
    )
    cases.append(
        {
            "name": f"{backend}_count",
            "overrides": [f"parallel.backend={backend}", *matrix_cases()["ngdiff_sgd"]],
            "count_collectives": True,
        }
    )
    # a stateful, randomised TorchJD weighting (GradVac: RNG seeded per step, EMA in the checkpoint): killed
    # after step 3, resumed; and its step's collectives counted (the weighting adds none)
    gradvac = [f"parallel.backend={backend}", *matrix_cases()["gradvac_sgd"]]
    cases.append({"name": f"{backend}_gradvac_resume", "overrides": [*gradvac, "train.save_every=2"], "crash_after": 3})
    cases.append({"name": f"{backend}_gradvac_count", "overrides": gradvac, "count_collectives": True})
    cases.append(
        {
            "name": f"{backend}_k3_count",
            "overrides": [f"parallel.backend={backend}", *matrix_cases(split)["k3_ngdiff_sgd"]],
            "count_collectives": True,
        }
    )
    return cases


def load_result(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    error = out / f"{name}.error"
    if error.is_file():
        pytest.fail(f"case {name} failed:\n{error.read_text()}")
    if not (out / f"{name}.pt").is_file():
        pytest.fail(f"case {name} wrote no result")
    return torch.load(out / f"{name}.pt", weights_only=True), json.loads((out / f"{name}.json").read_text())


def load_one_and_two_ranks(out: Path, one: str, two: str) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """The results of a case run by 1 process (`one`) and by 2 ranks (`two`), checked to be what their
    names say and to have run every step: (one's state, one's log, two's state, two's log)."""
    one_state, one_log = load_result(out, one)
    two_state, two_log = load_result(out, two)
    assert one_log["world_size"] == 1 and two_log["world_size"] == 2
    assert len(two_log["steps"]) == STEPS
    return one_state, one_log, two_state, two_log


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    params = [k for k in a if "rotary" not in k]
    assert set(params) == {k for k in b if "rotary" not in k}, "parameter names differ"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in params)


def precision_cases(world_size: int) -> list[dict]:
    """bf16 training (and with CPU offload) under fsdp and zero3, for 1 rank and for 2; the retain-gradient
    stash options and a bf16 export on 2 ranks. FSDP cases must load shard by shard (never whole)."""
    base = matrix_cases()["ngdiff_sgd"]
    bf16 = ["train.precision=bf16"]
    variants = {"bf16": bf16, "bf16_offload": [*bf16, "parallel.cpu_offload=true"]}
    if world_size > 1:
        variants.update(
            stash_bf16=["parallel.stash_dtype=bf16"],
            stash_offload=["parallel.stash_offload=true"],
            export_bf16=["export.dtype=bf16"],
        )
    cases = []
    if world_size == 1:  # first: after a zero3 case, transformers would build every model under zero.Init
        for name, overrides in {"fp32": [], "stash_bf16": ["parallel.stash_dtype=bf16"]}.items():
            cases.append({"name": f"r1_single_{name}", "overrides": ["parallel.backend=single", *base, *overrides]})
    for backend in ("fsdp", "zero3"):  # fsdp before zero3 likewise
        for variant, overrides in variants.items():
            cases.append(
                {
                    "name": f"r{world_size}_{backend}_{variant}",
                    "overrides": [f"parallel.backend={backend}", *base, *overrides],
                    "forbid_whole_model": backend == "fsdp",
                }
            )
    return cases


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]


def lora_matrix() -> dict[str, list[str]]:
    """LoRA cases: every combiner (SGD), AdamW + AutoLR, and NPO / KL whose reference is the base with
    adapters disabled, with NGDiff + AutoLR. The SGD lr is larger: adapters start at B = 0 and move slowly."""
    base = matrix_cases()
    cases = {f"lora_{c}_sgd": [*base[f"{c}_sgd"], *LORA, "optim.lr=0.5"] for c in COMBINERS}
    # eps 1e-3: Adam divides tiny adapter gradients (lora_A's first ones are ~B = 0) by their own size, turning
    # last-bit differences into lr-sized moves; a larger eps keeps the step linear in such gradients
    cases["lora_ngdiff_adamw_autolr"] = [*base["ngdiff_adamw_autolr"], *LORA, "optim.lr=0.01", "optim.eps=1e-3"]
    autolr_sgd = [*base["ngdiff_sgd"], *LORA, "optim.lr=0.5", "autolr.enabled=true"]
    cases["lora_npo_ngdiff_sgd_autolr"] = [*autolr_sgd, "method.forget_objective=npo"]
    cases["lora_kl_ngdiff_sgd_autolr"] = [*autolr_sgd, "method.retain_objective=kl"]
    return cases


def lora_backend_cases(backend: str) -> list[dict]:
    """Every `lora_matrix` case, FSDP's loaded shard by shard (the base on `meta`, `from_pretrained` forbidden);
    an adapter export (`export.lora=adapter`) recording what it gathers; and a crash-and-resume case."""
    cases = [
        {"name": f"{backend}_{name}", "overrides": [f"parallel.backend={backend}", *o]}
        for name, o in lora_matrix().items()
    ]
    adapter = [f"parallel.backend={backend}", *lora_matrix()["lora_ngdiff_sgd"], "export.lora=adapter"]
    cases.append({"name": f"{backend}_lora_adapter_export", "overrides": adapter, "record_export": True})
    if backend != "single":  # killed after step 3 (checkpoint at step 2), resumed with train.resume=auto
        resumable = [f"parallel.backend={backend}", *lora_matrix()["lora_ngdiff_adamw_autolr"], "train.save_every=2"]
        cases.append({"name": f"{backend}_lora_resume", "overrides": resumable, "crash_after": 3})
    for case in cases:
        case["forbid_whole_model"] = backend == "fsdp"
    return cases
