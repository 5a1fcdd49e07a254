"""The `hybrid-lm` command line. Each subcommand is one `add_<name>_parser(subparsers)` + `cmd_<name>(args)` pair
registered in `SUBCOMMANDS`; heavy imports happen inside the commands so `hybrid-lm --help` stays fast.

    hybrid-lm zoo [--context T]
    hybrid-lm train [CONFIG.yaml] [--out DIR] [--max-steps N] [--resume] [--set key=value ...]
    hybrid-lm generate RUN_OR_CKPT --prompt "..." [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    hybrid-lm convert SRC OUT [--dsa-layers all|none|0,3,5] [--index-topk K] [--force]
    hybrid-lm export-qwen3-next RUN_OR_CKPT OUT [--force]
    hybrid-lm eval RUN_OR_CKPT [--tasks perplexity mqar passkey dsa_topk] [--lengths 512 ... 16384] [--out DIR]

Multi-GPU / multi-process: `torchrun --nproc_per_node N -m hybrid_lm.cli train ...` (or `train/pretrain.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybrid_lm.eval.cli import add_eval_parser
from hybrid_lm.hf.cli import add_export_parser, add_import_parser


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain or continue training a model from a training YAML",
                              description="Train a model. Without CONFIG: the tiny debug hybrid on the default "
                                          "corpus (train/configs/default.yaml).")
    p.add_argument("config", nargs="?", help="training YAML (default: train/configs/default.yaml; with --resume "
                                             "and no CONFIG, the config saved in the run's checkpoint)")
    p.add_argument("--out", help="run folder (default: runs/<CONFIG name>)")
    p.add_argument("--max-steps", type=int, help="stop after this step (default: the config's max_steps); the LR "
                                                 "schedule keeps the config's length, so a shorter run can be "
                                                 "resumed later with a larger --max-steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of the run "
                                                         "folder (falls back to older ones if it is damaged)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config value (YAML-parsed), e.g. --set optim.lr=1e-3 --set data.vocab_size=2048")
    p.set_defaults(func=cmd_train)


def _train_config(args):
    from hybrid_lm.training import checkpoint as ckpt_io
    from hybrid_lm.training.config import TrainConfig, apply_overrides, default_config_path, load_train_config

    path = args.config
    if path is None and args.resume:
        # the run folder: --out, else a `--set out_dir=...` (the last one wins, as when it is applied), else the
        # default config's; otherwise the default config, not the run's, would continue that run
        set_out = [item for item in args.set if item.partition("=")[0].strip() == "out_dir"]
        out = args.out or (apply_overrides(TrainConfig(model="-"), set_out).out_dir if set_out else None)
        run_dir = Path(out) if out else Path(load_train_config(default_config_path()).out_dir)
        latest = ckpt_io.find_latest_valid(run_dir)
        if latest is not None and (latest / "train_config.yaml").is_file():
            path = latest / "train_config.yaml"
            args.out = str(run_dir)
    cfg = load_train_config(path, args.set)
    if args.out is not None:
        cfg.out_dir = args.out
    return cfg


def cmd_train(args) -> int:
    from hybrid_lm.training import train

    result = train(_train_config(args), resume=args.resume, max_steps=args.max_steps)
    return 1 if result.status == "nonfinite" else 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model",
                              description="Print a continuation of PROMPT. PATH is a run folder (its newest valid "
                                          "checkpoint), a checkpoint folder or a saved model folder.")
    p.add_argument("path", metavar="RUN_OR_CKPT")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the one saved with the model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    import hybrid_lm
    from hybrid_lm.data.tokenizer import load_tokenizer

    model_dir = hybrid_lm.model.resolve_model_dir(args.path)
    tokenizer_spec = args.tokenizer or model_dir
    if args.tokenizer is None and not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json; pass --tokenizer PATH (the run's tokenizer)")
    tokenizer, info = load_tokenizer(tokenizer_spec)
    model = hybrid_lm.load_model(model_dir, device=args.device).eval()
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids if args.prompt else []
    prompt = torch.tensor([ids or [info.eos_id]], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=info.eos_id, generator=generator)
    new = out[0, prompt.shape[1]:].tolist()
    print(args.prompt + tokenizer.decode([t for t in new if t != info.eos_id]))
    return 0


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="turn a dense checkpoint (ours or Hugging Face Llama/Qwen2/Qwen3) "
                                              "into a model with DSA layers",
                              description="Copy SRC (a run, checkpoint or saved model of ours, or a Hugging Face "
                                          "Llama/Qwen2/Qwen3 folder) to OUT with the chosen attention layers turned "
                                          "into DSA layers: attention weights copied, indexers freshly initialised. "
                                          "Then train with init_from: OUT, dsa_stage dense_warmup, then sparse.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dsa-layers", default="all", help="'all' (every full attention layer), 'none' (plain import) "
                                                       "or layer indices such as 0,3,5 (default: all)")
    p.add_argument("--index-heads", type=int, default=4, help="indexer heads (default: 4)")
    p.add_argument("--index-head-dim", type=int, default=64, help="indexer head dim (default: 64)")
    p.add_argument("--index-topk", type=int, default=2048, help="keys kept per query (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the indexer initialisation")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from hybrid_lm.convert import convert_checkpoint, describe_conversion

    out = convert_checkpoint(args.src, args.out, dsa_layers=args.dsa_layers, index_n_heads=args.index_heads,
                             index_head_dim=args.index_head_dim, index_topk=args.index_topk, seed=args.seed,
                             force=args.force)
    print(describe_conversion(out))
    return 0


def add_zoo_parser(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="list the model configs with parameters, pattern and FLOPs per token")
    p.add_argument("--context", type=int, default=4096, help="context length for the FLOPs estimate (default 4096)")
    p.set_defaults(func=cmd_zoo)


def cmd_zoo(args) -> int:
    from hybrid_lm.zoo import format_zoo, zoo_rows

    print(format_zoo(zoo_rows(args.context), args.context))
    return 0


def add_export_qwen3_next_parser(subparsers) -> None:
    p = subparsers.add_parser("export-qwen3-next", help="write a model as a transformers Qwen3-Next folder",
                              description="Write PATH (a run, checkpoint or saved model whose layers are Gated "
                                          "DeltaNet / gated attention with a Qwen3-Next-style MoE or dense MLP) to "
                                          "OUT as config.json + model.safetensors for Qwen3NextForCausalLM.")
    p.add_argument("path", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=cmd_export_qwen3_next)


def cmd_export_qwen3_next(args) -> int:
    from hybrid_lm.convert_qwen3_next import export_qwen3_next

    print(f"wrote {export_qwen3_next(args.path, args.out, force=args.force).resolve()}")
    return 0


SUBCOMMANDS = [add_zoo_parser, add_train_parser, add_generate_parser, add_convert_parser, add_export_parser, add_import_parser,
               add_export_qwen3_next_parser, add_eval_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-lm", description="Hybrid LM zoo: DSA, attention and Gated "
                                                                   "DeltaNet layers mixed by YAML.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # user errors: a message to act on, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
