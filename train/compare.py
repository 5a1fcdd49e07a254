"""The hybrid comparison recipe in one command (see `hybrid_lm/eval/compare.py` and train/README.md):

    python train/compare.py train/configs/compare/cpu.yaml --threads 1   # tiny CPU version, ~30 min on 2 cores
    python train/compare.py train/configs/compare/gpu.yaml               # one GPU, ~8 min on an H100 (estimate)

Trains every run of the config for the same tokens on the text corpus mixed with recall data, evaluates each
(perplexity vs context, MQAR and passkey recall vs length, DSA top-k sweep) and writes report.md with plots.
Every stage resumes: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from hybrid_lm.eval.compare import load_compare_config, prepare_mix, run_comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="comparison YAML, e.g. train/configs/compare/cpu.yaml")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="train/evaluate only these runs")
    parser.add_argument("--no-train", action="store_true", help="evaluate and report the runs as they are")
    parser.add_argument("--out", help="output folder (default: the config's out_dir)")
    parser.add_argument("--report-dir", help="report folder (default: the config's report_dir or OUT/report)")
    parser.add_argument("--note", help="a paragraph for the top of the report (e.g. what else ran on the machine)")
    parser.add_argument("--prepare-data", action="store_true",
                        help="only build the mixed corpus (OUT/data), e.g. to copy it to a machine without the corpus")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (1 is fastest on a busy, shared CPU)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = load_compare_config(args.config)
        if args.out:
            cfg.out_dir = args.out
        if args.report_dir:
            cfg.report_dir = args.report_dir
        if args.note:
            cfg.note = args.note
        if args.prepare_data:
            mix = prepare_mix(cfg)
            size = sum(f.stat().st_size for f in mix.source.parent.rglob("*") if f.is_file())
            print(f"mixed corpus: {mix.source.parent} ({size / 2**20:.1f} MiB; tokens {mix.info['tokens']})")
            return 0
        args_given = list(argv if argv is not None else sys.argv[1:])
        if args.note and "--note" in args_given:  # the note is printed in the report already
            i = args_given.index("--note")
            args_given[i + 1] = "..."
        command = "python train/compare.py " + " ".join(shlex.quote(a) for a in args_given)
        path = run_comparison(cfg, only=args.only, train=not args.no_train, command=command)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that diverged: the message names its last good checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: {e or 'rerun the same command to resume'}", file=sys.stderr)
        return 130
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
