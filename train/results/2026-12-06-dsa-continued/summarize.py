"""Tables and plot of the dense -> DSA path (train/README.md) from its runs.

    python train/results/2026-12-06-dsa-continued/summarize.py runs/dense-small runs/dense-small-dsa \
        runs/dsa-warmup runs/dsa-sparse

Copies each run's metrics.jsonl and samples.txt here as <run>.metrics.jsonl / <run>.samples.txt, draws dsa.png
(indexer KL and attention recall of every layer, warm-up then sparse) and prints the markdown tables used in
README.md. In the training tables "start" is the first logged step of a run and "end" the mean of its last five
logged steps (single-batch KL and recall vary by about +-0.02 from batch to batch). The held-out table measures
the converted model, the warm-up's and the sparse run's final models on the same held-out rows, with the dense
KL (over all keys, comparable between stages) and the oracle recall: the dense mass on the best possible top-k
keys (the k largest head-averaged probabilities), the ceiling of any indexer's recall.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

import hybrid_lm
from hybrid_lm import ops
from hybrid_lm.data import iter_eval_batches, prepare_data
from hybrid_lm.training import load_train_config
from hybrid_lm.training.monitor import dsa_series, plot_dsa, read_metrics

HERE = Path(__file__).resolve().parent


def _train_lines(records):
    return [r for r in records if "lm_loss" in r]


def _evals(records):
    return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def stage_row(name: str, records: list[dict]) -> str:
    train = _train_lines(records)
    lm0, lm1, steps = _start_end([(r["step"], r["lm_loss"]) for r in train])
    ev = " -> ".join(f"{v:.3f} ({s})" for s, v in _evals(records))
    tps = sum(r["tokens_per_s"] for r in train) / len(train)
    last = train[-1]
    return f"| {name} | {last['step']} | {last['tokens']:,} | {lm0:.3f} -> {lm1:.3f} ({steps}) | {ev} | {tps:,.0f} |"


def _start_end(points: list[tuple[int, float]], last: int = 5) -> tuple[float, float, str]:
    tail = points[-last:]
    return points[0][1], sum(v for _, v in tail) / len(tail), f"{points[0][0]} -> {tail[0][0]}-{tail[-1][0]}"


def layer_rows(name: str, records: list[dict]) -> list[str]:
    rows = []
    for layer, data in dsa_series(records).items():
        k0, k1, steps = _start_end(data["kl"])
        r0, r1, _ = _start_end(data["recall"])
        rows.append(f"| {name} | {layer} | {k0:.3f} -> {k1:.3f} | {r0:.3f} -> {r1:.3f} | {steps} |")
    return rows


def _oracle_recall(q, k, topk: int, scale: float, cu_seqlens) -> torch.Tensor:
    """Mean over queries of the head-averaged dense attention mass on its own top-k keys. q [1,T,H,D], k [1,T,Hk,D]."""
    T = q.shape[1]
    doc = torch.bucketize(torch.arange(T), cu_seqlens[1:].long(), right=True)
    t = torch.arange(T)
    visible = (t[None, :] <= t[:, None]) & (doc[None, :] == doc[:, None])  # [T, T] causal, same document
    kk = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), kk.float()) * scale
    p = s.masked_fill(~visible, float("-inf")).softmax(-1).mean(1)  # [1, T, T]
    return p.topk(min(topk, T), dim=-1).values.sum() / T


@torch.no_grad()
def heldout_dsa(model_dir: Path, rows: int = 4, batches: int = 4) -> dict[str, dict[str, float]]:
    """Dense KL, recall and oracle recall of every DSA layer, averaged over `batches` held-out batches."""
    model = hybrid_lm.load_model(model_dir).float().eval()
    model.set_dsa_stage("dense_warmup")  # dense forward; reports the dense KL and the recall of its top-k
    cfg = load_train_config(HERE.parents[1] / "configs" / "dsa-warmup.yaml")
    cfg.data.tokenizer = str(hybrid_lm.model.resolve_model_dir(model_dir) / "tokenizer.json")
    prepared = prepare_data(cfg.data)
    oracle: list[torch.Tensor] = []
    recall = ops.attention_recall

    def with_oracle(q, k, indices, *, scale=None, cu_seqlens=None, **kw):  # the layers call it in order
        oracle.append(_oracle_recall(q, k, indices.shape[-1], scale, cu_seqlens))
        return recall(q, k, indices, scale=scale, cu_seqlens=cu_seqlens, **kw)

    sums: dict[str, float] = {}
    ops.attention_recall = with_oracle
    try:
        for batch in iter_eval_batches(prepared.val, cfg.seq_len, rows, prepared.eos_id, max_batches=batches):
            out = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
            for key, value in out.metrics.items():
                if key.startswith("dsa/"):
                    sums[key] = sums.get(key, 0.0) + float(value) / batches
            for i, value in enumerate(oracle):
                key = f"dsa/layer{i}/oracle_recall"
                sums[key] = sums.get(key, 0.0) + float(value) / batches
            oracle.clear()
    finally:
        ops.attention_recall = recall
    table: dict[str, dict[str, float]] = {}
    for key, value in sums.items():
        _, layer, metric = key.split("/")
        table.setdefault(layer, {})[metric] = value
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense")
    p.add_argument("converted")
    p.add_argument("warmup")
    p.add_argument("sparse")
    args = p.parse_args()
    torch.manual_seed(0)
    runs = {"dense-small": Path(args.dense), "dsa-warmup": Path(args.warmup), "dsa-sparse": Path(args.sparse)}
    records = {}
    for name, run in runs.items():
        records[name] = read_metrics(run / "metrics.jsonl")
        shutil.copyfile(run / "metrics.jsonl", HERE / f"{name}.metrics.jsonl")
        if (run / "samples.txt").is_file():
            shutil.copyfile(run / "samples.txt", HERE / f"{name}.samples.txt")
    plot_dsa([("warm-up", records["dsa-warmup"]), ("sparse", records["dsa-sparse"])], HERE / "dsa.png",
             "dense -> DSA on Shakespeare: lightning indexers, top-32 of 256")
    print("| stage | steps | tokens | train LM loss (steps) | eval loss (step) | mean tok/s |")
    print("|---|---|---|---|---|---|")
    for name, recs in records.items():
        print(stage_row(name, recs))
    print()
    print("| stage | layer | indexer KL | attention recall | steps |")
    print("|---|---|---|---|---|")
    for name in ("dsa-warmup", "dsa-sparse"):
        print("\n".join(layer_rows(name, records[name])))
    print()
    models = {"converted": Path(args.converted), "after warm-up": runs["dsa-warmup"],
              "after sparse": runs["dsa-sparse"]}
    measured = {name: heldout_dsa(path) for name, path in models.items()}
    print("| layer | " + " | ".join(f"{m} KL / recall / oracle" for m in models) + " |")
    print("|---|" + "---|" * len(models))
    for layer in measured["converted"]:
        cells = [f"{t[layer]['kl']:.3f} / {t[layer]['recall']:.3f} / {t[layer]['oracle_recall']:.3f}"
                 for t in measured.values()]
        print(f"| {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
