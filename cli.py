"""`seekv4` console script. Subcommands are thin wrappers over library functions."""
from __future__ import annotations

import argparse
import os
import sys
import time

PRESET_OR_PATH = "a preset name (see `seekv4 presets`) or a folder saved with save_pretrained"


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def load_config(ref: str):
    from transformers import AutoConfig

    from .configuration import SeekV4Config, list_presets
    from .convert import CONFIG_CONVERTERS

    if os.path.isdir(ref):
        config = AutoConfig.from_pretrained(ref)
        if config.model_type == "seekv4":
            return config
        if config.model_type in CONFIG_CONVERTERS:
            return CONFIG_CONVERTERS[config.model_type](config)
        raise CLIError(f"{ref}: model_type {config.model_type!r} is not a seekv4 model and cannot be converted "
                       f"(convertible: {sorted(CONFIG_CONVERTERS)}).")
    if ref in list_presets():
        return SeekV4Config.from_preset(ref)
    if os.path.exists(ref):
        raise CLIError(f"{ref} is a file; expected {PRESET_OR_PATH}.")
    raise CLIError(f"{ref!r} is neither a preset nor an existing folder; expected {PRESET_OR_PATH}. "
                   f"Presets: {', '.join(list_presets())}.")


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def cmd_info(args) -> int:
    from .modeling.attention_kinds import attention_kinds, figure
    from .modeling.fp8 import fp8_relative_error
    from .modeling.summary import kv_cache_bytes_per_token, kv_cache_elements_per_token, parameter_counts, schedule_runs

    config = load_config(args.model)
    if args.kv_cache_dtype:
        try:
            config = type(config)(**{**config.to_dict(), "kv_cache_dtype": args.kv_cache_dtype})
        except ValueError as err:
            raise CLIError(f"--kv-cache-dtype {args.kv_cache_dtype} does not fit {args.model}: {err}") from err
    counts = parameter_counts(config)
    kv = kv_cache_elements_per_token(config)
    kinds = attention_kinds(config)
    print(f"model: {args.model}  ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, context {config.max_position_embeddings})")
    print(f"parameters: total {counts['total']:,} ({_human(counts['total'])}); active per token "
          f"{counts['active_per_token']:,} ({_human(counts['active_per_token'])})")
    print(f"KV cache per token: {sum(kv):,} elements = {2 * sum(kv):,} bytes in bf16 "
          f"({4 * sum(kv):,} in float32)")
    if config.kv_cache_dtype == "fp8_e4m3":
        block = config.kv_cache_fp8_block
        widths = sorted({kind.fp8_dims(config) for kind in kinds} - {0})
        errors = ", ".join(f"{fp8_relative_error(w, block):.2%} relative RMS on unit-RMS {w}-dim rows" for w in widths)
        print(f"  with kv_cache_dtype=fp8_e4m3: {figure(sum(kv_cache_bytes_per_token(config, 2)))} bytes per token "
              f"vs {figure(2 * sum(kv))} in bf16; measured fp8 round-trip error {errors}")
    for kind in dict.fromkeys(kinds):  # each kind present, in schedule order
        print(f"  {kind.name}: {kind.describe(config)}")
    print("layer schedule:")
    print(f"  {'layers':<10} {'attention':<12} {'ffn':<9} {'kv elements/token/layer':>24}")
    for first, last, attention, ffn in schedule_runs(config):
        span = f"{first}" if first == last else f"{first}-{last}"
        print(f"  {span:<10} {attention:<12} {ffn:<9} {kv[first]:>24,}")
    return 0


def cmd_presets(args) -> int:
    from .configuration import list_presets

    print("\n".join(list_presets()))
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import SeekV4ForCausalLM
    from .tokenization import ByteTokenizer

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if os.path.isdir(args.model):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            tokenizer = None
    else:
        model = SeekV4ForCausalLM(load_config(args.model)).to(dtype)
        tokenizer = None
        print(f"[{args.model}: randomly initialised weights, byte-level tokens]", file=sys.stderr)
    model.eval()
    config = model.config
    if tokenizer is None:
        special = {i for i in (config.pad_token_id, config.bos_token_id, config.eos_token_id) if isinstance(i, int)}
        tokenizer = ByteTokenizer(config.vocab_size, special)
        ids = tokenizer.encode(args.prompt)
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    if not ids:
        raise CLIError("--prompt is empty after tokenisation; give at least one character.")
    input_ids = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature if args.do_sample else None, top_p=None, top_k=None,
                             pad_token_id=config.pad_token_id)
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1]:].tolist()
    print(args.prompt + tokenizer.decode(new))
    print(f"[{len(new)} new tokens in {seconds:.2f}s, {len(new) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_build_benchmarks(args) -> int:
    from .eval.commands import build_benchmarks
    from .eval.prompts import EvalError

    try:
        return build_benchmarks(args.out, args.check)
    except EvalError as err:
        raise CLIError(str(err)) from err


def cmd_eval(args) -> int:
    from .eval.commands import eval_command
    from .eval.prompts import EvalError

    try:
        return eval_command(args.model, args.tasks, args.buckets, args.output, args.limit, args.dtype, args.overwrite)
    except EvalError as err:
        raise CLIError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seekv4", description="DeepSeek-V4-family sparse models on transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameters, active parameters, KV-cache bytes and layer schedule")
    p.add_argument("model", help=PRESET_OR_PATH)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], help="report sizes for this cache storage")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("presets", help="list the preset names")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("generate", help="generate a continuation of a prompt")
    p.add_argument("--model", required=True, help=PRESET_OR_PATH + " (any causal LM folder works)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and preset weight initialisation")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("build-benchmarks", help="rebuild the long-context code benchmarks (deterministic)")
    p.add_argument("--out", help="output folder (default: replace the shipped seekv4/eval/data)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the rebuild matches the shipped sha256")
    p.set_defaults(func=cmd_build_benchmarks)
    p = sub.add_parser("eval", help="long-context code benchmarks for any causal LM")
    p.add_argument("--model", required=True, help="a model folder, a .gguf file, or a seekv4 preset (random)")
    p.add_argument("--tasks", nargs="+", default=["repo_nextline", "file_nextline", "code_needle"],
                   help="repo_nextline file_nextline code_needle api_recall code_perplexity (space or comma "
                        "separated; default: the first three)")
    p.add_argument("--buckets", nargs="+", default=["2k", "4k"], help="context buckets: 2k 4k 8k ... 128k")
    p.add_argument("--output", required=True, help="results folder; rerunning into it resumes (same model and "
                                                    "benchmark data only, checked by content)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the samples and results already in --output and start over")
    p.add_argument("--limit", type=int, help="at most this many examples per task and bucket")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        build_parser().error("--max-new-tokens must be >= 1")
    try:
        return args.func(args)
    except CLIError as err:
        print(f"seekv4 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
