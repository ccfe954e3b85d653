"""Golden tests of KTO, DPO and ORPO on a 2-layer random Llama in float32.

Every loss, reward, margin, accuracy and KL the engine computes (packed rows, logits on trained positions
only, slots, accumulation) is compared with a direct computation: each sequence run alone with full
logits, log-softmax in float64, and the published formulas written out here in numpy.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine_helpers import VOCAB, tiny_llama
from ft.engine.batching import ArrayExamples, BatchOptions
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.losses import check_model
from ft.engine.objectives import AUX, PreferenceOptions, kto_class_weights, metrics
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.preference import (
    PreferenceData,
    PreferenceSteps,
    Units,
    adapters_off,
    compute_reference,
    consecutive_pairs,
    plan_units,
    shared_context,
)
from ft.engine.trainer import TrainOptions, train

TOL = 1e-5


def _model(method: str = "lora", seed: int = 0):
    model = tiny_llama(seed=seed)
    if method != "full":
        apply_adapters(model, AdapterSpec(method=method, rank=4, alpha=8, target_modules="all-linear"))
        for _, m in model.named_modules():  # a policy that differs from the base
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(3)) * 0.2
    mx.eval(model.parameters())
    return model


def _pairs(n: int, seed: int = 1) -> PreferenceData:
    """n pairs: a shared random prompt, then two different random replies of different lengths."""
    rng = np.random.default_rng(seed)
    toks, masks, labels = [], [], []
    for _ in range(n):
        prompt = rng.integers(3, VOCAB, size=int(rng.integers(3, 9)))
        for lab in (1, 0):
            reply = rng.integers(3, VOCAB, size=int(rng.integers(2, 12)))
            toks.append(np.concatenate([prompt, reply]))
            masks.append(np.arange(len(prompt) + len(reply)) >= len(prompt))
            labels.append(lab)
    seqs = ArrayExamples(toks, masks)
    return PreferenceData(seqs, np.array(labels, np.int8), consecutive_pairs(len(toks)))


def _labelled(n: int, seed: int = 2, per_prompt: int = 1) -> PreferenceData:
    """n labelled replies; ``per_prompt`` > 1: that many replies to each prompt (labels alternating), as
    KTO data made from preference pairs or from several sampled replies looks."""
    rng = np.random.default_rng(seed)
    toks, masks = [], []
    prompt = rng.integers(3, VOCAB, size=3)
    for i in range(n):
        if i % per_prompt == 0:
            prompt = rng.integers(3, VOCAB, size=int(rng.integers(3, 9)))
        p, r = len(prompt), int(rng.integers(2, 12))
        toks.append(np.concatenate([prompt, rng.integers(3, VOCAB, size=r)]))
        masks.append(np.arange(p + r) >= p)
    labels = (rng.random(n) < 0.7).astype(np.int8)
    if per_prompt > 1:
        labels = (np.arange(n) % 2 == 0).astype(np.int8)
    labels[:2] = [1, 0]
    return PreferenceData(ArrayExamples(toks, masks), labels)


def _direct_logp(model, tokens: np.ndarray, mask: np.ndarray, mean: bool = False) -> float:
    """log p(trained tokens | the rest): the sequence alone, full logits, float64 log-softmax."""
    x = mx.array(np.asarray(tokens, np.int32)[None, :-1])
    logits = np.array(model(x).astype(mx.float32), dtype=np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = np.asarray(tokens)[1:]
    m = np.asarray(mask, bool)[1:]
    vals = logp[np.arange(len(y)), y][m]
    return float(vals.mean() if mean else vals.sum())


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _steps(model, popts, data, bs, acc, reference="adapters_off", ref_cache=None, packing=None):
    bopts = BatchOptions(
        batch_size=bs, grad_accumulation_steps=acc, max_seq_length=64, packing=packing, seed=5
    )
    return PreferenceSteps(
        model, check_model(model), popts, bopts, data, None, reference=reference, ref_cache=ref_cache
    )


def _expected_pairs(model, data, units, popts) -> dict[str, float]:
    """Loss and metrics of DPO/ORPO over ``units`` by the papers' formulas."""
    mean = popts.mean_logps
    s = data.seqs
    losses, rc, rr, nll, nll_tok = [], [], [], 0.0, 0
    for u in units:
        c, r = (int(x) for x in data.pairs[u])
        pc = _direct_logp(model, s.tokens(c), s.mask(c), mean)
        pr = _direct_logp(model, s.tokens(r), s.mask(r), mean)
        if popts.objective == "dpo":
            with adapters_off(model):
                qc = _direct_logp(model, s.tokens(c), s.mask(c), mean)
                qr = _direct_logp(model, s.tokens(r), s.mask(r), mean)
            h = (pc - pr) - (qc - qr)
            b = popts.beta
            if popts.loss_type == "ipo":
                losses.append((h - 1 / (2 * b)) ** 2)
            else:
                e = popts.label_smoothing
                losses.append(-(1 - e) * _logsig(b * h) - e * _logsig(-b * h))
            rc.append(b * (pc - qc))
            rr.append(b * (pr - qr))
        else:
            lam = popts.orpo_lambda
            odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
            losses.append(-lam * _logsig(odds))
            rc.append(lam * pc)
            rr.append(lam * pr)
            n_c = int(np.asarray(s.mask(c))[1:].sum())
            nll += -_direct_logp(model, s.tokens(c), s.mask(c))
            nll_tok += n_c
    out = {
        "loss": float(np.mean(losses)) + (nll / nll_tok if popts.objective == "orpo" else 0.0),
        "rewards_chosen": float(np.mean(rc)),
        "rewards_rejected": float(np.mean(rr)),
        "margin": float(np.mean(np.array(rc) - np.array(rr))),
        "reward_accuracy": float(np.mean(np.array(rc) > np.array(rr))),
    }
    return out


def _step_values(steps: PreferenceSteps, sp) -> tuple[float, dict[str, float], object]:
    seeds = list(range(len(sp.micro_batches)))
    obj, grads, aux, _ = steps.step(sp, seeds)
    mx.eval(obj, grads, aux)
    m = metrics(dict(zip(AUX, np.array(aux, dtype=np.float64), strict=True)), steps.popts.objective)
    return float(obj.item()), m, grads


@pytest.mark.parametrize(
    "popts",
    [
        PreferenceOptions("dpo", beta=0.5),
        PreferenceOptions("dpo", beta=0.3, label_smoothing=0.2),
        PreferenceOptions("dpo", beta=0.2, loss_type="ipo"),
        PreferenceOptions("orpo", orpo_lambda=0.4),
    ],
    ids=["dpo-sigmoid", "dpo-smoothed", "ipo", "orpo"],
)
def test_paired_losses_equal_the_published_formulas_with_accumulation(popts) -> None:
    model = _model()
    data = _pairs(6)
    steps = _steps(model, popts, data, bs=2, acc=2)  # 2 micro-batches of 2 pairs per step
    sp = steps.plans_for(0)[0]
    assert len(sp.micro_batches) == 2
    obj, got, grads = _step_values(steps, sp)
    want = _expected_pairs(model, data, sp.examples, popts)
    assert obj == pytest.approx(want["loss"], abs=TOL)
    for k in ("rewards_chosen", "rewards_rejected", "margin", "reward_accuracy"):
        assert got[k] == pytest.approx(want[k], abs=TOL), k
    # Accumulation: the same units as one micro-batch give the same gradient.
    one = _steps(model, popts, data, bs=4, acc=1)
    sp1 = next(p for p in one.plans_for(0) if set(p.examples) == set(sp.examples))
    obj1, _, grads1 = _step_values(one, sp1)
    assert obj1 == pytest.approx(obj, abs=TOL)
    for (k, g), (_, g1) in zip(tree_flatten(grads), tree_flatten(grads1), strict=True):
        np.testing.assert_allclose(np.array(g), np.array(g1), atol=TOL, err_msg=k)


@pytest.mark.parametrize("per_prompt", [1, 2], ids=["own-prompts", "shared-prompts"])
def test_kto_loss_rewards_and_kl_equal_the_paper_with_class_weights_and_accumulation(per_prompt: int) -> None:
    model = _model()
    data = _labelled(10, per_prompt=per_prompt)
    popts = PreferenceOptions("kto", beta=0.4, desirable_weight=0.6, undesirable_weight=1.7)
    steps = _steps(model, popts, data, bs=2, acc=2)
    assert steps.shared_reference  # the reference runs each prompt once for the reply and its KL sequence
    sp = next(p for p in steps.plans_for(0) if len({int(data.labels[u]) for u in p.examples}) == 2)
    obj, got, grads = _step_values(steps, sp)
    s, allseq = data.seqs, steps.units.all
    n = len(data)
    # z0: mismatched (prompt of i, reply of its partner) pairs over the whole step, clamped at 0.
    kls = []
    for u in sp.examples:
        t, m = allseq.tokens(n + u), allseq.mask(n + u)
        partner = int(steps.units.all.partner[u])
        p_len = int(np.flatnonzero(s.mask(u))[0])
        q_start = int(np.flatnonzero(s.mask(partner))[0])
        assert np.array_equal(t, np.concatenate([s.tokens(u)[:p_len], s.tokens(partner)[q_start:]]))
        pol = _direct_logp(model, t, m)
        with adapters_off(model):
            ref = _direct_logp(model, t, m)
        kls.append(pol - ref)
    z0 = max(0.0, float(np.mean(kls)))
    losses, rd, ru, correct = [], [], [], []
    for u in sp.examples:
        pol = _direct_logp(model, s.tokens(u), s.mask(u))
        with adapters_off(model):
            ref = _direct_logp(model, s.tokens(u), s.mask(u))
        r = pol - ref
        if data.labels[u] == 1:
            losses.append(0.6 * (1 - _sig(0.4 * (r - z0))))
            rd.append(0.4 * r)
            correct.append(r > 0)
        else:
            losses.append(1.7 * (1 - _sig(0.4 * (z0 - r))))
            ru.append(0.4 * r)
            correct.append(r < 0)
    assert obj == pytest.approx(float(np.mean(losses)), abs=TOL)
    assert got["kl"] == pytest.approx(z0, abs=TOL)
    assert got["rewards_chosen"] == pytest.approx(float(np.mean(rd)), abs=TOL)
    assert got["rewards_rejected"] == pytest.approx(float(np.mean(ru)), abs=TOL)
    assert got["margin"] == pytest.approx(float(np.mean(rd) - np.mean(ru)), abs=TOL)
    assert got["reward_accuracy"] == pytest.approx(float(np.mean(correct)), abs=TOL)
    one = _steps(model, popts, data, bs=4, acc=1)
    assert one.fused_kl  # one micro-batch, no dropout: z0's policy pass joins the gradient pass
    sp1 = next(p for p in one.plans_for(0) if set(p.examples) == set(sp.examples))
    rows = shared_context(one.units, sp1.micro_batches[0].units, 4, 0).prompt_rows
    assert rows == len({tuple(s.tokens(u)[: int(np.flatnonzero(s.mask(u))[0])]) for u in sp1.examples})
    assert rows == len(sp1.examples) // per_prompt  # shared prompts: one prompt row for both replies
    obj1, _, grads1 = _step_values(one, sp1)
    assert obj1 == pytest.approx(obj, abs=TOL)
    for (k, g), (_, g1) in zip(tree_flatten(grads), tree_flatten(grads1), strict=True):
        np.testing.assert_allclose(np.array(g), np.array(g1), atol=TOL, err_msg=k)


@pytest.mark.parametrize(
    ("method", "per_prompt", "bs", "acc"),
    # the last: 3 prompts in a micro-batch of 6 replies, their prompt rows padded to 4 (an empty row)
    [("lora", 1, 2, 2), ("dora", 1, 2, 2), ("lora", 3, 2, 2), ("lora", 2, 6, 1)],
)
def test_kto_reference_runs_once_per_sequence_and_equals_the_base(
    method: str, per_prompt: int, bs: int, acc: int
) -> None:
    """KTO with adapters off: one reference pass per micro-batch in the first epoch (each prompt once, for
    the reply and its mismatched sequence, and for every reply of the micro-batch that shares it), none
    after; the kept values are the base model's."""
    model = _model(method)
    data = _labelled(12 if bs == 6 else 9, per_prompt=per_prompt)
    steps = _steps(model, PreferenceOptions("kto", beta=0.1), data, bs=bs, acc=acc)
    calls = {"ref_shared": 0, "ref": 0}
    for name in calls:
        fn = steps._fns[name]

        def counted(*a, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*a)

        steps._fns[name] = counted
    plans = steps.plans_for(0)
    if bs == 6:
        big = max(plans, key=lambda sp: len(sp.examples)).micro_batches[0]
        sc = shared_context(steps.units, big.units, bs, 0)
        assert (sc.prompt_rows, sc.arrays[0].shape[0]) == (3, 4)
    for sp in plans:
        _step_values(steps, sp)
    assert calls == {"ref_shared": sum(len(sp.micro_batches) for sp in plans), "ref": 0}
    allseq = steps.units.all
    seen = [s for sp in plans for u in sp.examples for s in (u, steps.units.kl_of(u))]
    base = tiny_llama(seed=0)
    for i in seen:
        want = _direct_logp(base, allseq.tokens(i), allseq.mask(i))
        assert steps.units.ref_sums[i] == pytest.approx(want, abs=TOL), i
        assert steps.units.ref_counts[i] == int(np.asarray(allseq.mask(i))[1:].sum())
    for sp in steps.plans_for(1):  # a later epoch: no reference pass at all
        _step_values(steps, sp)
    assert calls == {"ref_shared": sum(len(sp.micro_batches) for sp in plans), "ref": 0}


def test_kto_planner_keeps_the_replies_of_a_prompt_in_one_micro_batch() -> None:
    popts = PreferenceOptions("kto", beta=0.1)
    bopts = BatchOptions(batch_size=4, grad_accumulation_steps=2, max_seq_length=64, seed=3, group_window=2)
    shared = Units(_labelled(40, seed=4, per_prompt=2), popts, 64, 3)
    assert len(set(shared.prompt_group.tolist())) == 20
    for epoch, shuffle in ((0, True), (1, True), (0, False)):
        plans = plan_units(shared, bopts, epoch, shuffle=shuffle)
        assert sorted(u for sp in plans for u in sp.examples) == list(range(40))
        for sp in plans:
            for micro in sp.micro_batches:  # both replies of each prompt here, so its prompt runs once
                groups = [int(shared.prompt_group[u]) for u in micro.units]
                assert all(groups.count(g) == 2 for g in groups), groups
    # Every prompt its own: exactly the plan without groups (same shuffle, same length sorting).
    own = Units(_labelled(40, seed=4), popts, 64, 3)
    assert len(set(own.prompt_group.tolist())) == 40
    plans = [plan_units(own, bopts, e, shuffle=sh) for e, sh in ((0, True), (1, True), (0, False))]
    own.prompt_group = None
    assert plans == [plan_units(own, bopts, e, shuffle=sh) for e, sh in ((0, True), (1, True), (0, False))]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_reference_with_adapters_off_equals_the_base_model(method: str) -> None:
    base = tiny_llama(seed=0)
    tuned = _model(method)
    for _, m in tuned.named_modules():  # DoRA: a trained magnitude too
        if hasattr(m, "m") and method == "dora":
            m.m = m.m * 1.3
    data = _pairs(3)
    s = data.seqs
    for i in range(len(s)):
        got_on = _direct_logp(tuned, s.tokens(i), s.mask(i))
        with adapters_off(tuned):
            got = _direct_logp(tuned, s.tokens(i), s.mask(i))
        want = _direct_logp(base, s.tokens(i), s.mask(i))
        assert got == pytest.approx(want, abs=TOL)
        assert abs(got_on - want) > 1e-3  # the adapters do change the model
        # And switched back on afterwards.
        assert _direct_logp(tuned, s.tokens(i), s.mask(i)) == got_on


def test_cached_reference_equals_adapters_off_for_full_fine_tuning() -> None:
    """Full fine-tuning: the cache (computed with the starting weights) gives the same step as the base."""
    data = _pairs(4)
    popts = PreferenceOptions("dpo", beta=0.5)
    full = _model("full")
    lora = _model("lora")
    for _, m in lora.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.zeros_like(m.lora_b)  # policy == base at the start
    s_full = _steps(full, popts, data, 2, 1, reference="cached", ref_cache=np.zeros(1))
    cache = compute_reference(full, check_model(full), s_full.units, s_full.bopts)
    for i in range(len(data)):
        assert cache[i] == pytest.approx(_direct_logp(full, data.seqs.tokens(i), data.seqs.mask(i)), abs=TOL)
    s_full = _steps(full, popts, data, 2, 1, reference="cached", ref_cache=cache)
    s_lora = _steps(lora, popts, data, 2, 1)
    sp = s_full.plans_for(0)[0]
    o1, m1, _ = _step_values(s_full, sp)
    o2, m2, _ = _step_values(s_lora, sp)
    assert o1 == pytest.approx(math.log(2), abs=TOL) and o2 == pytest.approx(math.log(2), abs=TOL)
    assert m1["margin"] == pytest.approx(0.0, abs=TOL)


def test_kto_class_weights_follow_the_papers_rule() -> None:
    wd, wu = kto_class_weights(300, 100)
    assert 1.0 <= wd * 300 / (wu * 100) <= 4 / 3 + 1e-12
    wd, wu = kto_class_weights(10, 100)
    assert 1.0 <= wd * 10 / (wu * 100) <= 4 / 3 + 1e-12
    assert kto_class_weights(110, 100) == (1.0, 1.0)


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_training_raises_reward_accuracy_and_logs_metrics(objective: str) -> None:
    """A short run on a learnable preference: chosen replies repeat the prompt, rejected ones do not."""
    rng = np.random.default_rng(0)
    toks, masks, labels = [], [], []
    for _ in range(24):
        prompt = rng.integers(3, VOCAB, size=6)
        good = np.concatenate([prompt, prompt])
        bad = np.concatenate([prompt, rng.integers(3, VOCAB, size=6)])
        for lab, t in ((1, good), (0, bad)):
            toks.append(t)
            masks.append(np.arange(12) >= 6)
            labels.append(lab)
    data = PreferenceData(ArrayExamples(toks, masks), np.array(labels, np.int8), consecutive_pairs(48))
    if objective == "kto":
        data = PreferenceData(data.seqs, data.labels)
    model = tiny_llama(seed=0)
    apply_adapters(model, AdapterSpec(rank=8, alpha=16, target_modules="all-linear"))
    opt = build_optimizer(OptimizerSpec(), 3e-3)
    evals, steps = [], []

    class Rec:
        def on_eval(self, e) -> None:
            evals.append(e)

        def on_step(self, e) -> None:
            steps.append(e)

    popts = PreferenceOptions(objective, beta=0.5, orpo_lambda=0.5)
    opts = TrainOptions(
        BatchOptions(batch_size=4, max_seq_length=32, seed=1), epochs=4, eval_steps=12, log_steps=4
    )
    res = train(model, opt, data, data, opts, objective=popts, callbacks=[Rec()])
    assert res.stopped == "completed"
    logged = [e for e in steps if e.logged]
    assert logged and {"rewards_chosen", "rewards_rejected", "margin", "reward_accuracy"} <= set(
        logged[-1].metrics
    )
    if objective == "kto":
        assert "kl" in logged[-1].metrics
    first, last = evals[0].metrics, evals[-1].metrics
    assert last["reward_accuracy"] > 0.75 and last["margin"] > first["margin"]
    assert evals[-1].val_loss < evals[0].val_loss


@pytest.mark.parametrize("objective, reference", [("kto", "adapters_off"), ("dpo", "cached")])
def test_preference_runs_resume_bit_for_bit(tmp_path, objective: str, reference: str) -> None:
    """A checkpoint loaded into a fresh model continues the run exactly (KL pairs, reference cache, data order)."""
    from ft.engine.checkpoint import CheckpointSaver, load_checkpoint
    from ft.engine.trainer import TrainerState
    from ft.workspace.run_folder import KEPT_REFERENCE, step_name

    steps = 6
    data = _pairs(8) if objective == "dpo" else _labelled(12)
    val = _pairs(3, seed=9) if objective == "dpo" else _labelled(4, seed=9)
    popts = PreferenceOptions(objective, beta=0.3)  # type: ignore[arg-type]

    def fresh():
        model = tiny_llama(seed=0)
        mx.random.seed(5)
        apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.1, target_modules="all-linear"))
        return model, build_optimizer(OptimizerSpec(), 1e-2)

    opts = TrainOptions(
        BatchOptions(batch_size=2, grad_accumulation_steps=2, max_seq_length=64, seed=3),
        total_steps=steps,
        eval_steps=2,
    )

    def cache_of(model):
        if reference != "cached":
            return None
        from ft.engine.preference import Units

        bo = opts.batch
        return tuple(
            compute_reference(model, check_model(model), Units(d, popts, bo.max_seq_length, bo.seed), bo)
            for d in (data, val)
        )

    model, opt = fresh()
    cache = cache_of(model)
    state = TrainerState()
    saver = CheckpointSaver(
        tmp_path, model, opt, state, save_steps=1, keep_last=steps, adapter_config={}, config={}
    )

    class Rec:
        def __init__(self, out):
            self.out = out

        def on_step(self, e) -> None:
            self.out[e.step] = (e.loss, list(e.record_ids))

    full: dict = {}
    kw = {"objective": popts, "reference": reference, "ref_cache": cache}
    train(model, opt, data, val, opts, callbacks=[Rec(full), saver], state=state, **kw)
    final = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    # adapters off: the reference values kept so far travel with each checkpoint (NaN: not computed yet)
    kept_file = tmp_path / step_name(2) / KEPT_REFERENCE
    assert kept_file.exists() == (reference == "adapters_off")
    if kept_file.exists():
        kept = mx.load(str(kept_file))
        assert set(kept) == {"train_sums", "train_counts", "val_sums", "val_counts"}
        assert 0 < int(np.isfinite(np.array(kept["train_sums"])).sum()) < 2 * len(data)  # some, not all yet
    for start in (3, 5):
        model, opt = fresh()
        st = TrainerState.from_json(load_checkpoint(tmp_path / step_name(start), model, opt))
        got: dict = {}
        train(model, opt, data, val, opts, callbacks=[Rec(got)], state=st, **kw)
        assert sorted(got) == list(range(start + 1, steps + 1))
        for k, (loss, ids) in got.items():
            assert ids == full[k][1] and loss == full[k][0], k  # bit for bit
        w = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        assert all(np.array_equal(w[k], final[k]) for k in final)


def test_early_stopping_watches_a_preference_metric() -> None:
    """early_stopping_metric reward_accuracy: no improvement (learning rate 0) stops the run after patience."""
    data = _pairs(8)
    model = _model()
    opt = build_optimizer(OptimizerSpec(name="sgd", momentum=0.0, weight_decay=0.0), 0.0)
    evals = []

    class Rec:
        def on_eval(self, e) -> None:
            evals.append(e)

    opts = TrainOptions(
        BatchOptions(batch_size=2, max_seq_length=64, seed=1),
        total_steps=8,
        eval_steps=1,
        early_stopping_patience=2,
        early_stopping_metric="reward_accuracy",
    )
    res = train(model, opt, data, data, opts, objective=PreferenceOptions("dpo"), callbacks=[Rec()])
    assert res.stopped == "early-stopped" and res.state.step == 2
    assert [e.step for e in evals] == [0, 1, 2]
    assert len({e.metrics["reward_accuracy"] for e in evals}) == 1
