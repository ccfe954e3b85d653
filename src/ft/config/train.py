"""The schema of train.yml: one pydantic model per section, a docstring per field.

These models are the single definition of every training setting: `ft init` renders train.yml from
them, docs/config.md is generated from them, and every service reads its values from a
:class:`TrainConfig`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL = "smollm2-135m-instruct"
BRIEF_MODEL = "mistralai/Mistral-7B-Instruct-v0.3"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelSection(_Section):
    """Which base model to fine-tune."""

    name: str = DEFAULT_MODEL
    """Model to fine-tune: a name from `ft models list`, a Hugging Face repo id, a local folder or a .gguf file."""

    revision: str | None = None
    """Hugging Face revision (branch, tag or commit) to pin when the model is pulled; null = the default branch."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute precision for training. auto = float32 on CPU (fast BLAS path), bfloat16 on GPUs."""

    trust_remote_code: bool = False
    """Allow model code from the model's repository to run. Off unless you trust the repository."""


class LoraSection(_Section):
    """Low-rank adapter settings (used by the lora, dora and qlora methods)."""

    rank: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank r of the adapter matrices; more rank = more trainable parameters."""

    alpha: Annotated[float, Field(gt=0)] = 32.0
    """Scaling numerator: the adapter output is multiplied by alpha / rank (as in PEFT)."""

    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout applied to the adapter input during training."""

    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    """Linear layers that get adapters, by name (e.g. [q_proj, v_proj]), or all-linear."""

    layers: Annotated[int, Field(ge=1)] | Literal["all"] = "all"
    """Transformer blocks that get adapters: all, or the last N."""

    qlora_bits: Literal[4, 8] = 4
    """qlora: bits of the quantized base when the model is not stored quantized already."""

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_names(cls, v: object) -> object:
        if isinstance(v, str) and v != "all-linear":
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one module name, or all-linear")
        return v


# Gradient checkpointing leaves the last eighth of the blocks out of the recomputation (at least one): the
# backward pass starts there, right where the forward ended, so the last block's intermediates are alive at
# the peak anyway, and each further block kept trades a little memory for a block of compute. Measured on an
# H100 (Mistral-7B shape, 4-bit base, 2 x 2,048, docs/benchmarks.md): 4 of 32 blocks kept, +29.7% step time
# for activations at 31% of without; 1 kept, +34.0% at 29%.
CHECKPOINT_KEEP_SHARE = 8


def checkpoint_keep_last(blocks: int) -> int:
    """Blocks at the end of a ``blocks``-block model that gradient checkpointing does not recompute."""
    return max(1, blocks // CHECKPOINT_KEEP_SHARE)


class TrainingSection(_Section):
    """Optimisation: method, schedule, batch and checkpoint cadence."""

    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    """lora, dora (weight-decomposed LoRA), qlora (LoRA on a quantized base) or full fine-tuning."""

    objective: Literal["sft", "kto", "dpo", "orpo"] = "sft"
    """sft (next-token loss on the replies), kto (labelled replies, needs data.labels: keep), dpo or orpo (paired chosen/rejected records); settings in the preference section."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    """Passes over the training split (ignored when max_steps is set)."""

    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps; null = train for `epochs`."""

    batch_size: Annotated[int, Field(ge=1, le=4096)] = 2
    """Examples per micro-batch (one forward/backward pass)."""

    grad_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 4
    """Micro-batches per optimizer step; examples per step = batch_size x grad_accumulation_steps."""

    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-4
    """Peak learning rate, reached after warmup."""

    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, over the real number of optimizer steps."""

    warmup_steps: Annotated[int, Field(ge=0)] = 100
    """Optimizer steps of linear warmup from 0 to learning_rate; must be fewer than the total steps."""

    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    """Decoupled weight decay (AdamW)."""

    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    """Clip gradients to this global norm; 0 = no clipping."""

    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"
    """Optimizer for the trainable parameters."""

    eval_steps: Annotated[int, Field(ge=1)] = 50
    """Evaluate on the validation split every N optimizer steps (and at the end)."""

    save_steps: Annotated[int, Field(ge=1)] = 100
    """Save a checkpoint every N optimizer steps (and at the end)."""

    keep_last: Annotated[int, Field(ge=1)] = 3
    """Checkpoints to keep besides the best one (by validation loss)."""

    seed: Annotated[int, Field(ge=0)] = 42
    """Seed for data order, splits, dropout and initialisation."""

    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW's beta1 and beta2 (decay of the gradient mean and of its square)."""

    adam_eps: Annotated[float, Field(gt=0, le=1)] = 1e-8
    """AdamW's epsilon (added to the root of the second moment)."""

    packing: bool | Literal["auto"] = "auto"
    """Let short examples share a row (kept apart by the attention mask): true = packed rows only, false = one example per row, auto = the cheaper layout per step (packed, one per row, or a shared prompt prefix computed once)."""

    eval_batches: Annotated[int, Field(ge=1)] | None = None
    """Validation examples per evaluation, in batches of batch_size (a fixed seeded subset); null = the whole split."""

    eval_samples: Annotated[int, Field(ge=0, le=64)] = 0
    """Validation prompts to complete (greedy) at each evaluation, printed and logged; 0 = none."""

    max_skipped_steps: Annotated[int, Field(ge=0)] = 5
    """Non-finite (NaN/Inf) steps in a row after which the run stops as failed; each such update is skipped. 0 = never stop."""

    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute each transformer block in the backward pass: far less activation memory for about a third more step time. auto = on when the memory plan says the run would not fit without it."""

    auto_micro_batch: bool = True
    """Out of memory in a step: redo it with the micro-batch split in two (same examples per step, same update) and keep the lower limit for the rest of the run; false = stop with OUT_OF_MEMORY."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSection:
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be fewer than max_steps ({self.max_steps}); "
                "lower training.warmup_steps"
            )
        return self


class PreferenceSection(_Section):
    """Settings of the preference objectives (training.objective kto, dpo or orpo)."""

    beta: Annotated[float, Field(gt=0, le=100)] = 0.1
    """KTO and DPO: how far the tuned model may move from the reference (larger beta = stays closer); the rewards are beta x log-ratio."""

    desirable_weight: Annotated[float, Field(gt=0)] | None = None
    """KTO: weight of the desirable replies' loss; null = the KTO paper's class-balance rule, desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3] with undesirable_weight 1 (the value closest to 1 in that range; the plan states it)."""

    undesirable_weight: Annotated[float, Field(gt=0)] | None = None
    """KTO: weight of the undesirable replies' loss; null = 1 (see desirable_weight)."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO: sigmoid (the DPO paper) or ipo (squared loss on per-token mean log-ratios, beta is its tau)."""

    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """DPO sigmoid: assumed probability that a pair's preference is flipped (conservative DPO); 0 = plain DPO."""

    orpo_lambda: Annotated[float, Field(gt=0, le=100)] = 0.1
    """ORPO: weight of the odds-ratio term added to the chosen replies' NLL."""

    reference: Literal["auto", "adapters_off", "cached"] = "auto"
    """KTO and DPO reference model: adapters_off (the base, by switching the LoRA/DoRA/QLoRA adapters off: no second copy), cached (log-probabilities computed once with the starting weights, stored with the run), auto = adapters_off for adapters trained from the base, cached for full fine-tuning or a run started with --init-from."""


class EarlyStoppingSection(_Section):
    """Stop when the validation loss stops improving (needs a validation split)."""

    patience: Annotated[int, Field(ge=1)] | None = None
    """Evaluations in a row without an improvement of min_delta before the run stops (the best checkpoint is kept); null = off."""

    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """Smallest drop of the validation loss, against the best so far, that counts as an improvement."""

    metric: Literal["val_loss", "reward_accuracy", "margin"] = "val_loss"
    """What must improve: the validation loss, or for preference objectives the validation reward accuracy or reward margin (higher is better)."""


class DataSection(_Section):
    """Where the data is and how it becomes training examples."""

    path: str = "data/sample.jsonl"
    """Training data: a file or folder (JSONL, JSON, CSV, Parquet), relative to the workspace, or a HF dataset id."""

    format: Literal["auto", "chat", "sharegpt", "alpaca", "completions", "text"] = "auto"
    """Record format; auto detects it for every record."""

    template: Literal["model", "chatml", "llama2", "mistral", "alpaca"] = "model"
    """Chat template: the model's own, or a named fallback for base models without one."""

    val_split: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """Fraction of records held out for validation (stratified by label)."""

    max_seq_length: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    """Longest example in tokens; longer ones follow on_long."""

    labels: Literal["sft-desirable", "all", "keep"] = "sft-desirable"
    """With labelled data: train on desirable records only (sft-desirable), ignore labels (all), or keep both (keep)."""

    on_long: Literal["truncate", "drop", "error"] = "drop"
    """What to do with examples longer than max_seq_length (always counted and reported)."""

    max_bad: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Largest fraction of invalid records tolerated (dropped and reported); above it preparation fails."""

    test_split: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Fraction of records held out as a test split (stratified by label, prompt-disjoint); 0 = none."""

    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Tokens the loss is computed on: every assistant turn, the last assistant turn only, or all tokens."""

    stratify_by: str | None = None
    """A metadata field (an extra key of the records, e.g. category): splits stratified by label and its value."""

    group_by: str | None = None
    """A metadata field evaluation reports per value of (e.g. behavior); recorded with the prepared dataset."""

    tools: str | None = None
    """JSON file of tool definitions for records without their own 'tools' (relative to the workspace); none by default."""

    unknown_tool: Literal["warn", "error"] = "warn"
    """A tool call naming a tool missing from the definitions: keep the record with a warning, or reject it."""

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataSection:
        if self.val_split + self.test_split >= 1:
            raise ValueError(
                f"val_split {self.val_split} + test_split {self.test_split} must be below 1 (nothing left to train on)"
            )
        return self


class DistributedSection(_Section):
    """Data-parallel training over several processes, GPUs or hosts (MLX's distributed backend)."""

    nproc: Annotated[int, Field(ge=1, le=1024)] = 1
    """Processes on this host (`ft train --nproc N`): each computes its share of every optimizer step; 1 = no data parallelism."""

    backend: Literal["auto", "ring", "mpi", "nccl"] = "auto"
    """MLX backend: ring (TCP; CPUs and Macs), nccl (NVIDIA GPUs), mpi; auto = nccl on CUDA, else ring."""

    hostfile: str | None = None
    """Several hosts: an mlx.launch hostfile (JSON); the ranks are started over ssh by mlx.launch (`ft train --hostfile`)."""


class LoggingSection(_Section):
    """What is logged and where."""

    steps: Annotated[int, Field(ge=1)] = 10
    """Log training loss, learning rate, throughput and memory every N optimizer steps."""

    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""

    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package and wandb_api_key in passwords.yml)."""


# Keys `ft tune` may search, with their kind of value; anything else in tune.space is refused by name.
TUNABLE_KEYS: dict[str, type] = {
    "training.learning_rate": float,
    "training.weight_decay": float,
    "training.warmup_steps": int,
    "training.epochs": int,
    "training.max_steps": int,
    "training.batch_size": int,
    "training.grad_accumulation_steps": int,
    "training.lr_schedule": str,
    "training.max_grad_norm": float,
    "lora.rank": int,
    "lora.alpha": float,
    "lora.dropout": float,
    "lora.layers": int,
}


class TuneParam(_Section):
    """How `ft tune` samples one train.yml key."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    """loguniform or uniform (a float range), int (an integer range) or choice (one of a list)."""

    low: float | None = None
    """Lower bound of a range (loguniform needs low > 0)."""

    high: float | None = None
    """Upper bound of a range (inclusive)."""

    step: float | None = None
    """int only: spacing of the integers tried (default 1)."""

    choices: list[float | int | str] | None = None
    """choice only: the values to try."""

    @field_validator("choices", mode="before")
    @classmethod
    def _numbers(cls, v: object) -> object:
        # YAML reads 1e-5 (no dot) as text; a choice that reads as a number is one.
        if isinstance(v, list):
            return [_number_or_text(c) for c in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TuneParam:
        if self.type == "choice":
            if not self.choices:
                raise ValueError("type choice needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("type choice takes 'choices', not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"type {self.type} takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low:g}); use uniform for ranges from 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("type int needs whole-number low and high")
        if self.step is not None and (self.type != "int" or self.step < 1 or self.step != int(self.step)):
            raise ValueError("'step' is for type int only, a whole number >= 1")
        return self


class TuneSection(_Section):
    """`ft tune`: the hyperparameter search (a study of real training runs)."""

    trials: Annotated[int, Field(ge=1, le=10_000)] = 20
    """Trials in the study's budget (finished or pruned ones count; `ft tune --trials` overrides)."""

    timeout: str | None = None
    """Wall-clock budget such as 90m or 2h: no new trial starts after it; null = none."""

    objective: str = "val_loss"
    """What a trial is scored by: val_loss (the run's best validation loss) or an `ft evaluate` metric of the tuned model (e.g. perplexity)."""

    direction: Literal["auto", "minimize", "maximize"] = "auto"
    """auto = minimize losses and perplexity, maximize anything else."""

    sampler: Literal["tpe", "random"] = "tpe"
    """How the next trial's values are chosen: optuna's TPE (Bayesian) or random."""

    pruner: Literal["median", "halving", "none"] = "median"
    """Stop a trial early at a validation step where it is worse than the median of earlier trials at that step (median), by successive halving (halving), or never (none)."""

    startup_trials: Annotated[int, Field(ge=0)] = 2
    """Trials that run to the end before pruning and the TPE model start."""

    space: dict[str, TuneParam] | None = None
    """Searched keys (e.g. training.learning_rate: {type: loguniform, low: 1e-5, high: 1e-3}); null = ft's default space over learning rate, LoRA rank/alpha/dropout and warmup."""

    @field_validator("space")
    @classmethod
    def _known_keys(cls, v: dict[str, TuneParam] | None) -> dict[str, TuneParam] | None:
        for key, param in (v or {}).items():
            if key not in TUNABLE_KEYS:
                raise ValueError(f"{key!r} cannot be searched; searchable keys: {', '.join(TUNABLE_KEYS)}")
            kind = TUNABLE_KEYS[key]
            if param.type == "choice":
                bad = [c for c in param.choices or () if not _fits(c, kind)]
                if bad:
                    raise ValueError(f"{key}: choice {bad[0]!r} is not a {kind.__name__}")
            elif kind is str:
                raise ValueError(f"{key} takes text values: use type choice")
            elif kind is int and param.type != "int":
                raise ValueError(f"{key} is a whole number: use type int (or choice)")
        return v

    @field_validator("timeout")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v


def _number_or_text(value: object) -> object:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def _fits(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def parse_duration(text: str) -> float:
    """Seconds of '90s', '45m', '2h', '1h30m' or a plain number of seconds; ValueError otherwise."""
    import re

    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or parts is None or not any(parts.groups()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 45m, 2h or 1h30m")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + sec


class TrainConfig(_Section):
    """Everything in train.yml."""

    model: ModelSection = ModelSection()
    """Which base model to fine-tune."""

    lora: LoraSection = LoraSection()
    """Low-rank adapter settings."""

    training: TrainingSection = TrainingSection()
    """Optimisation settings."""

    preference: PreferenceSection = PreferenceSection()
    """Preference objectives (KTO, DPO, ORPO)."""

    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    """Early stopping on the validation loss."""

    data: DataSection = DataSection()
    """Data preparation settings."""

    """Output locations."""

    logging: LoggingSection = LoggingSection()
    """Logging settings."""

    distributed: DistributedSection = DistributedSection()
    """Data-parallel training settings."""

    tune: TuneSection = TuneSection()
    """Hyperparameter search settings for `ft tune`."""

    @model_validator(mode="after")
    def _objective_fits(self) -> TrainConfig:
        if self.training.objective == "kto" and self.data.labels != "keep":
            raise ValueError(
                f"training.objective kto trains on labelled replies but data.labels is {self.data.labels!r}; "
                "set data.labels: keep (or use `ft train --objective kto`, which does)"
            )
        if self.early_stopping.metric != "val_loss" and self.training.objective == "sft":
            raise ValueError(
                f"early_stopping.metric {self.early_stopping.metric} needs a preference objective "
                "(training.objective kto, dpo or orpo); use val_loss"
            )
        return self


SECTIONS: tuple[str, ...] = tuple(TrainConfig.model_fields)
