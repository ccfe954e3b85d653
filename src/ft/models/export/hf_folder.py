"""Hugging Face folder export: write it, load it with transformers and mlx-lm, compare tokens and logits."""

from __future__ import annotations

from ft.models.export.checks import RUNTIME_TOLERANCE, Check, Job, fail


def export_hf(job: Job) -> None:
    from mlx_lm.utils import load as mlx_load
    from safetensors import safe_open

    from ft.models.export import verify
    from ft.models.export.folders import HF_WEIGHTS, write_hf_folder

    tmp, tensors, config, tok = job.tmp, job.tensors, job.config, job.tokenizer
    write_hf_folder(tmp, tensors, config, job.base_dir, job.quant)
    job.say("verifying the Hugging Face folder")
    with safe_open(str(tmp / HF_WEIGHTS), framework="numpy") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    want = {k for k in tensors if not k.endswith("rotary_emb.inv_freq")}
    if config.get("tie_word_embeddings"):
        want.discard("lm_head.weight")
    if keys != want or meta.get("format") != "pt":
        raise fail(
            "safetensors keys", f"missing {sorted(want - keys)[:5]}, unexpected {sorted(keys - want)[:5]}"
        )
    try:
        from transformers import AutoConfig, AutoTokenizer

        hf_cfg = AutoConfig.from_pretrained(str(tmp))
        hf_tok = AutoTokenizer.from_pretrained(str(tmp))
    except Exception as e:  # transformers' own message is the useful part
        raise fail("transformers cannot load the folder", f"{type(e).__name__}: {e}") from e
    if hf_cfg.num_hidden_layers != config["num_hidden_layers"]:
        raise fail("config.json", "num_hidden_layers differs")
    for seq in job.ids[: len(verify.VERIFY_PROMPTS)]:
        text = tok.decode(seq)
        if list(hf_tok.encode(text, add_special_tokens=False)) != list(
            tok.encode(text, add_special_tokens=False)
        ):
            raise fail("tokenizer", f"transformers' tokenizer splits {text[:40]!r} differently")
    job.checks.append(
        Check(
            name="transformers",
            ok=True,
            detail=f"AutoConfig ({hf_cfg.model_type}) and AutoTokenizer load; token ids match",
        )
    )
    back, _ = mlx_load(str(tmp))
    job.check_logits("Hugging Face folder", verify.logits(back, job.ids), limits=RUNTIME_TOLERANCE)
