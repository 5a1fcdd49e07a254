"""The `hybrid-lm eval` subcommand (registered in `hybrid_lm/cli.py`)."""

from __future__ import annotations

from .runner import EVAL_TASKS, EvalConfig


def add_eval_parser(subparsers) -> None:
    d = EvalConfig()
    p = subparsers.add_parser(
        "eval", help="perplexity vs context, synthetic long-context recall, DSA top-k sweep",
        description="Evaluate RUN_OR_CKPT (a run folder: its newest valid checkpoint; a checkpoint; a saved model). "
                    "Writes OUT/results.json, OUT/cells.jsonl and a PNG per task. Finished cells are kept: "
                    "Ctrl-C and rerun the same command to resume.")
    p.add_argument("path", metavar="RUN_OR_CKPT")
    p.add_argument("--tasks", nargs="+", choices=EVAL_TASKS, default=d.tasks,
                   help="default: all (dsa_topk only runs on models with DSA layers)")
    p.add_argument("--lengths", nargs="+", type=int, default=d.lengths, help="context lengths in tokens")
    p.add_argument("--samples", type=int, default=d.samples, help="recall samples per (task, length)")
    p.add_argument("--mqar-pairs", type=int, default=d.mqar_pairs, help="key-value pairs per MQAR sample")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help="held-out tokens per perplexity length")
    p.add_argument("--topks", nargs="+", type=int, default=d.topks, help="DSA keys per query to sweep")
    p.add_argument("--topk-lengths", nargs="+", type=int, help="lengths of the top-k sweep (default: the longest)")
    p.add_argument("--data", help="held-out data source, e.g. shakespeare (default: the run's training data; naming "
                   "that corpus keeps the run's own held-out split)")
    p.add_argument("--out", help="output folder (default: RUN/eval/step_XXXXXXXX)")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per forward pass")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=d.dtype)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .runner import evaluate, summary_table

    cfg = EvalConfig(tasks=list(args.tasks), lengths=list(args.lengths), samples=args.samples,
                     mqar_pairs=args.mqar_pairs, ppl_tokens=args.ppl_tokens, topks=list(args.topks),
                     topk_lengths=args.topk_lengths, batch_tokens=args.batch_tokens, seed=args.seed,
                     device=args.device, dtype=args.dtype)
    try:  # a bare source: the run's own data settings when it names the corpus the run trained on
        summary = evaluate(args.path, cfg, out_dir=args.out, data=args.data or None)
    except KeyboardInterrupt as e:
        print(f"\n{e}")
        return 130
    print(summary_table(summary))
    return 0
