"""`prefuse sft`: supervised fine-tuning on the fused cross-entropy, through `prefuse train`'s loop.

    cfg = SFTConfig(model_name_or_path="model", dataset_name="sft.jsonl", output_dir="out")
    metrics = train_sft(cfg)        # -> out/: metrics.jsonl, checkpoint-<step>/, train_config.json

The run is `prefuse train`'s (engine/train/build.py and loop.py): the same output_dir lock, seeding, models and
LoRA (engine/models), optimizer and schedule, checkpoints and exact resume, non-finite guard, SIGINT save, metrics
log and torchrun ranks. What SFT brings is a batch source (SFTSource: the tokenized examples of data.py in a
resumable order) and a step (SFTStep):

    loss = - sum over the step's trained tokens of log p(token) / (the step's trained tokens, all micro-batches
           and ranks)

TRL 1.16's SFTTrainer normalisation (`num_items_in_batch`): every micro-batch's sum goes over the whole optimizer
step's count, so gradient accumulation gives the gradient of one big batch. The loop weighs each micro-batch's
mean by its share of the step's trained tokens (Batch.per_token, loss_units), which is the same thing. The log-probs come
from the fused head (kernels: no [tokens x vocab] logits; a LoRA adapter on the lm_head goes in as its low-rank
update), and in the same pass over the same chunks of logits the statistics TRL logs: `entropy` (mean over trained
tokens, nats) and `mean_token_accuracy` (share of trained tokens that are the argmax); `num_tokens` counts every
non-padding token trained on so far, as TRL's does. Metrics that are means are token-weighted over the whole step
(TRL averages its micro-batches' means; the same with one micro-batch per step).

--packing runs each micro-batch's sequences packed without padding (engine/data/packing.py: position ids restart
with every sequence, attention stays within it): the same examples, batches and loss as the padded run, less
attention work on padding. TRL's `packing=True` instead re-cuts the data set into new max_length rows (bfd), which
changes what a batch holds; prefuse does not re-cut.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from prefuse.engine.checkpoint import load_weights
from prefuse.engine.checks import check_field, setting
from prefuse.engine.core.shards import ShardedSource, check_last_batch
from prefuse.engine.core.sources import Batch, ShuffledSource
from prefuse.engine.core.typed_settings import typed_settings
from prefuse.engine.data import IGNORE_INDEX, PairBatches, load_records
from prefuse.engine.data.packing import pack_sequences
from prefuse.engine.models.loading import check_packable, decoder_hidden_states, load_models
from prefuse.engine.models.settings import ModelSettings
from prefuse.engine.sft.data import TRUNCATION_MODES, SFTData, check_sft_rows_left, tokenize_sft
from prefuse.engine.train import distributed
from prefuse.engine.train.build import Run, open_log, optimizer_and_schedule, resume, start, total_steps_of
from prefuse.engine.train.loop import train_run
from prefuse.engine.train.output_dir import release
from prefuse.engine.train.report import Report
from prefuse.engine.train.settings import OptimisationSettings, RunSettings
from prefuse.heads import head_of
from prefuse.kernels import linear_logprobs

SAMPLING = ("random", "sequential")


@dataclass
class SFTDataSettings:
    dataset_name: str = setting("", "local .jsonl/.json/.parquet file or save_to_disk folder of SFT rows: `text`, "
                                    "`prompt` + `completion` (strings or messages), or `messages`")
    max_length: int | None = setting(1024, "cut sequences longer than this many tokens (truncation_mode); a "
                                           "sequence left with no trained token is dropped")
    truncation_mode: str = setting("keep_start", f"which end of a long sequence is kept: {', '.join(TRUNCATION_MODES)}")
    completion_only_loss: bool | None = setting(None, "prompt-completion data: train only the completion's tokens "
                                                      "(default: true for prompt-completion data)")
    assistant_only_loss: bool = setting(False, "train only the assistant turns' tokens; the chat template must mark "
                                               "them with {% generation %}")
    chat_template_path: str | None = setting(None, "a Jinja file whose chat template replaces the tokenizer's (for "
                                                   "assistant_only_loss: one with {% generation %} markers)")
    packing: bool = setting(False, "run each batch's sequences packed without padding (position ids restarting "
                                   "per sequence): the padded run's loss with less attention work")
    packing_row_tokens: int | None = setting(None, "with --packing: rows of at most this many tokens (sdpa and eager "
                                                   "attend over a whole row; default: one row per batch)")
    train_sampling_strategy: str = setting("random", "random (a fresh permutation per epoch, from the seed) or "
                                                     "sequential (the file's order)")
    skip_bad_rows: bool = setting(False, "skip rows that cannot be read (missing column, empty text, a template "
                                         "error), counted, instead of stopping at the first with its file:row")

    def check(self) -> None:
        check_field(self.truncation_mode in TRUNCATION_MODES, "truncation_mode",
                    f"{self.truncation_mode!r} is not one of {TRUNCATION_MODES}")
        check_field(self.max_length is None or self.max_length >= 2, "max_length",
                    f"must be >= 2, got {self.max_length}")
        check_field(self.train_sampling_strategy in SAMPLING, "train_sampling_strategy",
                    f"{self.train_sampling_strategy!r} is not one of {SAMPLING}")
        check_field(self.chat_template_path is None or Path(self.chat_template_path).is_file(), "chat_template_path",
                    f"no such file: {self.chat_template_path}")
        check_field(self.packing_row_tokens is None or self.packing, "packing_row_tokens", "needs --packing")
        check_field(self.packing_row_tokens is None or self.max_length is not None, "packing_row_tokens",
                    "needs max_length (rows must hold the longest sequence)")
        check_field(self.packing_row_tokens is None or self.packing_row_tokens >= (self.max_length or 0),
                    "packing_row_tokens", f"must be >= max_length ({self.max_length}), got {self.packing_row_tokens}")


SECTIONS = (ModelSettings, SFTDataSettings, OptimisationSettings, RunSettings)


@dataclass
class SFTConfig(*reversed(SECTIONS)):
    """Every setting of `prefuse sft`: the model section of `prefuse train` (LoRA included), the SFT data section,
    and `prefuse train`'s optimisation and run sections; TRL's SFTConfig names and defaults (learning_rate 2e-5)."""

    learning_rate: float = setting(2e-5, "AdamW's peak learning rate (TRL SFTConfig's default)")

    @classmethod
    def from_dict(cls, values: dict, where: str = "") -> SFTConfig:
        return cls(**typed_settings(cls, values, where))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> SFTConfig:
        """One-line ValueErrors naming the first bad field; return self."""
        for name in ("model_name_or_path", "dataset_name", "output_dir"):
            check_field(bool(getattr(self, name)), name, "required")
        self.plain_model_paths()
        check_field(not self.ref_model_name_or_path, "ref_model_name_or_path", "SFT reads no reference model; drop it")
        check_field(Path(self.dataset_name).exists(), "dataset_name", f"no such file or directory: {self.dataset_name}")
        for section in SECTIONS:
            section.check(self)
        check_field(self.eval_steps is None, "eval_steps", "prefuse sft runs no held-out evaluation; drop it")
        check_field(self.init_adapters is None or self.use_peft, "init_adapters", "starts LoRA adapters: add --use_peft")
        return self


# -- batches -------------------------------------------------------------------------------------------------------

def sft_batch(examples: list[dict], indices: list[int], pad_id: int) -> Batch:
    """Right-padded input_ids, attention_mask and next-token labels [B, T] (labels[t]: the label of token t + 1,
    -100 where it is not trained, on padding and at the last position); per_token: the loop weighs it by its
    trained labels."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
        labels[row, :length - 1] = torch.tensor(example["labels"][1:])
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 roles={"completion": torch.arange(n)}, index=torch.tensor(indices, dtype=torch.long),
                 per_token=True)


class SFTSource(ShuffledSource):
    """The SFT examples in batches of `batch_size`, in a resumable order (random per epoch from the seed, or the
    file's order)."""

    def __init__(self, data: SFTData, *, batch_size: int, seed: int, pad_id: int, shuffle: bool = True):
        self.data, self.pad_id = data, pad_id
        super().__init__(len(data), batch_size=batch_size, seed=seed,
                         order=PairBatches(len(data), batch_size=batch_size, seed=seed, shuffle=shuffle))

    def batch(self, indices: list[int]) -> Batch:
        return sft_batch([self.data.examples[i] for i in indices], indices, self.pad_id)


# -- the step ------------------------------------------------------------------------------------------------------

class SFTStep:
    """(loss, metrics) of an SFT Batch: the mean negative log-likelihood over its trained tokens (the loop weighs
    it by the batch's share of the step's trained tokens), `entropy` and `mean_token_accuracy` from the same
    fused-head pass."""

    def __init__(self, model: torch.nn.Module, *, bf16: bool = False, packing: bool = False,
                 packing_row_tokens: int | None = None):
        self.model, self.bf16 = model, bf16
        self.packing, self.packing_row_tokens = packing, packing_row_tokens
        head_of(model)  # an lm_head the fused head cannot compute is refused here
        if packing:
            check_packable(model)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] in the padded layout (computed packed with --packing)."""
        autocast = torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        if not self.packing:
            with autocast:
                return decoder_hidden_states(self.model, batch.input_ids, batch.attention_mask)
        packed = pack_sequences(batch.input_ids, batch.attention_mask, row_tokens=self.packing_row_tokens)
        with autocast:
            hidden = decoder_hidden_states(self.model, packed.input_ids, None, position_ids=packed.position_ids)
        return packed.padded(hidden)

    def __call__(self, batch: Batch, reference=None) -> tuple[torch.Tensor, dict]:
        head = head_of(self.model)
        hidden = self.hidden(batch).to(head.weight.dtype)
        logp, stats = linear_logprobs(hidden, head.weight, batch.labels, bias=head.bias, softcap=head.softcap,
                                      low_rank=head.low_rank(hidden), return_stats=True)
        count = (batch.labels != IGNORE_INDEX).sum().clamp(min=1)
        loss = -logp.sum() / count
        return loss, {"entropy": stats.entropy.sum() / count,
                      "mean_token_accuracy": stats.label_is_argmax.sum().float() / count}

    def held_out_metrics(self, parts, world) -> dict[str, float]:
        raise NotImplementedError("prefuse sft runs no held-out evaluation")

    def after_update(self, step: int, metrics: dict, optimizer) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SFTReport(Report):
    """What `prefuse sft` prints; its records hold num_tokens (TRL's: non-padding tokens trained on so far)."""

    def opening(self, run) -> str:
        cfg = run.cfg
        return (f"training {run.total_steps} steps of {cfg.gradient_accumulation_steps} x "
                f"{cfg.per_device_train_batch_size} sequences (SFT); "
                f"{sum(p.numel() for p in run.params):,} trainable parameters")

    def postfix(self, metrics: dict) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics['mean_token_accuracy']:.3f}"}

    def extra(self, run) -> dict[str, float]:
        return {"num_tokens": run.num_tokens}

    def step_line(self, step: int, total: int, record: dict) -> str:
        return (f"step {step}/{total}  loss {record['loss']:.4f}  mean_token_accuracy "
                f"{record['mean_token_accuracy']:.3f}  entropy {record['entropy']:.3f}  lr "
                f"{record['learning_rate']:.2e}  {record['tokens_per_second']:.0f} tok/s")


# -- the run -------------------------------------------------------------------------------------------------------

def load_sft_data(cfg: SFTConfig, tokenizer) -> SFTData:
    """dataset_name's rows as SFT examples, reported in one `data:` line."""
    source = str(cfg.dataset_name)
    if cfg.chat_template_path:
        tokenizer.chat_template = Path(cfg.chat_template_path).read_text(encoding="utf-8")
    data = tokenize_sft(load_records(cfg.dataset_name), tokenizer, source=source, max_length=cfg.max_length,
                        truncation_mode=cfg.truncation_mode, completion_only_loss=cfg.completion_only_loss,
                        assistant_only_loss=cfg.assistant_only_loss, skip_bad_rows=cfg.skip_bad_rows)
    check_sft_rows_left(data, source, cfg.max_length)
    print(f"data: {len(data)} training sequences ({data.format}), {data.trained_tokens()} trained tokens"
          + (f", {data.truncated} cut to max_length={cfg.max_length}" if data.truncated else "")
          + (f", {data.dropped} dropped (no trained token within max_length)" if data.dropped else "")
          + (f", {data.skipped.count} bad rows skipped" if data.skipped.count else ""), flush=True)
    return data


def build_sft_run(cfg: SFTConfig) -> Run:
    """The Run of `cfg`: `prefuse train`'s start (output_dir claimed, seeds), the model (LoRA or full), the SFT
    source and step, then its finish (ranks, optimizer and schedule, resume, log)."""
    cfg.validate()
    world = distributed.current()
    out, device = start(cfg.output_dir, cfg.to_dict(), seed=cfg.seed, device=cfg.device, world=world)
    try:
        models = load_models(cfg.model_config(), device=device, need_reference=False)
        tokenizer = models.tokenizer
        check_field(tokenizer is not None, "model_name_or_path", f"{cfg.model_name_or_path} has no tokenizer files")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        data = load_sft_data(cfg, tokenizer)
        global_batch = cfg.per_device_train_batch_size * world.size
        source = SFTSource(data, batch_size=global_batch, seed=cfg.seed, pad_id=pad_id,
                           shuffle=cfg.train_sampling_strategy == "random")
        if world.distributed:
            check_last_batch(len(data), global_batch, world, "per_device_train_batch_size")
            source = ShardedSource(source, world)
        step = SFTStep(models.policy, bf16=cfg.bf16, packing=cfg.packing, packing_row_tokens=cfg.packing_row_tokens)
        total_steps = total_steps_of(cfg, source.batches_per_epoch)
        step = world.wrap(step, models, fsdp=cfg.fsdp, bf16=cfg.bf16)  # DDP / FSDP2 under torchrun
        params, optimizer, scheduler = optimizer_and_schedule(cfg, models.policy, total_steps)
        if cfg.init_adapters:  # a LoRA run's adapters start this one (fresh optimizer)
            load_weights(cfg.init_adapters, model=models.policy)
            print(f"adapters from {cfg.init_adapters}", flush=True)
        state = resume(cfg, out, model=models.policy, optimizer=optimizer, scheduler=scheduler, source=source,
                       step=step, world=world, total_steps=total_steps)
        return Run(cfg=cfg, out=out, device=device, policy=models.policy, step=step, source=source, params=params,
                   optimizer=optimizer, scheduler=scheduler, log=open_log(cfg, out, state, world),
                   total_steps=total_steps, start_step=int(state.get("step", 0)),
                   num_tokens=int(state.get("num_tokens", 0)),
                   nonfinite_steps_skipped=int(state.get("nonfinite_steps_skipped", 0)), report=SFTReport(),
                   world=world)
    except BaseException:
        release(out, failed=True)
        raise


def train_sft(cfg: SFTConfig) -> dict:
    """Train as `cfg` says; return the last logged record."""
    with distributed.launch():
        run = build_sft_run(cfg)
        try:
            return train_run(run)
        finally:
            release(run.out)


__all__ = ["SFTConfig", "SFTDataSettings", "SFTReport", "SFTSource", "SFTStep", "build_sft_run", "load_sft_data",
           "sft_batch", "train_sft"]
