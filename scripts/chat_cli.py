"""
Chat with a model in the terminal; replies stream token by token.

    python -m scripts.chat_cli                              # the newest SFT checkpoint
    python -m scripts.chat_cli -i rl -t 0.8 -k 50 --seed 7  # --seed replays a session exactly
    python -m scripts.chat_cli -p "Why is the sky blue?"    # answer one prompt, print only the answer, exit

Type 'clear' for a new conversation and 'quit' or 'exit' (or Ctrl-D) to leave; Ctrl-C stops a reply midway.
Calculator calls show as [calculator: 12/60 = 0.2]. When the conversation outgrows the model's context, its
oldest turns are dropped, with a note saying so.
"""

import argparse
import logging
import secrets

from nanochat.common import ConfigError, autodetect_device_type, compute_init, script_main, setup_default_logging
from nanochat.serving import (ContextOverflowError, Reply, SamplingParams, add_model_flags, build_prompt, load_replica,
                              reply_room, sampling_flag_problems)

log = logging.getLogger("nanochat.chat_cli")

RULE = "-" * 50
MAX_SEED = 2**63 - 1  # as the API's seed: reply i's seed + i then stays far inside torch's 64-bit generator seed


def seed_flag(text):
    """--seed's type: an integer from -1 to MAX_SEED, checked as the flags are parsed."""
    seed = int(text)  # a non-integer: argparse reports the ValueError as an invalid value
    if not -1 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between -1 (a random one) and {MAX_SEED}, got {seed}")
    return seed


def build_parser():
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit (never read as a command)")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per reply")
    p.add_argument("--seed", type=seed_flag, default=-1,
                   help="seed of the first reply; reply i uses seed + i (-1 = a random one, printed at startup)")
    return add_model_flags(p)


def respond(replica, tokenizer, messages, args, seed, out=print):
    """Stream the reply to `messages` (ending with the user's) through `out`; returns its text with the
    calculator's tokens by name (how it is kept in the conversation), or None if the last message can't fit.

    Drops the oldest turns from `messages` itself when the conversation no longer fits the context.
    """
    context = replica.context_len
    try:
        prompt = build_prompt(tokenizer, messages, context, reply_room(args.max_tokens, context))
    except ContextOverflowError:
        out(f"(That message is too long for this model's context of {context} tokens; try a shorter one.)")
        return None
    if prompt.dropped:
        del messages[:prompt.dropped]
        out(f"(The {prompt.dropped} oldest messages were dropped to fit the model's context of {context} tokens.)")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=prompt.max_new_tokens(args.max_tokens),
                            seed=seed)
    shown, kept = Reply(tokenizer, tools="readable"), Reply(tokenizer, tools="raw")
    steps = replica.generate(prompt.tokens, params)
    try:
        for column in steps:
            kept.push(column[0])
            out(shown.push(column[0]), end="", flush=True)
            if shown.done:
                break
    except KeyboardInterrupt:
        out(" [stopped]", end="")
    finally:
        steps.close()
    out(shown.finish(), flush=True)
    kept.finish()
    return kept.text


def chat_loop(replica, tokenizer, args, seed, read=input, out=print):
    """The interactive conversation: read a line, answer it, until quit/exit or end of input."""
    out("\nNanoChat Interactive Mode")
    out(RULE)
    out("Type 'quit' or 'exit' to end the conversation")
    out("Type 'clear' to start a new conversation")
    out(RULE)
    messages, turn = [], 0
    while True:
        try:
            text = read("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            out("\nGoodbye!")
            return
        command = text.lower()
        if command in ("quit", "exit"):
            out("Goodbye!")
            return
        if command == "clear":
            messages.clear()
            out("Conversation cleared.")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        out("\nAssistant: ", end="", flush=True)
        reply = respond(replica, tokenizer, messages, args, seed + turn, out=out)
        turn += 1
        if reply is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})


@script_main("chat_cli")
def main(argv=None):
    setup_default_logging()
    args = build_parser().parse_args(argv)
    problems = sampling_flag_problems(args)
    if problems:
        raise ConfigError("; ".join(problems))

    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    replica, _ = load_replica(args, device)
    tokenizer = replica.tokenizer
    seed = args.seed if args.seed >= 0 else secrets.randbelow(2**31)
    log.info("Context %d tokens, temperature %g, top-k %d, up to %d tokens per reply, seed %d (--seed %d replays this)",
             replica.context_len, args.temperature, args.top_k, args.max_tokens, seed, seed)
    try:
        if args.prompt:
            respond(replica, tokenizer, [{"role": "user", "content": args.prompt}], args, seed)
        else:
            chat_loop(replica, tokenizer, args, seed)
    finally:
        # Join the batch thread: a reply ends at its stop token while the thread may still be inside a torch op,
        # and an interpreter that exits under it can abort ("terminate called without an active exception").
        replica.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
