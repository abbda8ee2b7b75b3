"""Command-line verbs that use a trained adapter: generate, chat, merge, combine."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import COMBINE_METHODS, SIGN_METHODS
from ..errors import LorakitError, read_text
from .model_args import add_model_args, base_model, quant_kwargs

__all__ = ["INFER_COMMANDS"]


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--template", default="auto", help="auto | tokenizer | chatml | human-assistant")


def _sampling(args: argparse.Namespace):
    from ..inference.generation import Sampling

    if args.max_new_tokens < 1:
        raise LorakitError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise LorakitError("--temperature must be >= 0 and --top-p in (0, 1]")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, list(args.stop))


def _engine(args: argparse.Namespace):
    from ..inference.engine import load_engine

    engine = load_engine(base_model(args), args.adapter, args.device, args.dtype, getattr(args, "template", "auto"),
                         int8=args.int8, **quant_kwargs(args))
    if args.int8:
        how = f"adapter {engine.merged} merged, " if engine.merged else ""
        print(f"int8: {how}linear layers in int8 with dynamic int8 activations", file=sys.stderr)
    return engine


def _only_adapter(engine) -> str | None:
    if len(engine.adapters) > 1:
        raise LorakitError(f"several adapters given ({', '.join(engine.adapters)}); generate uses one")
    return engine.adapters[0] if engine.adapters else None


# ---- generate ------------------------------------------------------------------------------

def _add_generate(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--prompts", metavar="FILE", help="JSONL: one {\"prompt\": ...} or {\"messages\": [...]} per line")
    _sampling_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (--prompts)")


def _read_prompts(path: str, system: str | None) -> list[list[dict]]:
    chats = []
    lines = read_text(path, "prompts file").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise LorakitError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            chats.append(rec["messages"])
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            chats.append(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": rec["prompt"]}])
        else:
            raise LorakitError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
    if not chats:
        raise LorakitError(f"{path}: no prompts")
    return chats


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..inference.generation import Request

    sampling = _sampling(args)
    chats = _read_prompts(args.prompts, args.system) if args.prompts else \
        [([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]]
    engine = _engine(args)
    adapter = _only_adapter(engine)
    if args.prompt is not None:
        out = engine.chat(chats[0], adapter, sampling)
        print(out.text)
        return 0
    for i in range(0, len(chats), max(1, args.batch_size)):
        group = chats[i:i + args.batch_size]
        outs = engine.run([Request(engine.prompt_ids(c), adapter, sampling) for c in group])
        for chat, out in zip(group, outs):
            print(json.dumps({"messages": chat, "output": out.text, "finish_reason": out.finish_reason}, ensure_ascii=False))
    return 0


# ---- chat ----------------------------------------------------------------------------------

CHAT_HELP = """commands: /reset (forget the conversation)  /system TEXT  /adapter NAME|none  /adapters
          /save FILE (append the conversation as a training example, messages format)  /quit"""


def _add_chat(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    _sampling_args(p)


def _cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    engine = _engine(args)
    adapter = engine.adapters[0] if engine.adapters else None
    system = args.system
    history: list[dict] = []

    def messages(user: str) -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": user}]

    if not sys.stdin.isatty():  # one-shot from a pipe: the whole input is one message
        text = sys.stdin.read().strip()
        if not text:
            raise LorakitError("nothing on standard input to answer")
        out = engine.chat(messages(text), adapter, sampling, on_text=lambda s: print(s, end="", flush=True))
        print()
        return 0

    print(f"lorakit chat — model {base_model(args)}, adapter: {adapter or 'none'}. {CHAT_HELP}")
    while True:
        try:
            line = input(f"[{adapter or 'base'}] you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            rest = rest.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                history.clear()
                print("(conversation cleared)")
            elif cmd == "/system":
                system = rest or None
                print(f"(system prompt {'set' if system else 'cleared'})")
            elif cmd == "/adapters":
                print("adapters: " + (", ".join(engine.adapters) or "none"))
            elif cmd == "/adapter":
                if rest in ("none", "base", ""):
                    adapter = None
                elif rest in engine.adapters:
                    adapter = rest
                else:
                    print(f"(unknown adapter {rest!r}; loaded: {', '.join(engine.adapters) or 'none'})")
                    continue
                print(f"(adapter: {adapter or 'none'})")
            elif cmd == "/save":
                if not rest or not history:
                    print("(usage: /save FILE, after at least one exchange)")
                    continue
                record = {"messages": ([{"role": "system", "content": system}] if system else []) + history}
                with open(rest, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                print(f"(saved {len(history) // 2} exchange(s) to {rest})")
            else:
                print(CHAT_HELP)
            continue
        print("assistant> ", end="", flush=True)
        out = engine.chat(messages(line), adapter, sampling, on_text=lambda s: print(s, end="", flush=True))
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": out.text}]


# ---- merge ---------------------------------------------------------------------------------

def _add_merge(p: argparse.ArgumentParser) -> None:
    add_model_args(p, adapters="one", int8=False)
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the model's; float32 after a quantized run)")
    p.add_argument("--safe", action="store_true", help="refuse to write if a merged weight is inf/NaN")
    p.add_argument("--requantize", action="store_true",
                   help="quantized run: write the merged weights quantized again (lossy: prints the measured error)")


def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from ..core.merge import check_new_folder, save_merged
    from ..core.lora_model import LoraModel
    from ..base import load_model, quant_spec

    check_new_folder(args.out)
    if args.requantize and args.quantize == "none":
        raise LorakitError("--requantize re-quantizes a quantized run's merge: also pass --quantize nf4|fp4|int8 "
                           "(the run's model.quantize)")
    spec = quant_spec(args.quantize, args.double_quant, args.compute_dtype)
    base, tok = load_model(base_model(args), args.device, args.dtype, **quant_kwargs(args))
    lm = LoraModel.from_pretrained(base, args.adapter)
    if spec is not None:
        from ..quant.bnb import dequantize_model, hf_quantization_config, quantize_model, requantize_error

        dequantize_model(lm.model)  # the exact base the adapter was trained against, in float32
        if args.requantize:
            err = requantize_error(lm, spec)
            print(f"warning: re-quantizing to {spec.method} changes the merged weights by {100 * err['weight_error']:.2f}% "
                  f"of their norm, which is {100 * err['update_error']:.0f}% of the adapter's update; the float "
                  "merge (without --requantize) keeps the update exactly", file=sys.stderr)
    merged = lm.merge_and_unload(safe=args.safe)
    save_dtype = args.save_dtype or ("float32" if spec is not None else None)
    if spec is not None and save_dtype == "bfloat16" and not args.requantize:
        print("warning: bfloat16 keeps 8 significant bits; its rounding (~0.2% of each weight) is of the order of "
              "a LoRA update. float16 or float32 keep it.", file=sys.stderr)
    if save_dtype:
        merged.to(getattr(torch, save_dtype))
    if args.requantize:
        quantize_model(merged, spec)
        merged.config.quantization_config = hf_quantization_config(spec)
    out = save_merged(merged, args.out, tok)
    how = (f", re-quantized to {spec.method}" if args.requantize else
           f", merged into the dequantized {spec.method} base, saved as {save_dtype}") if spec is not None else ""
    print(f"merged model written to {out}{how} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


# ---- combine -------------------------------------------------------------------------------

def _add_combine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH:WEIGHT",
                   help="an adapter and its weight, e.g. a=runs/a/adapter:0.7 (repeatable)")
    p.add_argument("--method", default="cat", choices=COMBINE_METHODS,
                   help="cat (exact, ranks add up), svd (exact sum truncated to --rank), linear (PEFT's factor "
                        "average), ties | dare_linear | dare_ties | magnitude_prune (need --density; on the "
                        "factors, as PEFT) and their _svd forms (on the full updates, need --rank)")
    p.add_argument("--rank", type=int, default=None, help="target rank (svd and the *_svd methods)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of entries kept by ties/dare/magnitude_prune, in (0, 1]")
    p.add_argument("--majority-sign", default="total", choices=SIGN_METHODS,
                   help="TIES sign election: by summed values (total) or by counting signs (frequency)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (same seed, same result)")
    p.add_argument("--out", required=True, help="new folder for the combined adapter")
    p.add_argument("--model", default=None, help="base model (default: the first adapter's base_model_name_or_path)")
    p.add_argument("--device", default="cpu")


def _parse_weighted(spec: str) -> tuple[str, str, float]:
    name_path, sep, weight = spec.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        sep = ""
    if not sep:
        raise LorakitError(f"--adapter {spec!r}: expected NAME=PATH:WEIGHT, e.g. a=runs/a/adapter:0.7")
    from ..inference.engine import parse_adapter_spec

    name, path = parse_adapter_spec(name_path)
    return name, path, w


def _cmd_combine(args: argparse.Namespace) -> int:
    from ..core.peft_format import read_adapter
    from ..core.combine import check_combine_options
    from ..core.merge import check_new_folder
    from ..core.lora_model import LoraModel
    from ..base import load_model

    check_new_folder(args.out)
    check_combine_options(args.method, args.rank, args.density, args.majority_sign)  # before loading the base
    specs = [_parse_weighted(s) for s in args.adapter]
    base_name = args.model or read_adapter(specs[0][1])[0].base_model_name_or_path
    if not base_name:
        raise LorakitError("the adapter does not record its base model; pass --model")
    base, _ = load_model(base_name, args.device, "float32")
    lm = LoraModel(base)
    for name, path, _ in specs:
        lm.load_adapter(path, name, activate=False)
    lm.add_weighted_adapter([n for n, _, _ in specs], [w for _, _, w in specs], "combined", args.method, args.rank,
                            args.density, args.majority_sign, args.seed)
    lm.configs["combined"].base_model_name_or_path = base_name
    from ..core.peft_format import save_adapter

    save_adapter(lm.model, args.out, "combined", lm.configs["combined"], flat=True)
    print(f"combined adapter ({args.method}, weights {[w for _, _, w in specs]}) written to {args.out}")
    return 0


# ---- serve ---------------------------------------------------------------------------------

def _add_serve(p: argparse.ArgumentParser) -> None:
    from ..inference.settings import ServeSettings

    d = ServeSettings()
    add_model_args(p)
    p.add_argument("--template", default="auto", help="auto | tokenizer | chatml | human-assistant")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--adapters-dir", default=None, help="folder whose sub-folders POST /v1/adapters may load")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests generated together")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..errors import require_extra

    require_extra("serve", ("fastapi", "uvicorn"), "lorakit serve")  # before the model is loaded
    import uvicorn

    from ..inference.server import ServeSettings, create_app

    engine = _engine(args)
    settings = ServeSettings(api_key=args.api_key, adapters_dir=args.adapters_dir, max_batch=args.max_batch,
                             max_tokens_limit=args.max_tokens_limit)
    app = create_app(engine, settings)
    print(f"serving {engine.base_name} with adapters {engine.adapters or 'none'} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


INFER_COMMANDS = {
    "serve": ("OpenAI-compatible HTTP server; each request's 'model' picks an adapter.", _add_serve, _cmd_serve),
    "generate": ("Answer a prompt (or a JSONL file of prompts) with the base model or an adapter.", _add_generate, _cmd_generate),
    "chat": ("Chat in the terminal (streams tokens; /adapter switches adapters); one-shot from a pipe.", _add_chat, _cmd_chat),
    "merge": ("Merge an adapter into its base and write a plain transformers model folder.", _add_merge, _cmd_merge),
    "combine": ("Combine weighted adapters (cat | svd | linear | ties | dare_* | magnitude_prune) into a new adapter.", _add_combine, _cmd_combine),
}
