#!/usr/bin/env bash
# Generation throughput of a trained Mamba at 1, 8 and 32 concurrent generations, in one run
# on this machine (issue 17): Tideway's server (`tideway bench generate`: N concurrent
# Generate calls, greedy, PROMPT prompt ids, NEW new tokens each), llama.cpp on the same
# weights converted to GGUF f32 (llama-batched-bench: N parallel sequences), and HF
# transformers' batched `generate` (bench/hf_generate_bench.py).
#
#   bench/generate.sh [MODEL_DIR] [NEW] [PROMPT]
#
# llama.cpp is built from the llama-cpp-python source package (its vendor/llama.cpp) under
# target/llama/ (downloaded from PyPI if missing); its converter is run with the pre-tokenizer
# check told "gpt-2" (the model's tokenizer.json is a byte-level BPE trained here, whose hash
# llama.cpp does not know: the benchmark feeds ids, so the vocabulary only has to load) and the
# tokenizer read as tokenizer.json says.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/shakespeare-mamba} new=${2:-128} prompt=${3:-16}
threads=$(nproc)
venv=.venv
src=target/llama/llama_cpp_python-0.3.36
if [ ! -d "$src" ]; then
    mkdir -p target/llama
    url=$(curl -s https://pypi.org/pypi/llama-cpp-python/0.3.36/json | python3 -c \
        'import json,sys; print([u["url"] for u in json.load(sys.stdin)["urls"] if u["packagetype"]=="sdist"][0])')
    case "$url" in ../*) url="https://pypi.org/${url#../../}" ;; esac
    curl -sL -o target/llama/llama.tar.gz "$url"
    tar xzf target/llama/llama.tar.gz -C target/llama
fi
llama=$src/vendor/llama.cpp
if [ ! -x "$llama/build/bin/llama-batched-bench" ]; then
    "$venv/bin/pip" install -q cmake
    "$venv/bin/cmake" -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    "$venv/bin/cmake" --build "$llama/build" -j"$threads" --target llama-batched-bench >/dev/null
fi
gguf=target/llama/$(basename "$model")-f32.gguf
if [ ! -f "$gguf" ]; then
    PYTHONPATH="$llama/gguf-py" "$venv/bin/python" - "$llama" "$model" "$gguf" <<'PY'
import sys
from pathlib import Path
llama, model, out = sys.argv[1:]
sys.path.insert(0, llama)
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out]
import conversion.base
import transformers
# The tokenizer as tokenizer.json says (AutoTokenizer would pick GPT-NeoX's class for a
# Mamba, which adds a padding token past the vocabulary).
transformers.AutoTokenizer.from_pretrained = staticmethod(
    lambda d, **kw: transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(d) / "tokenizer.json")))
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf as convert
convert.main()
PY
fi

cargo build --release -p tideway-workers -j"$threads" 2>/dev/null
scratch=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$scratch"' EXIT
target/release/tideway serve --model "m=$model" --listen 127.0.0.1:0 >"$scratch/log" 2>&1 &
server=$!
for _ in $(seq 600); do
    grep -q "tideway listening on" "$scratch/log" && break
    kill -0 "$server" 2>/dev/null || { cat "$scratch/log" >&2; exit 1; }
    sleep 0.1
done
addr=$(grep "tideway listening on" "$scratch/log" | sed 's/tideway listening on //')
echo "== Tideway (tideway serve, $threads threads): Generate, $prompt prompt + $new new tokens each"
target/release/tideway bench generate --addr "$addr" --model m --concurrency 1,8,32 \
    --max-tokens "$new" --prompt-tokens "$prompt"
kill "$server"; wait "$server" 2>/dev/null || true; server=

echo "== llama.cpp $(git -C "$llama" rev-parse --short HEAD 2>/dev/null || echo "(llama-cpp-python 0.3.36)") f32, llama-batched-bench"
"$llama/build/bin/llama-batched-bench" -m "$gguf" -c $(( 32 * (prompt + new) + 64 )) -b 2048 -ub 512 \
    -npp "$prompt" -ntg "$new" -npl 1,8,32 -t "$threads" 2>/dev/null | grep -E '^\|'

echo "== HF transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)') generate"
"$venv/bin/python" bench/hf_generate_bench.py "$model" --batches 1,8,32 --new "$new" --prompt "$prompt" \
    --threads "$threads" | grep -v '^\['
