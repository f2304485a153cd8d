#!/usr/bin/env bash
# Device check: jaxpref's fused LM-head loss (pallas vs xla_chunked vs reference) and one KD and one DPO
# train step of the Llama-3.2-1B shape on one NVIDIA H100/H200, as one markdown table. What it measures
# and how: scripts/device_check.py. Its own time budget is 420 s (parts that run over it are reported as
# failed rows; not yet timed on a GPU).
#
# The device machine's python3 (3.12, jax 0.11.2 with CUDA 13, flax, optax, orbax, transformers, torch)
# lacks what jaxpref's config layer imports on this path: pydantic, pydantic-core, annotated-types,
# typing-inspection, and a typing-extensions as new as pydantic needs (>= 4.16). grain, datasets and
# tensorboardX are NOT imported by this check (its notes list which carried candidates a run imported).
# Download the wheels once, here, in the repository root, into the ignored folder .whl/ (about 2.8 MB):
#
#   grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0
#
# Then run it through the device tool (`run`), naming .whl in carry:
#
#   command:   set -o pipefail; PYTHONUNBUFFERED=1 bash scripts/device_check.sh 2>&1 | tee $OUT/device_check.log
#   carry:     [".whl"]
#   timeout_s: 540
#
# The table comes back as $OUT/device_check.md (raw numbers: $OUT/device_check.json). On the device this
# script installs every wheel in .whl/ with --no-deps into /tmp/device_check_site (never into the
# machine's site-packages), skips any jax/jaxlib/jax-cuda wheel, and stops if jax's version changed.
#
#   bash scripts/device_check.sh --smoke     # here, on CPU, toy sizes, no installs, the current python
#
# Environment: PYTHON (default python3) is the interpreter. Other arguments go to device_check.py.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SITE=/tmp/device_check_site

jax_version() {
    "$PY" -c 'import jax; print(jax.__version__)'
}

# Install .whl/*.whl (no dependencies, no index) into $SITE and put it first on PYTHONPATH.
install_wheels() {
    shopt -s nullglob
    local wheels=() w
    for w in "$REPO"/.whl/*.whl; do
        case "$(basename "$w")" in
            jax-* | jaxlib-* | jax_cuda* | jax_plugins*) echo "device_check.sh: skipping $w (the machine's jax stays)" >&2 ;;
            *) wheels+=("$w") ;;
        esac
    done
    if ((${#wheels[@]} == 0)); then
        echo "device_check.sh: no wheels in $REPO/.whl (see this script's header); using $PY as it is" >&2
        return
    fi
    local before after
    before="$(jax_version)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --root-user-action=ignore \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    after="$(jax_version)"
    if [[ "$before" != "$after" ]]; then
        echo "device_check.sh: jax changed from $before to $after after installing .whl; remove jax wheels" >&2
        exit 1
    fi
    echo "device_check.sh: installed ${#wheels[@]} wheel(s) into $SITE; jax $after" >&2
}

smoke=0
for arg in "$@"; do
    [[ "$arg" == "--smoke" ]] && smoke=1
done
if ((!smoke)); then
    install_wheels
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
exec "$PY" scripts/device_check.py "$@"
