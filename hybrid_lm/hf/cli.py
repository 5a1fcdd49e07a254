"""The `hybrid-lm export` and `hybrid-lm import` subcommands (registered in `hybrid_lm/cli.py`).

    hybrid-lm export RUN_OR_CKPT OUT_DIR [--max-shard-size SIZE] [--dtype auto|float32|bfloat16|float16]
                     [--format hybrid_lm|deepseek_v32]
    hybrid-lm import HF_DIR OUT
"""

from __future__ import annotations

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a Hugging Face transformers folder (loads with trust_remote_code=True)",
        description="Export a model to the transformers format: config.json, configuration/modeling code that "
                    "needs only torch + transformers, safetensors weights, tokenizer and generation config. "
                    "RUN_OR_CKPT is a run folder (its newest valid checkpoint), a checkpoint or a saved model.")
    p.add_argument("path", metavar="RUN_OR_CKPT")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split the weights into shards of at most SIZE (e.g. 5GB, 500MB, 2GiB; default 5GB)")
    p.add_argument("--dtype", default="auto", help=f"weight dtype: {', '.join(DTYPE_CHOICES)} (default: auto, "
                                                   f"the checkpoint's own)")
    p.add_argument("--format", default="hybrid_lm", choices=("hybrid_lm", "deepseek_v32"),
                   help="hybrid_lm (remote code, any model; default) or deepseek_v32 (transformers' own "
                        "DeepseekV32ForCausalLM, for models whose config maps; one safetensors file)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_hf, parse_dtype

    if args.format == "deepseek_v32":
        from ..convert_deepseek_v32 import export_deepseek_v32

        out = export_deepseek_v32(args.path, args.out_dir, dtype=parse_dtype(args.dtype))
        print(f"exported to {out}; load it with:\n  DeepseekV32ForCausalLM.from_pretrained({str(out)!r})")
        return 0

    out = export_hf(args.path, args.out_dir, max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"exported to {out}; load it with:\n"
          f"  AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def add_import_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="turn a folder written by `hybrid-lm export` back into a native model folder",
        description="Import an exported transformers folder as a native model folder (model.safetensors + "
                    "config.yaml) that `hybrid-lm generate` and `hybrid_lm.load_model` read; tensors are copied "
                    "bit-exactly.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out", metavar="OUT")
    p.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from .export import import_hf

    print(f"imported to {import_hf(args.hf_dir, args.out)}")
    return 0
