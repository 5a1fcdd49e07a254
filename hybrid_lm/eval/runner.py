"""`hybrid-lm eval`: perplexity at several context lengths, synthetic recall (MQAR, passkey) from 512 to 16k tokens,
and for DSA models recall as a function of the number of selected keys (`dsa_topk`).

Every (task, length, top-k) cell is written to `OUT/cells.jsonl` when it finishes (`results.py`), so a long
evaluation shows a progress bar, can be stopped with Ctrl-C, and resumes where it stopped. Each run ends by
writing `OUT/results.json` and one PNG per task (`plots.py`). Lengths beyond the model's
`max_position_embeddings` are skipped with a note rather than truncated.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import DataConfig, load_tokenizer, prepare_data
from ..model.io import CHECKPOINTS_SUBDIR, WEIGHTS_NAME, load_model, resolve_model_dir
from ..utils.files import sha256_file
from .plots import plot_tasks
from .results import CellStore
from .scoring import dsa_topk, dsa_topks, perplexity, recall_correct
from .mix import trained_pool_size
from .tasks import POOL_SIZE, Filler, RecallVocab, make_sample

EVAL_TASKS = ("perplexity", "mqar", "passkey", "dsa_topk")
RECALL_TASKS = ("mqar", "passkey")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    samples: int = 16                      # recall samples per cell (MQAR asks every key of each)
    mqar_pairs: int = 16
    pool_size: int | None = None           # MQAR key/value pool; None: the one the model trained on (its recall mix's
                                           # mix-info.json), else tasks.POOL_SIZE
    ppl_tokens: int = 65536                # held-out tokens per perplexity cell, at most
    topks: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 512, 1024])
    topk_lengths: list[int] | None = None  # lengths of the top-k sweep; default: the longest of `lengths`
    batch_tokens: int = 16384              # tokens per forward pass
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"                    # fp32 | bf16 (autocast)

    def validate(self, where: str = "eval") -> None:
        unknown = sorted(set(self.tasks) - set(EVAL_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"{where}.tasks = {self.tasks}: choose from {list(EVAL_TASKS)}")
        for name in ("lengths", "topks"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{where}.{name} = {values}: need a non-empty list of positive integers")
        if "perplexity" in self.tasks and min(self.lengths) < 2:
            raise ValueError(f"{where}.lengths = {self.lengths}: perplexity needs windows of at least 2 tokens (one "
                             "to predict from, one to score)")
        if self.topk_lengths is not None and any(v < 1 for v in self.topk_lengths):
            raise ValueError(f"{where}.topk_lengths = {self.topk_lengths}: need positive integers")
        for name in ("samples", "mqar_pairs", "ppl_tokens", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} = {getattr(self, name)}: must be >= 1")
        if self.pool_size is not None and self.pool_size < 8:
            raise ValueError(f"{where}.pool_size = {self.pool_size}: must be >= 8 (or null: the training mix's)")
        if self.pool_size is not None and "mqar" in self.tasks and self.mqar_pairs > self.pool_size:
            raise ValueError(f"{where}.mqar_pairs = {self.mqar_pairs} exceeds pool_size = {self.pool_size}: MQAR "
                             "needs a distinct key id for every pair")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"{where}.dtype = {self.dtype!r}: choose fp32 or bf16")


def default_out_dir(model_dir: Path) -> Path:
    """RUN/eval/step_XXXXXXXX for a run's checkpoint, else a sibling `<folder>-eval` (never inside a checkpoint,
    whose manifest must stay exact)."""
    if model_dir.parent.name == CHECKPOINTS_SUBDIR:
        return model_dir.parent.parent / "eval" / model_dir.name
    return model_dir.with_name(model_dir.name + "-eval")


def _label(model_dir: Path) -> str:
    """`run/step_00000800` for a run's checkpoint, else the folder's name."""
    if model_dir.parent.name == CHECKPOINTS_SUBDIR:
        return f"{model_dir.parent.parent.name}/{model_dir.name}"
    return model_dir.name


def _data_config(model_dir: Path, data: DataConfig | str | None) -> tuple[DataConfig, int | None, str | None]:
    """The held-out data: `data` if given, else the run's own (from the checkpoint's train_config.yaml); with the
    training length and the training data's source (None without a train_config.yaml). A bare source (`--data
    SOURCE`) naming the corpus the run trained on takes the run's data settings, so that its held-out split (the
    `val_fraction` and `seed` that chose it) holds no document the model trained on; another source takes defaults."""
    saved = model_dir / "train_config.yaml"
    seq_len = trained_on = train_data = None
    if saved.is_file():
        from ..training.config import load_train_config

        train_cfg = load_train_config(saved)
        seq_len, trained_on, train_data = train_cfg.seq_len, train_cfg.data.source, train_cfg.data
    if isinstance(data, str):
        data = train_data if train_data is not None and _same_source(data, train_data.source) else DataConfig(data)
    data = data or train_data
    if data is None:
        raise ValueError(f"{model_dir} has no train_config.yaml to name its training data; pass --data SOURCE "
                         "(e.g. shakespeare) for the held-out text")
    if data.tokenizer is None and (model_dir / "tokenizer.json").is_file():
        data.tokenizer = str(model_dir / "tokenizer.json")
    return data, seq_len, trained_on


def _same_source(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def plan_cells(cfg: EvalConfig, model) -> tuple[list[dict], list[str]]:
    """The cells to compute, in order, and notes on what was left out."""
    cells, notes = [], []
    base = {"seed": cfg.seed}
    if cfg.dtype != "fp32":  # bf16 autocast changes every number; fp32 is left out so cells cached before stay valid
        base["dtype"] = cfg.dtype
    if "perplexity" in cfg.tasks:
        cells += [{"task": "perplexity", "length": L, "topk": None, "ppl_tokens": cfg.ppl_tokens, **base}
                  for L in cfg.lengths]
    recall = [t for t in RECALL_TASKS if t in cfg.tasks]
    mqar = {"mqar_pairs": cfg.mqar_pairs}
    if cfg.pool_size not in (None, POOL_SIZE):  # the default pool is left out: cells cached before it stay valid
        mqar["pool_size"] = cfg.pool_size
    for task in recall:
        extra = mqar if task == "mqar" else {}
        cells += [{"task": task, "length": L, "topk": None, "samples": cfg.samples, **extra, **base}
                  for L in cfg.lengths]
    if "dsa_topk" in cfg.tasks:
        if not model._dsa_layers():
            notes.append("dsa_topk: skipped, the model has no DSA layers")
        elif not recall:
            notes.append("dsa_topk: skipped, it sweeps the recall tasks; add mqar and/or passkey to the tasks")
        else:
            for L in cfg.topk_lengths or [max(cfg.lengths)]:
                for task in recall:
                    extra = mqar if task == "mqar" else {}
                    cells += [{"task": task, "length": L, "topk": k, "samples": cfg.samples, **extra, **base}
                              for k in cfg.topks]
    return cells, notes


class _Context:
    """What computing a cell needs, loaded once."""

    def __init__(self, model, cfg: EvalConfig, prepared, tokenizer):
        self.model, self.cfg = model, cfg
        self.filler = Filler(prepared.val, prepared.eos_id)
        self.vocab = None
        if any(t in cfg.tasks for t in RECALL_TASKS):
            specials = [prepared.eos_id] + ([prepared.bos_id] if prepared.bos_id is not None else [])
            self.vocab = RecallVocab.from_tokenizer(tokenizer, prepared.vocab_size, specials,
                                                    cfg.pool_size or POOL_SIZE)
        device = torch.device(cfg.device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                         else nullcontext())

    def compute(self, cell: dict) -> dict:
        cfg, L = self.cfg, cell["length"]
        limit = self.model.config.max_position_embeddings
        if L > limit:
            return {"skipped": f"length {L} exceeds max_position_embeddings = {limit}"}
        start = time.perf_counter()
        with self.autocast:
            if cell["task"] == "perplexity":
                if len(self.filler.tokens) < L:
                    return {"skipped": f"the held-out split has only {len(self.filler.tokens)} tokens"}
                result = perplexity(self.model, self.filler.tokens, L, cfg.ppl_tokens, cfg.device, cfg.batch_tokens)
            else:
                rng = np.random.default_rng([cfg.seed, RECALL_TASKS.index(cell["task"]), L])
                options = {"num_pairs": cell["mqar_pairs"]} if cell["task"] == "mqar" else {}
                samples = [make_sample(cell["task"], rng, L, self.vocab, self.filler, **options)
                           for _ in range(cell["samples"])]
                with dsa_topk(self.model, cell["topk"]):
                    right, asked = recall_correct(self.model, samples, cfg.device, cfg.batch_tokens)
                result = {"accuracy": right / asked, "correct": right, "asked": asked}
        return {**result, "seconds": round(time.perf_counter() - start, 3)}


def evaluate(path: str | Path, cfg: EvalConfig | None = None, out_dir: str | Path | None = None,
             data: DataConfig | str | None = None, progress: bool = True) -> dict:
    """Evaluate a run / checkpoint / saved model; returns the summary also written to OUT/results.json. `data`: the
    held-out text, a `DataConfig` or a bare source (see `_data_config`); None: the run's own."""
    cfg = cfg or EvalConfig()
    cfg.validate()
    model_dir = resolve_model_dir(path)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_dir)
    data_cfg, seq_len, trained_on = _data_config(model_dir, data)
    if cfg.pool_size is None:  # the MQAR pool the model trained on, so that every key and value id is a known one
        trained = trained_pool_size(trained_on) if trained_on is not None else None
        cfg = replace(cfg, pool_size=trained or trained_pool_size(data_cfg.source) or POOL_SIZE)
        cfg.validate()
    prepared = prepare_data(data_cfg)
    tok_path = model_dir / "tokenizer.json" if (model_dir / "tokenizer.json").is_file() else prepared.tokenizer_path
    if tok_path is None:
        raise ValueError(f"no tokenizer for {model_dir}: the recall tasks need one; set data.tokenizer")
    tokenizer = load_tokenizer(tok_path)[0]
    model = load_model(model_dir, device=cfg.device).eval()
    model.set_dsa_stage("none")
    if prepared.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's vocabulary ({prepared.vocab_size}) is larger than the model's "
                         f"({model.config.vocab_size}); evaluate with the tokenizer the model was trained with")
    cells, notes = plan_cells(cfg, model)
    store = CellStore(out / "cells.jsonl")
    ctx = _Context(model, cfg, prepared, tokenizer)
    # a cell's numbers depend on the weights and on the held-out text (perplexity, recall filler): both are in its key
    held_out = hashlib.sha256(np.ascontiguousarray(ctx.filler.tokens).tobytes()).hexdigest()[:16]
    ident = {"weights": sha256_file(model_dir / WEIGHTS_NAME)[:16], "held_out": held_out}
    pending = [c for c in cells if {**c, **ident} not in store]
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc=f"eval {_label(model_dir)}",
               disable=not progress, dynamic_ncols=True)
    try:
        for cell in pending:
            bar.set_postfix_str(f"{cell['task']} T={cell['length']}" + (f" k={cell['topk']}" if cell["topk"] else ""))
            store.add({**cell, **ident}, ctx.compute(cell))
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(f"evaluation interrupted; finished cells are kept in {store.path}: rerun the same "
                                "command to resume") from None
    bar.close()
    records = [store.get({**c, **ident}) for c in cells]
    summary = _summary(model, model_dir, cfg, data_cfg, seq_len, notes, records)
    write_outputs(out, summary)
    return summary


def _summary(model, model_dir, cfg, data_cfg, seq_len, notes, records) -> dict:
    return {
        "model": {"path": str(model_dir.resolve()), "name": model.config.name, "layer_types": model.config.layer_types,
                  "mixer_types": [model.config.mixer_type(t) for t in model.config.layer_types],  # aliases resolved
                  "parameters": model.num_parameters(), "max_position_embeddings": model.config.max_position_embeddings,
                  "dsa_topk": dsa_topks(model) or None, "trained_seq_len": seq_len},
        "data": data_cfg.source, "settings": asdict(cfg), "notes": notes,
        "cells": [{k: v for k, v in r["cell"].items() if k in ("task", "length", "topk")}
                  | {k: v for k, v in r.items() if k != "cell"} for r in records],
    }


def write_outputs(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    name = summary["model"]["name"] or Path(summary["model"]["path"]).name
    plot_tasks({name: summary}, out)


def summary_table(summary: dict) -> str:
    """Plain-text table of a summary: one row per task (and top-k), one column per length."""
    lengths = sorted({c["length"] for c in summary["cells"]})
    rows = [["task"] + [str(L) for L in lengths]]
    keys = dict.fromkeys((c["task"], c["topk"]) for c in summary["cells"])
    for task, topk in keys:
        row = [task + (f" k={topk}" if topk is not None else "")]
        for L in lengths:
            cell = next((c for c in summary["cells"] if (c["task"], c["topk"], c["length"]) == (task, topk, L)), None)
            if cell is None:
                row.append("")
            elif "skipped" in cell:
                row.append("n/a")
            else:
                row.append(f"{cell['loss']:.3f}" if task == "perplexity" else f"{cell['accuracy']:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)
    notes = summary["notes"] + sorted({f"n/a: {c['skipped']}" for c in summary["cells"] if "skipped" in c})
    return text + "".join(f"\nnote: {n}" for n in notes) + "\n(perplexity rows: held-out loss in nats/token)"
