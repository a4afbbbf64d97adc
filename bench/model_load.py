"""Model load time: transformers' GGUF dequantisation on every load vs primekd's cached copy.

primekd dequantises a GGUF file once and caches it as safetensors; this prints both load
times, measured side by side in one run, their ratio, and whether the logits agree.

    python bench/model_load.py [--model-file PATH.gguf] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-file", default=None, help="a .gguf file (default: bundled)")
    parser.add_argument("--repeats", type=int, default=2, help="loads timed per method")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from primekd.core.models import bundled_gguf_path, load_model, resolve

    hf_logging.disable_progress_bar()
    gguf = bundled_gguf_path() if args.model_file is None else Path(args.model_file)
    source = resolve(str(gguf))  # converts once if not cached yet (not timed)

    def time_loads(load) -> tuple[float, object]:
        times, model = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            model = load()
            times.append(time.perf_counter() - started)
        return min(times), model

    gguf_s, direct = time_loads(lambda: AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name))
    cached_s, cached = time_loads(lambda: load_model(source, device="cpu"))
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.inference_mode():
        same = bool(torch.allclose(direct(ids).logits, cached(ids).logits, atol=1e-5))
    result = {"gguf_load_s": round(gguf_s, 3), "cached_load_s": round(cached_s, 3),
              "speedup": round(gguf_s / cached_s, 1), "logits_equal": same}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"GGUF load (dequantise every time): {gguf_s:.2f} s (best of {args.repeats})")
        print(f"primekd cached safetensors:        {cached_s:.2f} s (best of {args.repeats})")
        print(f"speedup: {result['speedup']}x   logits equal: {same}")


if __name__ == "__main__":
    main()
