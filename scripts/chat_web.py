"""
Serve a chat model: a web UI, nanochat's streaming endpoint and an OpenAI-compatible API (nanochat/server.py).

    python -m scripts.chat_web -i sft --port 8000                    # then open http://127.0.0.1:8000
    python -m scripts.chat_web -i sft -n 8                           # one replica per GPU on an 8-GPU node
    NANOCHAT_API_KEY=... python -m scripts.chat_web --host 0.0.0.0   # serve other machines, behind a key

An OpenAI client points at http://127.0.0.1:8000/v1. By default only this machine can connect, and no other web
page may call the API from a browser.
"""

import argparse
import logging
import os

import torch

from nanochat.common import ConfigError, autodetect_device_type, compute_init, script_main, setup_default_logging
from nanochat.serving import SamplingParams, add_model_flags, load_replica, sampling_flag_problems

log = logging.getLogger("nanochat.chat_web")


def build_parser():
    p = argparse.ArgumentParser(description="Serve a nanochat model over HTTP: web UI and OpenAI-compatible API.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (1 on CPU/MPS)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="temperature when a request gives none")
    p.add_argument("-k", "--top-k", type=int, default=50, help="top-k when a request gives none (0 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="reply length limit when a request gives none")
    p.add_argument("--max-batch", type=int, default=16,
                   help="rows (samples of concurrent requests) that share each forward pass of a replica; 1 = one request "
                        "at a time")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on: 127.0.0.1 = this machine only, 0.0.0.0 = every network interface")
    net.add_argument("-p", "--port", type=int, default=8000, help="TCP port (0 = any free one)")
    net.add_argument("--api-key", default=None,
                     help="bearer token the UI's and the /v1 endpoints require (the UI asks for it); none = "
                          "$NANOCHAT_API_KEY, and without it no check")
    net.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN",
                     help="web origins (https://host:port) whose pages may call the API from a browser; none = no "
                          "other site's page may")
    net.add_argument("--client-timeout", type=float, default=30.0,
                     help="seconds a client has to send its request headers, and again its body")
    net.add_argument("--max-connections", type=int, default=2048, help="open connections before new requests get 503")
    net.add_argument("--shutdown-timeout", type=float, default=10.0,
                     help="seconds a stopping server waits for replies to end before it cuts them")
    p.add_argument("--log-conversations", default=None, metavar="PATH",
                   help="append every request and its reply to this JSONL file (created 0600); none = no log")
    return add_model_flags(p)


def check_args(args, device_type):
    problems = sampling_flag_problems(args)
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be between 0 and 65535, got {args.port}")
    for flag, value in (("--client-timeout", args.client_timeout), ("--shutdown-timeout", args.shutdown_timeout)):
        if not value > 0:
            problems.append(f"{flag} must be > 0 seconds, got {value}")
    for flag, value in (("--max-connections", args.max_connections), ("--max-batch", args.max_batch)):
        if value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if args.api_key is None:
        args.api_key = os.environ.get("NANOCHAT_API_KEY") or None  # read here, so --help never prints it
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key is blank; give a key or leave it out")
    if args.num_gpus < 1:
        problems.append(f"--num-gpus must be >= 1, got {args.num_gpus}")
    elif args.num_gpus > 1 and device_type != "cuda":
        problems.append(f"--num-gpus {args.num_gpus} needs CUDA; on {device_type} there is one replica (use -n 1)")
    elif args.num_gpus > torch.cuda.device_count() > 0:
        problems.append(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
    if problems:
        raise ConfigError("; ".join(problems))


def build_server(args):
    """A uvicorn.Server (not yet running) over one replica per GPU, or one on CPU/MPS."""
    from nanochat.checkpoint_manager import find_largest_model, get_checkpoints_dir
    from nanochat.server import ConversationLog, ReplicaPool, create_app, make_server

    device_type = args.device_type or autodetect_device_type()
    check_args(args, device_type)
    _, _, _, _, device = compute_init(device_type)
    replicas = []
    for i in range(args.num_gpus):
        replica_device = torch.device("cuda", i) if device_type == "cuda" else device
        log.info("Loading model replica %d on %s", i, replica_device)
        replica, meta = load_replica(args, replica_device, index=i, max_batch=args.max_batch)
        replicas.append(replica)
    tag = args.model_tag or find_largest_model(get_checkpoints_dir(args.source))
    model_id = f"nanochat-{args.source}-{tag}"
    defaults = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    try:
        conversation_log = ConversationLog(args.log_conversations) if args.log_conversations else None
    except OSError as e:
        raise ConfigError(f"--log-conversations {args.log_conversations}: cannot create it ({e.strerror})") from None
    app = create_app(ReplicaPool(replicas), replicas[0].tokenizer, defaults, model_id=model_id,
                     conversation_log=conversation_log, api_key=args.api_key, cors_origins=args.cors_origins,
                     body_timeout=args.client_timeout)
    log.info("Serving %s (step %s, context %d tokens) with %d replica(s) of up to %d batched rows; defaults: "
             "temperature %g, top-k %d, max tokens %d", model_id, meta.get("step"), replicas[0].context_len, len(replicas),
             args.max_batch, args.temperature, args.top_k, args.max_tokens)
    if conversation_log is not None:
        log.info("Logging conversations to %s", conversation_log.path)
    log.info("The chat endpoints (UI and /v1) %s; browser pages from %s may call the API",
             "need the API key" if args.api_key else "are open (no --api-key)",
             ", ".join(args.cors_origins) if args.cors_origins else "no other origin")
    return make_server(app, host=args.host, port=args.port, client_timeout=args.client_timeout,
                       max_connections=args.max_connections, shutdown_timeout=args.shutdown_timeout)


@script_main("chat_web")
def main(argv=None):
    setup_default_logging()
    args = build_parser().parse_args(argv)
    build_server(args).run()  # its first line says where it listens, once it does
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
