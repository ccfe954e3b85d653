"""Export time for the embedded SmolLM2-135M per format and quantization, and llama.cpp's quantizer alone.

    python bench/export.py                                  # gguf at every type, mlx f16/q8_0/q4_0, hf f16
    python bench/export.py --gguf f16 q4_k_m --mlx --hf     # a subset

Setup (not timed): a scratch workspace with the embedded model pulled (`ft models pull`). Timed: each
`ft export --model smollm2-135m-instruct --format F --quant Q` (the service call the CLI makes: load with
float32 weights, write, read back and verify, for GGUF also run the file in llama.cpp), with its own
per-step timings (load and fuse, write, verify, quantize, llama.cpp check); and llama.cpp's quantizer
alone (``llama_model_quantize`` on the f16 file, what `llama-quantize` runs), the anchor for the
"quantize" step. llama.cpp's own `convert_hf_to_gguf.py` + `llama-quantize` are not installed by pip
(llama-cpp-python ships the library only), so the quantizer call stands for them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
GGUF = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", nargs="*", default=None, help=f"GGUF types (default: {' '.join(GGUF)})")
    ap.add_argument("--mlx", action="store_true", help="mlx folders at f16, q8_0, q4_0")
    ap.add_argument("--hf", action="store_true", help="a Hugging Face folder at f16")
    args = ap.parse_args()
    every = args.gguf is None and not args.mlx and not args.hf
    gguf = GGUF if args.gguf is None else tuple(args.gguf)

    from ft.models.export import llamacpp
    from ft.services import models
    from ft.services.export import export
    from ft.services.project import init_workspace
    from ft.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        init_workspace(root)
        ws = Workspace(root)
        models.pull(ws, MODEL)
        jobs = [("gguf", q) for q in gguf]
        if args.mlx or every:
            jobs += [("mlx", q) for q in ("f16", "q8_0", "q4_0")]
        if args.hf or every:
            jobs.append(("hf", "f16"))
        rows = []
        f16_file = None
        for fmt, q in jobs:
            t0 = time.perf_counter()
            r = export(ws, model=MODEL, fmt=fmt, quant=q)
            total = time.perf_counter() - t0
            rows.append((fmt, q, total, r.bytes, r.timings))
            if fmt == "gguf" and q == "f16":
                f16_file = Path(r.main_file)
            steps = ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items())
            print(f"{fmt:5} {q:7} {total:7.1f}s  {r.bytes / 1e6:7.1f} MB   {steps}", flush=True)
        if f16_file is not None:
            print("\nllama.cpp's quantizer alone, from the f16 file:")
            for q in [q for q in gguf if q in llamacpp.LLAMA_FTYPES]:
                out = f16_file.with_name(f"alone-{q}.gguf")
                secs = llamacpp.quantize(f16_file, out, q)
                print(f"  {q:7} {secs:6.2f}s  {out.stat().st_size / 1e6:7.1f} MB", flush=True)
                out.unlink()


if __name__ == "__main__":
    main()
