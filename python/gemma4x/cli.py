"""The ``gemma4x`` command line: ``generate`` from a checkpoint, or a self-contained ``demo``.

    gemma4x generate --model DIR --prompt "Hello" --max-new-tokens 32
    gemma4x generate --model DIR --token-ids 2,651,1234 --temperature 0.8 --top-p 0.95 --seed 1
    gemma4x chat --model DIR --message "Hi" [--system "Be brief."] [--enable-thinking]
    gemma4x demo                       # tiny random MoE checkpoint, written, loaded, run

Throughput is measured, not estimated: after one untimed warm-up, a 1-token generate times
the prefill, the full generate times prefill + decode, and decode is the difference (the
runtime synchronises the device on every step, so wall-clock times are exact).

``generate`` prints the continuation (text for --prompt, ids for --token-ids) on stdout and
the load time and throughput on stderr, so its output pipes cleanly. --prompt encodes the
raw text with a leading BOS; no chat template is applied. ``chat`` renders one user message
(and an optional system message) with the checkpoint's chat template, prints the answer on stdout
and, with --enable-thinking, the model's thinking on stderr.

User errors (a missing directory, a bad checkpoint, an id outside the vocabulary, no
tokenizer for a text prompt, no GPU) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["main"]

EXIT_USAGE = 2
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEMO_PRESET = "tiny-moe"
DEMO_PROMPTS = ("The quick brown fox", "Once upon a time there was")
DEMO_TOKEN_PROMPTS = ((2, 310, 41, 97, 400), (2, 18, 250, 7, 77, 123, 5))  # without `tokenizers`


class UsageError(Exception):
    """A problem with what the user asked for; reported without a traceback."""


# --------------------------------------------------------------------------------------
# Shared pieces


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:  # bf16 is what the GPU kernels are for; CPU matmuls are faster in fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _parse_token_ids(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--token-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--token-ids is empty")
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    prompt_tokens: int  # summed over the batch
    prefill_s: float
    decode_tokens: int  # tokens produced after the first, summed over the batch
    decode_s: float

    def lines(self) -> list[str]:
        out = [f"prefill: {self.prompt_tokens} tokens in {self.prefill_s * 1e3:.1f} ms = "
               f"{self.prompt_tokens / max(self.prefill_s, 1e-9):.1f} tok/s"]  # fmt: skip
        if self.decode_tokens:
            per = self.decode_s / self.decode_tokens
            out.append(
                f"decode: {self.decode_tokens} tokens in {self.decode_s * 1e3:.1f} ms = "
                f"{self.decode_tokens / max(self.decode_s, 1e-9):.1f} tok/s ({per * 1e3:.2f} ms/token)"
            )
        else:
            out.append("decode: no tokens after the first (stopped at once)")
        return out


def _timed_generate(runtime, prompts: list[list[int]], *, max_new_tokens: int, **sampling):
    """Generate and measure prefill and decode separately (see the module docstring)."""
    device = runtime.device
    runtime.generate(prompts, max_new_tokens=min(2, max_new_tokens), **sampling)  # warm-up: lazy init
    _sync(device)
    t0 = time.perf_counter()
    runtime.generate(prompts, max_new_tokens=1, **sampling)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = runtime.generate(prompts, max_new_tokens=max_new_tokens, **sampling)
    _sync(device)
    total_s = time.perf_counter() - t0
    timing = Timing(
        prompt_tokens=sum(len(p) for p in prompts),
        prefill_s=prefill_s,
        decode_tokens=sum(max(len(r.token_ids) - 1, 0) for r in results),
        decode_s=max(total_s - prefill_s, 0.0),
    )
    return results, timing


def _sampling(args) -> dict:
    return {
        "temperature": args.temperature,
        "top_k": args.top_k if args.top_k and args.top_k > 0 else None,
        "top_p": args.top_p if args.top_p is not None and args.top_p < 1.0 else None,
        "seed": args.seed,
    }


def _load_runtime(
    model_dir: Path, device: torch.device, dtype: torch.dtype, *, batch: int, max_seq_len: int, quantize=None
):
    from gemma4x.runtime import Gemma4Runtime

    t0 = time.perf_counter()
    runtime = Gemma4Runtime.from_pretrained(
        model_dir, device=device, dtype=dtype, max_batch_size=batch, max_seq_len=max_seq_len, quantize=quantize
    )
    _sync(device)
    return runtime, time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# generate


def _cmd_generate(args) -> int:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json (is this a checkpoint directory?)")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)

    # Config and prompt are checked before loading: a bad field or a missing tokenizer
    # should not cost a 50 GB load first.
    from gemma4x.config import load_config

    config = load_config(model_dir)
    tokenizer = None
    if args.prompt is not None:
        from gemma4x.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir, bos_id=config.text.bos_token_id)
        ids = tokenizer.encode(args.prompt)
    else:
        ids = _parse_token_ids(args.token_ids)
    max_seq_len = args.max_seq_len or len(ids) + args.max_new_tokens

    runtime, load_s = _load_runtime(
        model_dir, device, dtype, batch=1, max_seq_len=max_seq_len, quantize=args.quantize
    )
    results, timing = _timed_generate(runtime, [ids], max_new_tokens=args.max_new_tokens, **_sampling(args))
    out = results[0]

    tokenizer = tokenizer or runtime.tokenizer
    if args.prompt is not None:
        print(args.prompt + tokenizer.decode(out.token_ids))
    else:
        print(",".join(map(str, out.token_ids)))
        if tokenizer is not None:
            print(f"text: {tokenizer.decode(out.token_ids)!r}", file=sys.stderr)
    err = sys.stderr
    print(f"[{device.type}, {str(dtype).removeprefix('torch.')}] loaded in {load_s:.2f} s; "
          f"{len(ids)} prompt tokens, {len(out.token_ids)} generated ({out.finish_reason})", file=err)  # fmt: skip
    for line in timing.lines():
        print(line, file=err)
    return 0


# --------------------------------------------------------------------------------------
# chat


def _cmd_chat(args) -> int:
    from gemma4x.chat import ChatTemplateError, load_chat_template, load_special_tokens, render_chat
    from gemma4x.config import load_config
    from gemma4x.tokenizer import load_tokenizer

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json (is this a checkpoint directory?)")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    # Template, tokenizer and prompt length are checked before the (possibly long) load.
    template = load_chat_template(model_dir)
    if template is None:
        raise ChatTemplateError(f"--model {model_dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir, bos_id=config.text.bos_token_id)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}
    ]
    text = render_chat(template, messages, special_tokens=load_special_tokens(model_dir),
                       enable_thinking=args.enable_thinking)  # fmt: skip
    prompt_len = len(tokenizer.encode(text, add_bos=False))
    max_seq_len = args.max_seq_len or prompt_len + args.max_new_tokens

    runtime, load_s = _load_runtime(model_dir, device, dtype, batch=1, max_seq_len=max_seq_len, quantize=args.quantize)
    t0 = time.perf_counter()
    result = runtime.chat([messages], args.max_new_tokens, enable_thinking=args.enable_thinking, **_sampling(args))[0]
    _sync(device)
    chat_s = time.perf_counter() - t0
    print(result.content)
    err = sys.stderr
    if result.reasoning is not None:
        print(f"[thinking] {result.reasoning}", file=err)
    print(f"[{device.type}, {str(dtype).removeprefix('torch.')}] loaded in {load_s:.2f} s; {prompt_len} prompt "
          f"tokens, {len(result.token_ids)} generated ({result.finish_reason}) in {chat_s:.2f} s", file=err)  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------
# demo


def _cmd_demo(args) -> int:
    from gemma4x import checkpoint, presets
    from gemma4x.tokenizer import GemmaTokenizer, TokenizerUnavailableError, require_tokenizers

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    try:
        require_tokenizers()
        have_tokenizers = True
    except TokenizerUnavailableError:  # optional: the demo then runs on token ids alone
        have_tokenizers = False
    with tempfile.TemporaryDirectory(prefix="gemma4x-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        where = out if args.out else f"a temporary directory ({out})"
        config = presets.preset(DEMO_PRESET)
        t0 = time.perf_counter()
        checkpoint.write_random_checkpoint(out, config, seed=args.seed)
        tok = None
        if have_tokenizers:
            path = checkpoint.write_tiny_tokenizer(out, config["text_config"]["vocab_size"])
            tok = GemmaTokenizer.from_file(path)
        write_s = time.perf_counter() - t0
        extra = " + tiny tokenizer" if tok else " (no tokenizer: `tokenizers` is not installed)"
        print(f"wrote a random-weight '{DEMO_PRESET}' checkpoint{extra} to {where} in {write_s:.2f} s")

        if tok is not None:
            labels = list(DEMO_PROMPTS)
            prompts = [tok.encode(p) for p in DEMO_PROMPTS]
        else:
            prompts = [list(p) for p in DEMO_TOKEN_PROMPTS]
            labels = [",".join(map(str, p)) for p in prompts]
        max_seq_len = max(len(p) for p in prompts) + args.max_new_tokens
        runtime, load_s = _load_runtime(
            out, device, dtype, batch=len(prompts), max_seq_len=max_seq_len, quantize=args.quantize
        )
        print(f"loaded with Gemma4Runtime.from_pretrained on {device.type} ({str(dtype).removeprefix('torch.')}) "
              f"in {load_s:.2f} s")  # fmt: skip
        results, timing = _timed_generate(runtime, prompts, max_new_tokens=args.max_new_tokens, **_sampling(args))
        print("random weights, so the continuations are noise; they show the pipeline works end to end:")
        for label, ids, r in zip(labels, prompts, results):
            print(f"  prompt {label!r} ({len(ids)} tokens) -> {len(r.token_ids)} tokens ({r.finish_reason})")
            print(f"    ids:  {r.token_ids}")
            if tok is not None:
                print(f"    text: {tok.decode(r.token_ids)!r}")
        print(f"batch of {len(prompts)}:")
        for line in timing.lines():
            print("  " + line)
    return 0


# --------------------------------------------------------------------------------------
# Entry point


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _add_run_options(p: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--quantize", choices=("nvfp4", "nvfp4-all"), default=None,
                   help="quantize BF16 weights to NVFP4 while loading: nvfp4 = routed experts, "
                        "nvfp4-all = every decoder linear (default: as stored)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4x", description="Fast, faithful Gemma 4 inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,demo}")

    gen = sub.add_parser("generate", help="generate from a checkpoint directory")
    gen.add_argument("--model", required=True, metavar="DIR", help="HF-layout checkpoint directory")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="text prompt (needs DIR/tokenizer.json and `tokenizers`)")
    src.add_argument("--token-ids", metavar="IDS", help="comma-separated prompt token ids, used as given")
    gen.add_argument("--max-seq-len", type=_positive_int, default=None, help="KV cache length (default: just enough)")
    _add_run_options(gen, max_new_tokens=32, temperature=0.0)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="answer one message with the checkpoint's chat template")
    chat.add_argument("--model", required=True, metavar="DIR", help="HF-layout checkpoint directory")
    chat.add_argument("--message", required=True, metavar="TEXT", help="the user message")
    chat.add_argument("--system", metavar="TEXT", default=None, help="an optional system message")
    chat.add_argument("--enable-thinking", action="store_true", help="let the model think first (printed on stderr)")
    chat.add_argument("--max-seq-len", type=_positive_int, default=None, help="KV cache length (default: just enough)")
    _add_run_options(chat, max_new_tokens=256, temperature=0.0)
    chat.set_defaults(func=_cmd_chat)

    demo = sub.add_parser("demo", help="write, load and run a tiny random-weight MoE checkpoint")
    demo.add_argument("--out", metavar="DIR", help="keep the demo checkpoint here (default: a temp dir)")
    _add_run_options(demo, max_new_tokens=16, temperature=0.8)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gemma4x.ops import ExtensionUnavailableError
    from gemma4x.tokenizer import TokenizerUnavailableError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage; keep main() returning an int
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (UsageError, ValueError, OSError, TokenizerUnavailableError, ExtensionUnavailableError) as exc:
        # ValueError covers CheckpointError and config errors; OSError missing/unreadable files.
        print(f"gemma4x {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except torch.OutOfMemoryError as exc:
        print(f"gemma4x {args.command}: error: out of memory ({exc}); try a smaller --max-seq-len", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
