"""Benchmark: `ft dataset prepare` on 100,000 generated chat records of about 300 tokens each.

Target (issue #4): under 60 s and under 2 GB peak memory on the 2-core CI machine.

    python bench/prepare_data.py [--records 100000] [--keep]

Prints records/s, tokens/s, peak resident memory (of this process: reading, validation,
tokenization and writing all run in it), and the ratio against the anchor measured in the same
run: the Hugging Face fast tokenizer's batch encode of the same rendered conversations, with no
validation, masking, splitting or writing - the floor that any preparation has to pay.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Words of varied length and frequency, so the text tokenizes like prose (~1.3 tokens per word).
_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two has "
    "look more day could go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want air well also "
    "play small end put home read hand port large spell add even land here must big high such follow act why ask "
    "men change went light kind off need house picture try us again animal point mother world near build self "
    "earth father configuration gradient optimizer tokenizer dataset validation checkpoint throughput inference "
    "quantization embedding transformer attention probability distribution hyperparameter regularization "
    "Kubernetes PostgreSQL JavaScript authentication serialization asynchronous dependency infrastructure"
).split()


def _sentence(r: random.Random) -> str:
    n = r.randint(6, 18)
    words = [r.choice(_WORDS) for _ in range(n)]
    if r.random() < 0.2:
        words.insert(r.randint(0, n), str(r.randint(2, 99999)))
    s = " ".join(words)
    return s[0].upper() + s[1:] + r.choice([".", ".", ".", "?", "!", ":"])


def _para(r: random.Random, tokens: int) -> str:
    out, approx = [], 0
    while approx < tokens:
        s = _sentence(r)
        out.append(s)
        approx += int(len(s.split()) * 1.3) + 1
    return " ".join(out)


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n chat records averaging ~300 tokens: a system prompt on some, one or two exchanges, labels 3:1."""
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = []
            if r.random() < 0.3:
                msgs.append({"role": "system", "content": _para(r, 20)})
            turns = 1 if r.random() < 0.75 else 2
            for _t in range(turns):
                msgs.append({"role": "user", "content": _para(r, 70 // turns)})
                msgs.append({"role": "assistant", "content": _para(r, 180 // turns)})
            f.write(json.dumps({"conversations": msgs, "label": r.random() < 0.75}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--keep", action="store_true", help="keep the scratch workspace")
    args = ap.parse_args()

    from ft.models import gguf_import
    from ft.models.embedded import embedded_gguf_path
    from ft.services import datasets as svc
    from ft.services.project import init_workspace
    from ft.workspace import Workspace

    scratch = Path(tempfile.mkdtemp(prefix="ft-bench-data-"))
    try:
        init_workspace(scratch / "ws")
        ws = Workspace(scratch / "ws")
        gguf_import.import_gguf(embedded_gguf_path(), ws.model_dir("smollm2-135m-instruct"))
        src_file = scratch / "chat.jsonl"
        t0 = time.perf_counter()
        generate(src_file, args.records)
        print(
            f"generated {args.records:,} records ({src_file.stat().st_size / 1e6:.0f} MB) in "
            f"{time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        gc.collect()
        rss_before = _peak_rss_mb()

        cpu0, t0 = _cpu_s(), time.perf_counter()
        result = svc.prepare_dataset(ws, str(src_file), name="bench", labels="all")
        dt, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        peak = _peak_rss_mb()
        stats = result.stats
        tokens = sum(s.tokens for s in stats.splits.values())

        # Anchor: the Hugging Face fast tokenizer's batch encode of the same rendered texts, nothing else.
        tok = svc.load_tokenizer(ws.model_dir("smollm2-135m-instruct"), "smollm2-135m-instruct")
        template = svc.make_template("model", tok.chat_template, tok.special)
        texts = []
        with open(src_file, encoding="utf-8") as f:
            for line in f:
                texts.append(template.render(json.loads(line)["conversations"]))
        cpu1, t1 = _cpu_s(), time.perf_counter()
        for i in range(0, len(texts), 1024):
            tok.backend.encode_batch(texts[i : i + 1024], add_special_tokens=False)
        anchor, anchor_cpu = time.perf_counter() - t1, _cpu_s() - cpu1

        print(
            f"prepared {stats.kept:,} of {stats.records_read:,} records, {tokens:,} tokens "
            f"({tokens / max(stats.kept, 1):.0f} per record)"
        )
        print(
            f"prepare: {dt:.1f} s wall, {cpu:.1f} s CPU; {stats.records_read / dt:,.0f} records/s, "
            f"{tokens / dt:,.0f} tokens/s"
        )
        print(f"peak memory: {peak:,.0f} MB (before preparing: {rss_before:,.0f} MB)")
        print(
            f"anchor, HF batch encode only: {anchor:.1f} s wall, {anchor_cpu:.1f} s CPU; "
            f"prepare / anchor = {dt / anchor:.2f}x wall"
        )
        ok = dt < 60 and peak < 2048
        print(
            f"target < 60 s and < 2048 MB: {'met' if ok else 'NOT met'} (load average now {os.getloadavg()[0]:.1f})"
        )
        return 0
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    sys.exit(main())
