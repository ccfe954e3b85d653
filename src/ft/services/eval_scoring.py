"""`ft evaluate`'s measurements of one model: loss on every record, tool-call replies, sample generations."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ft.services.checkpoints import ResolvedCheckpoint
from ft.services.eval_report import (
    LABEL_NAMES,
    EvalProgress,
    LabelComparison,
    LossMetrics,
    ModelReport,
    Sample,
    TextMetrics,
    Throughput,
)


def reply_decoder(tok: Any, stops: Any) -> Callable[[list[int]], str]:
    """Token ids of a reply -> its text, cut at the first stop id or stop string."""
    from ft.data.metrics import cut_at_stop, cut_text

    ids = set(stops.ids)
    return lambda reply: cut_text(tok.decode(cut_at_stop(reply, ids)), stops.strings).strip()


def where(manifest: dict[str, Any], record_id: int) -> str:
    """The source file and line of a record (from the dataset manifest)."""
    from ft.data.store import split_record_id

    fidx, line = split_record_id(record_id)
    sources = manifest.get("sources") or []
    src = sources[fidx].get("display", "") if fidx < len(sources) and isinstance(sources[fidx], dict) else ""
    return f"{src}:{line}" if src else f"record {line}"


def load(ckpt: ResolvedCheckpoint) -> tuple[Any, Any, str]:
    """(model, tokenizer, precision in words) of the checkpoint's base, loaded as the run trained."""
    from ft.services.checkpoints import attach_adapters

    loaded = ckpt.load_base("evaluate")
    model = loaded.model
    if ckpt.method == "qlora":
        # QLoRA trains on quantized weights (a float base is quantized when the adapters go on): attach
        # the adapters now, at zero update, so base and tuned are scored on the same quantized weights.
        attach_adapters(model, ckpt)
    bits = sorted(
        {int(m.bits) for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")}
    )
    precision = loaded.dtype + (
        ", dequantized from the stored quantized weights" if loaded.dequantized else ""
    )
    if bits:
        precision = f"quantized ({'/'.join(map(str, bits))}-bit) linear layers, {precision} otherwise"
    return model, loaded.tokenizer, precision


def samples(
    cases: list[Any],
    tuned_gens: Any,
    base_gens: Any,
    decode_reply: Callable[[list[int]], str],
    manifest: dict[str, Any],
    data: Any,
    tok: Any,
) -> tuple[list[Sample], list[Any], list[Any]]:
    """The generated replies of both models next to the reference, scored (samples, tuned, base scores)."""
    from ft.data.metrics import score_text

    samples: list[Sample] = []
    tuned_texts, base_texts = [], []
    for k, c in enumerate(cases):
        ref = decode_reply(list(c.reference))
        tuned_reply = decode_reply(tuned_gens.tokens[k])
        ts = score_text(tuned_reply, ref)
        tuned_texts.append(ts)
        base_reply = bs = None
        if base_gens is not None:
            base_reply = decode_reply(base_gens.tokens[k])
            bs = score_text(base_reply, ref)
            base_texts.append(bs)
        samples.append(
            Sample(
                index=c.index,
                where=where(manifest, int(data.record_ids[c.index])),
                prompt=tok.decode(list(c.prompt)),
                reference=ref,
                tuned=tuned_reply,
                base=base_reply,
                tuned_scores=text_metrics(ts),
                base_scores=text_metrics(bs) if bs else None,
                tuned_finish=tuned_gens.finish[k],
                base_finish=base_gens.finish[k] if base_gens is not None else None,
            )
        )
    return samples, tuned_texts, base_texts


class Scorer:
    """Loss on every record, tool-call replies and sample generations of the model as it is now."""

    def __init__(
        self,
        model: Any,
        data: Any,
        batch_size: int,
        limit: int | None,
        seed: int,
        sampling: Any,
        tool_plan: Any,
        cases: list[Any],
        say: Callable[[EvalProgress], None],
        notes: list[str],
    ):
        self.model, self.data, self.batch_size, self.limit, self.seed = model, data, batch_size, limit, seed
        self.sampling, self.tool_plan, self.cases, self.say, self.notes = (
            sampling,
            tool_plan,
            cases,
            say,
            notes,
        )
        self.tool_replies: dict[str, list[str]] = {}

    def _progress(self, stage: str) -> Callable[[int, int], None]:
        return lambda d, n: self.say(EvalProgress(stage=stage, done=d, total=n))

    def run(self, who: str) -> tuple[Any, Any]:
        import mlx.core as mx

        from ft.engine import evaluate as engine
        from ft.engine.losses import check_model

        split_info = check_model(self.model)
        self.notes.extend(f"{who}: {n}" for n in split_info.disabled())  # slower scoring, same numbers
        scores = engine.score(
            self.model,
            self.data,
            batch_size=self.batch_size,
            # Every position of every record: the split was already cut to the dataset's max_seq_length.
            max_seq_length=max(1, int(self.data.lengths.max()) - 1),
            limit=self.limit,
            seed=self.seed,
            split=split_info,
            progress=self._progress(f"{who}: loss"),
        )
        if self.tool_plan is not None:
            self.tool_replies[who] = self.tool_plan.generate(
                self.model, self.sampling, progress=self._progress(f"{who}: tool calls")
            )
        gens = None
        if self.cases:
            prompts = [c.prompt for c in self.cases]
            gens = engine.generate(
                self.model, prompts, self.sampling, progress=self._progress(f"{who}: generation")
            )
        mx.clear_cache()
        return scores, gens


def loss_metrics(t: Any) -> LossMetrics:
    return LossMetrics(
        loss=t.loss, perplexity=t.perplexity, accuracy=t.accuracy, tokens=t.tokens, records=t.examples
    )


def text_metrics(s: Any) -> TextMetrics:
    return TextMetrics(**s.as_dict())


def model_report(scores: Any, gens: Any, texts: list[Any] | None, labels: Any) -> ModelReport:
    """One model's report from its scores (per label when the split kept labels) and generations."""
    from ft.data.metrics import mean_scores

    by_label = {}
    present = sorted({int(v) for v in labels.tolist()})
    if any(v >= 0 for v in present):
        for v in present:
            by_label[LABEL_NAMES.get(v, str(v))] = loss_metrics(scores.total(labels == v))
    tp = Throughput(
        records_per_second=len(scores.index) / scores.seconds if scores.seconds else 0.0,
        score_tokens_per_second=scores.positions / scores.seconds if scores.seconds else 0.0,
    )
    if gens is not None:
        tp.prompt_tokens, tp.prompt_tokens_per_second = gens.prompt_tokens, gens.prompt_tps
        tp.generation_tokens, tp.generation_tokens_per_second = gens.generation_tokens, gens.generation_tps
    mean = mean_scores(texts) if texts else None
    return ModelReport(
        metrics=loss_metrics(scores.total()),
        by_label=by_label,
        text=text_metrics(mean) if mean else None,
        throughput=tp,
    )


def compare(
    tuned: ModelReport, base: ModelReport | None
) -> tuple[dict[str, float], list[LabelComparison], float | None]:
    """(tuned - base per metric, per-label comparison, the label gap) of two model reports."""
    difference: dict[str, float] = {}
    labels: list[LabelComparison] = []
    if base is not None:
        for key in ("loss", "perplexity", "accuracy"):
            difference[key] = getattr(tuned.metrics, key) - getattr(base.metrics, key)
        if tuned.text and base.text:
            for key in TextMetrics.model_fields:
                difference[key] = getattr(tuned.text, key) - getattr(base.text, key)
        difference = {k: v for k, v in difference.items() if math.isfinite(v)}
    for name, m in tuned.by_label.items() if len(tuned.by_label) >= 2 else ():
        b = base.by_label.get(name) if base else None
        labels.append(
            LabelComparison(
                label=name,
                records=m.records,
                base_loss=b.loss if b else None,
                tuned_loss=m.loss,
                change=(m.loss - b.loss) if b else None,
            )
        )
    changes = {lc.label: lc.change for lc in labels}
    desirable, undesirable = changes.get("desirable"), changes.get("undesirable")
    gap = float(undesirable) - float(desirable) if desirable is not None and undesirable is not None else None
    return difference, labels, gap


def verdict(tuned: ModelReport, base: ModelReport | None, gap: float | None) -> tuple[str, bool | None]:
    """One sentence: better or not, on the loss that matters (the desirable replies when labels were kept)."""
    labelled = "desirable" in tuned.by_label and len(tuned.by_label) >= 2
    t = tuned.by_label["desirable"] if labelled else tuned.metrics
    what = "loss on desirable replies" if labelled else "loss"
    if base is None:
        return f"tuned {what} {t.loss:.4f} (no base comparison)", None
    b = base.by_label["desirable"] if labelled else base.metrics
    d = t.loss - b.loss
    rel = d / b.loss if b.loss else 0.0
    tail = (
        ""
        if gap is None
        else (
            f"; gap {gap:+.4f} ("
            + (
                "undesirable replies became relatively less likely)"
                if gap > 0
                else "undesirable replies did not become relatively less likely)"
            )
        )
    )
    if d < 0:
        return (
            f"the tuned model is better: {what} {b.loss:.4f} -> {t.loss:.4f} ({rel:+.1%}), "
            f"perplexity {b.perplexity:.2f} -> {t.perplexity:.2f}{tail}"
        ), True
    return (
        f"the tuned model is NOT better on this split: {what} {b.loss:.4f} -> {t.loss:.4f} ({rel:+.1%}){tail}; "
        "check the learning rate, the number of steps, or whether this split matches the training data"
    ), False
