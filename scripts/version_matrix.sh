#!/usr/bin/env bash
# The version matrix: both ends of the supported range of torch, DeepSpeed, transformers, accelerate and peft.
#
# For each set (floor: the oldest supported releases; newest: the newest releases) this builds a fresh venv
# from constraints/<set>.txt, installs the project into it (not editable), imports every backend module
# from outside the checkout, prints which compat patches are active, and runs a subset of the tests on the
# real launchers (torchrun, deepspeed; CPU, gloo, 127.0.0.1): 1-vs-2-rank equivalence of NGDiff (SGD, and
# AdamW + AutoLR) and a crash-and-resume on ddp, fsdp and zero3; the compat layer's tests (every patch
# active on the installed versions) and the FSDP2-collective import checks; LoRA (peft) on one process.
#
#   scripts/version_matrix.sh [floor] [newest]       # both when none is named; about 10 minutes a set
#
# Not part of .ci/run (it downloads two CUDA builds of torch, several GB). Venvs go to
# $NGDIFF_MATRIX_VENVS (default /tmp/ngdiff-matrix), one line per set is appended to
# $NGDIFF_MATRIX_VENVS/results.txt. The constraints were made on x86_64 Linux with Python 3.11
# ($PYTHON, default python3.11). To move an end: edit the set's pins, rerun, then refresh the file with
# `<venv>/bin/pip freeze --all --exclude ngdiff --exclude pip > constraints/<set>.txt` (keep its header).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${NGDIFF_MATRIX_VENVS:-/tmp/ngdiff-matrix}
PYTHON=${PYTHON:-python3.11}
SETS=("$@")
[ ${#SETS[@]} -gt 0 ] || SETS=(floor newest)

MODULES="parallel.single parallel.ddp parallel.fsdp parallel.zero3 parallel.gloo_comm launcher launcher.cli ngdiff ngdiff.trainer"
CASES=ngdiff_sgd,ngdiff_adamw_autolr,resume # tests/distributed/conftest.py launches only these
EQ=tests/distributed/test_equivalence.py
TESTS=(
    tests/test_backend_imports.py
    tests/test_compat.py
    "tests/test_lora.py::test_only_adapters_train"
    "tests/test_lora.py::test_merged_export_equals_base_plus_adapter"
    "tests/test_lora.py::test_fsdp_builds_the_lora_model_on_meta_equal_to_the_whole_build"
)
for backend in ddp fsdp zero3; do
    TESTS+=("$EQ::test_two_ranks_equal_one_process[$backend-ngdiff_sgd]")
    TESTS+=("$EQ::test_two_ranks_equal_one_process[$backend-ngdiff_adamw_autolr]")
    TESTS+=("$EQ::test_resume_after_crash_equals_uninterrupted[$backend]")
done

export PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

build() { # venv constraints: a fresh venv holding exactly the pinned set and the project
    local venv=$1
    # the set's pins replace any machine-wide pip constraint (such as a cap on torch) for these installs
    export PIP_CONSTRAINT=$2
    "$PYTHON" -m venv --clear "$venv" || return 1
    "$venv/bin/python" -m pip install -q --upgrade pip || return 1
    # DeepSpeed's setup.py imports torch: torch and the build tools first, then DeepSpeed without isolation
    "$venv/bin/pip" install -q torch setuptools wheel ninja packaging || return 1
    # from a copy of the working tree's files (tracked and not ignored): building in the checkout would leave
    # setuptools' build/ there, whose stale modules a later wheel would carry
    mkdir -p "$venv/src"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$venv/src" -xf - || return 1
    "$venv/bin/pip" install -q --no-build-isolation "$venv/src[dev]" || return 1
}

check_imports() { # venv: every backend module, imported from outside the checkout (the installed package)
    (cd "$1" && bin/python - $MODULES <<'EOF'
import importlib, importlib.metadata as md, logging, sys
logging.disable(logging.WARNING)  # DeepSpeed's accelerator notice
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    assert "site-packages" in module.__file__, f"{name} came from {module.__file__}, not the installed package"
print("imported:", " ".join(sys.argv[1:]))
print("versions:", ", ".join(f"{d} {md.version(d)}" for d in ("torch", "deepspeed", "transformers", "accelerate", "peft")))
from parallel import compat
for row in compat.status():
    print(f"compat {row['name']}: {'active' if row['active'] else 'INACTIVE (' + row['reason'][:80] + ')'}")
EOF
    )
}

run_tests() { # venv: the test subset, on the venv's python, torchrun and deepspeed
    (cd "$ROOT" && PATH="$1/bin:$PATH" NGDIFF_DIST_CASES=$CASES \
        "$1/bin/python" -m pytest -q -rfs -p no:cacheprovider --basetemp="$1/pytest" "${TESTS[@]}")
}

mkdir -p "$VENVS"
machine="$(uname -m), $(nproc --all) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
status=0
for set in "${SETS[@]}"; do
    constraints=$ROOT/constraints/$set.txt
    [ -f "$constraints" ] || { echo "no $constraints"; status=1; continue; }
    venv=$VENVS/$set
    echo "== $set: $constraints -> $venv"
    start=$SECONDS
    if ! build "$venv" "$constraints"; then
        echo "== $set: FAILED to install"; status=1; continue
    fi
    built=$((SECONDS - start))
    imports=$(check_imports "$venv") && echo "$imports" || { echo "$imports"; echo "== $set: FAILED to import"; status=1; continue; }
    start=$SECONDS
    log="$venv/tests.log"
    run_tests "$venv" 2>&1 | tee "$log"
    tests_rc=${PIPESTATUS[0]}
    summary=$(tail -n 1 "$log")
    versions=$(echo "$imports" | sed -n 's/^versions: //p')
    line="$(date -u +%F) $set [$versions] python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'): $summary (install ${built} s, tests $((SECONDS - start)) s; $machine)"
    echo "$line" >> "$VENVS/results.txt"
    echo "== $line"
    [ "$tests_rc" -eq 0 ] || status=1
done
exit $status
