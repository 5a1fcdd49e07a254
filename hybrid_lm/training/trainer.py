"""The pretraining loop: packed batches -> HybridLM -> AdamW, with DSA stages, checkpoints, evals and samples.

Shape letters: B rows per step (all ranks), T seq_len, W ranks. Each micro-step feeds `input_ids [1, B/W*T]` with
its `cu_seqlens`; each micro-batch's LM loss is weighted by its share of the step's predicted tokens (its indexer
KL by its share of tokens), so a step's gradient is the same whatever the split over ranks and accumulation.

DSA stages (DeepSeek-V3.2, arXiv 2512.02556, section 2): `dense_warmup` optimises the indexer KL (`aux_loss`) alone;
`sparse` optimises `loss + aux_loss` (the model detaches the indexer's inputs); `none` the LM loss.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import hybrid_lm
from hybrid_lm.data import PackedBatches, iter_eval_batches, prepare_data
from hybrid_lm.data.tokenizer import load_tokenizer
from hybrid_lm.training import checkpoint as ckpt_io
from hybrid_lm.training.build import (autocast_context, autocast_dtype, build_training_model, configure_dsa_stage,
                                      deterministic_algorithms, num_predictions, seed_everything)
from hybrid_lm.training.config import TrainConfig, validate
from hybrid_lm.training.distributed import (DistInfo, all_reduce_sum, barrier, setup_distributed,
                                            teardown_distributed, wrap_model)
from hybrid_lm.training.monitor import Monitor
from hybrid_lm.training.optim import build_optimizer, build_scheduler
from hybrid_lm.training.state import load_training_state, save_training_state

__all__ = ["Trainer", "TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens_seen: int
    status: str                                   # "done" | "stopped" | "nonfinite"
    losses: dict[int, float] = field(default_factory=dict)   # optimised loss of each step this call ran
    eval_loss: float | None = None
    last_checkpoint: Path | None = None
    message: str = ""


def train(cfg: TrainConfig, *, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) training; under torchrun every rank calls this.

    `max_steps` stops the run after that step (default: `cfg.max_steps`) while the LR schedule keeps the length
    the config sets, so 30 steps, then resuming up to 60, follows exactly the curve of one 60-step run.
    """
    info = setup_distributed(cfg.device)
    try:
        with deterministic_algorithms(info.device):
            return Trainer(cfg, info, resume=resume, max_steps=max_steps).fit()
    finally:
        teardown_distributed()


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None, *, resume: bool = False,
                 max_steps: int | None = None):
        validate(cfg)
        self.cfg, self.info = cfg, info or setup_distributed(cfg.device)
        self.device = self.info.device
        self.max_steps = cfg.max_steps if max_steps is None else max_steps
        if self.max_steps < 1:
            raise ValueError(f"max_steps = {self.max_steps} must be >= 1")
        if cfg.batch_size % self.info.world_size:
            raise ValueError(f"batch_size = {cfg.batch_size} must be divisible by the {self.info.world_size} ranks")
        self.run_dir = Path(cfg.out_dir)
        seed_everything(cfg.seed)
        resume_from = self._checkpoint_to_resume(resume)
        self.prepared = self._prepare_data(resume_from)
        # a pre-tokenized corpus may come without a tokenizer: then there are no samples to decode
        tok_path = self.prepared.tokenizer_path
        self.tokenizer = load_tokenizer(tok_path)[0] if tok_path is not None else None
        model = build_training_model(cfg, self.prepared.vocab_size, resume_from)
        configure_dsa_stage(model, cfg.dsa_stage, cfg.indexer_loss_weight)
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.residual_dtype == "bf16":
            if autocast_dtype(self.device, cfg.dtype) is None:
                raise ValueError(f"residual_dtype: bf16 needs bf16 autocast, which dtype: {cfg.dtype} does not turn "
                                 f"on for {self.device.type}; set dtype: bf16 or residual_dtype: fp32")
            model.set_residual_dtype(torch.bfloat16)
        self.raw = model.to(self.device)
        self.model = wrap_model(self.raw, self.info, cfg.parallel)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.raw.named_parameters(), cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.optim.total_steps or cfg.max_steps)
        self.batches = PackedBatches(self.prepared.train, cfg.seq_len, cfg.batch_size // self.info.world_size,
                                     self.prepared.eos_id, seed=cfg.seed, rank=self.info.rank,
                                     world_size=self.info.world_size)
        self.step = self.tokens_seen = self.nonfinite = 0
        self.last_checkpoint = None
        if resume_from is not None:
            load_training_state(self, resume_from)  # last: restores the RNG states after model init used them
            self.last_checkpoint = resume_from
        self.monitor = self._open_monitor(resume_from) if self.info.is_main else None
        self._interrupted = self._stop = False  # Ctrl-C seen here / agreed by every rank

    # ----------------------------------------------------------------------------------------------- setup
    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        existing = ckpt_io.list_checkpoints(self.run_dir)
        if not resume:
            if existing:
                raise ValueError(f"{self.run_dir} already holds checkpoints ({existing[-1].name}); pass --resume "
                                 "to continue that run, or choose a new --out")
            return None
        if not existing:
            self._print(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
            return None
        found = ckpt_io.find_latest_valid(self.run_dir)
        if found is None:
            raise ValueError(f"--resume: no checkpoint under {self.run_dir / ckpt_io.CHECKPOINTS_SUBDIR} verifies "
                             "(see the warnings above); start a new run with another --out")
        self._print(f"resuming from {found}")
        return found

    def _prepare_data(self, resume_from: Path | None = None):
        cfg = self.cfg
        tok = cfg.data.tokenizer
        if resume_from is not None and tok is not None and not Path(tok).exists():
            # e.g. the init_from run's checkpoint that named it was pruned or deleted since: the checkpoint keeps a
            # copy of the tokenizer the run trains with
            if (resume_from / "tokenizer.json").is_file():
                self._print(f"data.tokenizer {tok} is gone: using the copy in {resume_from}")
                cfg.data.tokenizer = str(resume_from / "tokenizer.json")
        if cfg.init_from is not None and cfg.data.tokenizer is None:
            saved = hybrid_lm.model.resolve_model_dir(cfg.init_from) / "tokenizer.json"
            if not saved.is_file():  # a new tokenizer's ids would mean other tokens to the trained embeddings
                raise ValueError(f"init_from {cfg.init_from!r} holds no tokenizer.json: set data.tokenizer to the "
                                 f"tokenizer that model was trained with")
            cfg.data.tokenizer = str(saved)  # continue with the vocabulary the model was trained on
        # rank 0 tokenizes first; the others then find the finished cache
        if not self.info.is_main:
            barrier(self.info)
        prepared = prepare_data(cfg.data)
        if self.info.is_main:
            barrier(self.info)
        if len(prepared.val) == 0 and cfg.eval_batches > 0:
            self._print("no held-out split (data.val_fraction = 0): evals are skipped")
        elif len(prepared.val) < cfg.seq_len and cfg.eval_batches > 0:
            warnings.warn(f"the held-out split has {len(prepared.val)} tokens, fewer than seq_len = {cfg.seq_len}: "
                          f"evals are skipped; raise data.val_fraction or lower seq_len", stacklevel=2)
        return prepared

    def _open_monitor(self, resume_from: Path | None) -> Monitor:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        reference = self.prepared.stats.get("unigram_entropy")
        return Monitor(self.run_dir, self.step if resume_from is not None else None, reference,
                       title=f"{self.run_dir.name}: {self.raw.config.name or 'model'} ({self.cfg.dsa_stage})")

    def _print(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text)

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        cfg = self.cfg
        self._describe()
        result = TrainResult(self.run_dir, self.step, self.tokens_seen, "done")
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if on_main_thread else None
        # a live bar on a terminal; in a log file one plain line per log step reads better than carriage returns
        self._live = self.info.is_main and sys.stderr.isatty()
        self._bar = tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not self._live,
                         dynamic_ncols=True)
        try:
            if cfg.eval_at_start and self.step == 0:  # the starting point of a continued run (step 0)
                result.eval_loss = self._eval_and_sample()
            self._reset_clock()
            while self.step < self.max_steps and not self._stop:
                stats = self._train_step()
                if stats is None:
                    self.nonfinite += 1
                    if self.nonfinite >= cfg.max_nonfinite:
                        return self._diverged(result)
                    if self._stop and self.step > 0 and not self._saved_this_step():
                        self._save()  # Ctrl-C during a skipped step: still a checkpoint after the last step
                    continue
                self.nonfinite = 0
                self.step += 1
                self.tokens_seen += cfg.batch_size * cfg.seq_len * cfg.grad_accum
                result.losses[self.step] = stats["loss"]
                self._report(stats)
                if self.step % cfg.eval_every == 0 and self.step < self.max_steps and not self._stop:
                    result.eval_loss = self._eval_and_sample()
                if self.step % cfg.save_every == 0 or self._stop:
                    self._save()
            if self._stop:  # Ctrl-C: a checkpoint was saved after the last step; no final eval
                result.status = "stopped"
            else:
                result.eval_loss = self._eval_and_sample()
                if not self._saved_this_step():
                    self._save()
        finally:
            self._bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self.monitor is not None:
                self.monitor.close()
        return self._finish(result)

    def _reset_clock(self) -> None:
        """Throughput counts training only: evals and checkpoints restart the clock."""
        self._clock = (time.perf_counter(), self.tokens_seen)

    def _report(self, stats: dict) -> None:
        start, tokens = self._clock
        tps = (self.tokens_seen - tokens) / max(time.perf_counter() - start, 1e-9)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{stats['lm_loss']:.3f}", tok_s=f"{tps:,.0f}")
        if self.step % self.cfg.log_every == 0 or self.step == self.max_steps:
            self._log({"step": self.step, **stats, "tokens": self.tokens_seen, "tokens_per_s": tps})
            if not self._live:
                # aux: the indexer KL (what dense_warmup optimises) and/or the MoE balance loss
                aux = f" | aux {stats['aux_loss']:.4f}" if stats["aux_loss"] else ""
                self._print(f"step {self.step}/{self.max_steps} | loss {stats['lm_loss']:.4f}{aux} | lr "
                            f"{stats['lr']:.2e} | grad norm {stats['grad_norm']:.2f} | {tps:,.0f} tok/s")
            self._reset_clock()

    def _train_step(self) -> dict | None:
        """One optimizer update over grad_accum micro-batches; None (and no update) when the loss is not finite.

        The LM loss is a mean over predicted tokens and the indexer KL a mean over query tokens, so each
        micro-batch's terms are weighted by its share of the step's predictions / tokens over all ranks (times W,
        since DDP and FSDP average gradients over ranks).
        """
        cfg, W = self.cfg, self.info.world_size
        self.model.train()
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        preds, toks = [num_predictions(b) for b in micro], [b["input_ids"].numel() for b in micro]
        totals = all_reduce_sum(torch.tensor([sum(preds), sum(toks)], device=self.device), self.info).tolist()
        sums, metric_sums = torch.zeros(3, device=self.device), {}
        # costly diagnostics (DSA's dense attention recall) only on the steps that log them
        upcoming = self.step + 1
        collect = upcoming % cfg.log_every == 0 or upcoming == self.max_steps
        for i, batch in enumerate(micro):
            with self._grad_sync(i == len(micro) - 1), autocast_context(self.device, cfg.dtype):
                out = self.model(batch["input_ids"].to(self.device), cu_seqlens=batch["cu_seqlens"].to(self.device),
                                 labels=batch["labels"].to(self.device), collect_metrics=collect,
                                 return_logits=False)  # the chunked LM loss: no [B, T, V] logits in memory
            # a micro-batch with no scored target (all labels -100) has a 0/0 mean and zero gradients: weight 0
            lm_mean = out.loss.float() if preds[i] else out.loss.float().nan_to_num(0.0)
            lm, aux = lm_mean * (preds[i] / max(totals[0], 1)), out.aux_loss.float() * (toks[i] / totals[1])
            (self._objective(lm, aux) * W).backward()
            sums[:2] += torch.stack([lm.detach(), aux.detach()])
            for key, value in out.metrics.items():
                value = torch.as_tensor(value, device=self.device).detach().float()
                metric_sums[key] = metric_sums.get(key, 0.0) + value * (toks[i] / totals[1])
        sums[2] = float(self._interrupted)  # every rank must agree to stop after the same step
        keys = sorted(metric_sums)
        flat = all_reduce_sum(torch.cat([sums] + [metric_sums[k].reshape(1) for k in keys]), self.info).tolist()
        self._stop = flat[2] > 0
        lm_loss, aux_loss = flat[:2]
        loss = self._objective(lm_loss, aux_loss)
        grad_norm = self._clip_gradients() if math.isfinite(loss) else math.nan
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.raw.update_moe_balance(taken=False)  # the skipped step's expert loads must not steer the next one
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.raw.update_moe_balance()  # bias-based MoE balancing; a no-op without such layers
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": grad_norm,
                "metrics": dict(zip(keys, flat[3:]))}

    def _objective(self, lm_loss, aux_loss):
        """What the stage optimises (tensors or floats)."""
        if self.cfg.dsa_stage == "dense_warmup":
            return aux_loss
        # "sparse": indexer KL (+ MoE balance loss); "none": aux holds only the MoE balance loss, if any
        return lm_loss + aux_loss

    def _grad_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if not self.info.distributed:
            return nullcontext()
        if self.cfg.parallel == "fsdp":
            self.raw.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync else self.model.no_sync()

    def _clip_gradients(self) -> float:
        params = [p for p in self.raw.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        self._print("interrupt: saving a checkpoint after this step (press Ctrl-C again to abort now)")

    # ----------------------------------------------------------------------------------------------- events
    def _log(self, record: dict) -> None:
        if self.monitor is not None:
            self.monitor.log(record)

    @contextmanager
    def _inference_model(self):
        """The model as inference runs it: eval mode, DSA stage "none" (top-k selection wherever the context is
        longer than index_topk, no indexer KL). In dense_warmup the training forward is dense; evaluating the
        inference model instead shows what the warm-up buys: the loss with the indexer's own selection."""
        was_training = self.raw.training
        self.raw.eval()
        self.raw.set_dsa_stage("none")
        try:
            yield self.raw
        finally:
            self.raw.set_dsa_stage(self.cfg.dsa_stage)
            self.raw.train(was_training)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean LM loss of the inference-time model on the first `eval_batches` batches of the held-out split
        (every rank computes it)."""
        cfg = self.cfg
        if cfg.eval_batches == 0 or len(self.prepared.val) < cfg.seq_len:
            return None
        loss_sum, count = 0.0, 0
        with self._inference_model() as model:
            for batch in iter_eval_batches(self.prepared.val, cfg.seq_len, cfg.batch_size, self.prepared.eos_id,
                                           max_batches=cfg.eval_batches):
                with autocast_context(self.device, cfg.dtype):
                    out = model(batch["input_ids"].to(self.device), cu_seqlens=batch["cu_seqlens"].to(self.device),
                                labels=batch["labels"].to(self.device), return_logits=False)
                n = num_predictions(batch)
                if n:  # a batch with no scored target has a 0/0 mean
                    loss_sum, count = loss_sum + out.loss.item() * n, count + n
        return loss_sum / max(count, 1)

    @torch.no_grad()
    def sample(self) -> str:
        """Continue `sample_prompt` with the inference-time model (DSA stage "none"); seeded, so comparable."""
        cfg = self.cfg
        ids = self.tokenizer.encode(cfg.sample_prompt, add_special_tokens=False).ids or [self.prepared.eos_id]
        budget = min(cfg.sample_tokens, self.raw.config.max_position_embeddings - len(ids))
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        with self._inference_model() as model, autocast_context(self.device, cfg.dtype):
            out = model.generate(torch.tensor([ids], device=self.device), max_new_tokens=max(budget, 1),
                                 do_sample=True, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                                 generator=generator)
        return self.tokenizer.decode(out[0].tolist())

    def _eval_and_sample(self) -> float | None:
        # forked RNG: an eval must not shift the training randomness, or resumed runs would diverge
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            eval_loss = self.evaluate()
            wanted = self.cfg.sample_tokens > 0 and self.tokenizer is not None
            text = self.sample() if wanted and (self.info.is_main or self.cfg.parallel == "fsdp") else None
        if self.cfg.parallel == "fsdp" and hasattr(self.raw, "reshard"):
            # FSDP2 leaves the root unsharded after a no-grad forward; the optimizer state is keyed by the sharded
            # parameters, so a save right after an eval would not find them
            self.raw.reshard()
        if eval_loss is not None:
            self._log({"step": self.step, "tokens": self.tokens_seen, "eval_loss": eval_loss})
            self._print(f"step {self.step}: eval loss {eval_loss:.4f}")
        if self.monitor is not None:
            if text is not None:
                self._print(f"--- sample at step {self.step} ---\n{text}\n---")
                self.monitor.sample(self.step, text)
            self.monitor.plot()
        self._reset_clock()
        return eval_loss

    def _saved_this_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == ckpt_io.step_dir_name(self.step)

    def _save(self) -> None:
        save_training_state(self)
        if self.info.is_main:
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_last)
        barrier(self.info)
        self.last_checkpoint = self.run_dir / ckpt_io.CHECKPOINTS_SUBDIR / ckpt_io.step_dir_name(self.step)
        self._reset_clock()

    def _diverged(self, result: TrainResult) -> TrainResult:
        last = self.last_checkpoint or ckpt_io.find_latest_valid(self.run_dir, warn=False)
        result.status = "nonfinite"
        result.message = (f"stopping: {self.nonfinite} non-finite losses in a row at step {self.step + 1}. "
                          f"Last good checkpoint: {last or 'none (nothing was saved yet)'}. Lower optim.lr or "
                          "raise optim.warmup_steps, then resume from it with --resume.")
        self._print(result.message)
        return self._finish(result)

    def _finish(self, result: TrainResult) -> TrainResult:
        result.step, result.tokens_seen, result.last_checkpoint = self.step, self.tokens_seen, self.last_checkpoint
        if result.status == "done" and self.info.is_main:
            ref = self.prepared.stats.get("unigram_entropy")
            ev = f"eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "no eval split"
            self._print(f"done: {self.step} steps, {self.tokens_seen:,} tokens, {ev}"
                        + (f" (unigram entropy of the corpus: {ref:.4f})" if ref else "")
                        + f"; checkpoint {self.last_checkpoint}")
        return result

    def _describe(self) -> None:
        cfg, stats = self.cfg, self.prepared.stats
        n_params = self.raw.num_parameters()
        trainable = sum(p.numel() for p in self.raw.parameters() if p.requires_grad)
        self._print(f"run {self.run_dir} | {self.info.world_size} x {self.device} | model "
                    f"{self.raw.config.name or '?'}: {n_params / 1e6:.2f}M params ({trainable / 1e6:.2f}M trained), "
                    f"layers {self.raw.config.layer_types} | dsa_stage {cfg.dsa_stage}")
        entropy = stats.get("unigram_entropy", float("nan"))
        self._print(f"data {cfg.data.source}: {len(self.prepared.train):,} train tokens, vocab "
                    f"{self.prepared.vocab_size}, unigram entropy {entropy:.3f} | {cfg.batch_size} x {cfg.seq_len} "
                    f"tokens x {cfg.grad_accum} accum per step, {self.max_steps} steps (schedule: "
                    f"{cfg.optim.total_steps or cfg.max_steps})")
