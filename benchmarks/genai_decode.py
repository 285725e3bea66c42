"""Greedy-decode timing of an onnxruntime-genai model folder (its builder's, or ours from ``export --format genai``) for
``benchmarks/decode.py``.

Runs in the Python that has ``onnxruntime-genai`` installed (a separate venv: its model builder needs
transformers 5.x); imports only ``onnxruntime_genai`` and ``numpy``. Measures what
``dsk_compress.runtimes.decode.measure_decode`` measures for our graphs: per repeat, the prompt's prefill
(``append_tokens``, plus choosing the first token), then ``--new-tokens`` calls that each run one decode
step and choose its token (``generate_next_token``); tokens/s = new tokens / the time of those calls.

    /work/genai-venv/bin/python benchmarks/genai_decode.py --model-dir OUT --prompt P.npy --new-tokens 32 \\
        --repeats 5 --warmup 1 [--threads 1] --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def measure(
    model_dir: str, prompt: np.ndarray, new_tokens: int, repeats: int, warmup: int, profile: str | None = None, threads: int | None = None
) -> dict:
    """Prefill ms (median), decode tokens/s (median over repeats) and the generated tokens of a greedy decode.

    ``profile``: a file prefix for ONNX Runtime's profiler (the trace is written when the model is released).
    ``threads``: intra-op threads of the decoder session (overlaid on genai_config.json; inter-op 1).
    """
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    opts = {}
    if profile:
        opts["enable_profiling"] = profile
    if threads:
        opts.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    if opts:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    model = og.Model(config)
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    length = int(prompt.size + new_tokens + 1)
    perf = time.perf_counter
    prefill_ms, tok_s, step_ms, tokens = [], [], [], None
    for r in range(warmup + repeats):
        params = og.GeneratorParams(model)
        # greedy; min_length keeps the end-of-sequence id from stopping the run early
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        gen = og.Generator(model, params)
        t0 = perf()
        gen.append_tokens(prompt)
        gen.generate_next_token()  # chooses the first token from the prefill's logits (no model run)
        t1 = perf()
        times = []
        for _ in range(new_tokens):
            t = perf()
            gen.generate_next_token()  # runs the model on the last token, chooses the next
            times.append((perf() - t) * 1000)
        if r >= warmup:
            prefill_ms.append((t1 - t0) * 1000)
            step_ms += times
            tok_s.append(new_tokens / (sum(times) / 1000))
            tokens = [int(t) for t in gen.get_sequence(0)[prompt.size :]]
        del gen
    p50, p90 = (float(x) for x in np.percentile(step_ms, [50, 90]))
    return {
        "prompt_tokens": int(prompt.size),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
        "graph": "onnxruntime-genai",
        "prefill_ms": round(float(np.median(prefill_ms)), 3),
        "decode_ms_p50": round(p50, 3),
        "decode_ms_p90": round(p90, 3),
        "decode_tokens_per_s": round(float(np.median(tok_s)), 2),
        "decode_tokens_per_s_runs": [round(x, 2) for x in tok_s],
        "runtime": f"onnxruntime-genai {og.__version__}, onnxruntime {_ort_version()}",
        "tokens": tokens,
    }


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:  # genai releases that bundle their own ONNX Runtime
        return "bundled"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompt", required=True, help=".npy of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default=None, help="file prefix for ONNX Runtime's profiler trace")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: genai_config.json's)")
    a = ap.parse_args()
    res = measure(a.model_dir, np.load(a.prompt, allow_pickle=False), a.new_tokens, a.repeats, a.warmup, a.profile, a.threads)
    with open(a.out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
