"""
Step-by-step parity of two nanochat checkouts (ours and a reference, e.g. upstream at a given commit): the same
initial weights and the same batches through K base_train steps (d4, T=512, B=8, the issue's LRs and schedules
for a 300-step run), on one CPU thread in fp32, eager. Each checkout runs in its own process, since both are
packages named `nanochat`.

    # 1. the reference draws the init (seed 42) and reads the batches from its own loader
    NANOCHAT_BASE_DIR=... TORCHDYNAMO_DISABLE=1 python -m bench.upstream_parity run --root /path/to/reference --steps 20 --out ref.pt
    # 2. ours starts from the same weights and batches (and checks its own loader yields the same batches)
    NANOCHAT_BASE_DIR=... python -m bench.upstream_parity run --root . --steps 20 --out ours.pt --like ref.pt
    # 3. per-step losses, per-parameter gradient norms at step 0, parameter differences after step 0
    python -m bench.upstream_parity compare ref.pt ours.pt
    # the two scripts themselves (their own init, schedules, loop): each param group's hyperparameters and
    # gradient/parameter sums before each of the first K optimizer steps; diff the two outputs
    NANOCHAT_BASE_DIR=... python -m bench.upstream_parity trace --root /path/to/checkout --steps 8 -- <base_train flags>

TORCHDYNAMO_DISABLE=1 makes a reference whose optimizer kernels are decorated with torch.compile run them eagerly.
"""

import argparse
import math
import os
import sys

import torch

N_ITER = 300  # the schedules are those of a 300-step run
WARMUP, WARMDOWN, FINAL = 10, 0.65, 0.05


def _lrm(it):
    down = round(WARMDOWN * N_ITER)
    if it < WARMUP:
        return (it + 1) / WARMUP
    if it <= N_ITER - down:
        return 1.0
    p = (N_ITER - it) / down
    return p + (1 - p) * FINAL


def _momentum(it):
    down = round(WARMDOWN * N_ITER)
    if it < 400:  # the 400-step warmup wins over the warmdown, as in base_train
        return (1 - it / 400) * 0.85 + it / 400 * 0.97
    if it >= N_ITER - down:
        p = (it - (N_ITER - down)) / down
        return 0.97 * (1 - p) + 0.90 * p
    return 0.97


def run(args):
    sys.path.insert(0, os.path.abspath(args.root))  # import `nanochat` from that checkout
    torch.set_num_threads(1)
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    tok = get_tokenizer()

    def config(depth):
        return GPTConfig(sequence_len=512, vocab_size=tok.get_vocab_size(), n_layer=depth, n_head=depth, n_kv_head=depth,
                         n_embd=64 * depth, window_pattern="L")

    torch.manual_seed(42)
    with torch.device("meta"):
        model, ref = GPT(config(4)), GPT(config(12))
    model.to_empty(device="cpu")
    model.init_weights()
    loader = loader_fn(tok, 8, 512, split="train", device="cpu")
    batches = [tuple(t.clone() for t in next(loader)[:2]) for _ in range(args.steps)]
    if args.like:
        like = torch.load(args.like)
        model.load_state_dict(like["init"])
        same = all(torch.equal(a, b) for pair_a, pair_b in zip(batches, like["batches"]) for a, b in zip(pair_a, pair_b))
        print(f"this checkout's loader yields the reference's {args.steps} batches: {same}")
        batches = like["batches"]

    def scaling(m):
        counts = m.num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    s = math.sqrt(4096 / 2**19)  # batch LR scale of a 4,096-token batch
    wd = 0.28 * s * (12 * scaling(ref)) / int(12 * scaling(model))
    opt = model.setup_optimizer(unembedding_lr=0.008 * s, embedding_lr=0.3 * s, scalar_lr=0.5 * s, matrix_lr=0.02 * s, weight_decay=wd)
    out = {"init": {k: v.clone() for k, v in model.state_dict().items()}, "batches": batches, "loss": [], "grad_norms": None}
    for it, (x, y) in enumerate(batches):
        loss = model(x, y)
        loss.backward()
        if it == 0:
            out["grad_norms"] = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * _lrm(it)
            if group["kind"] == "muon":
                group["momentum"] = _momentum(it)
                group["weight_decay"] = wd * 0.5 * (1 + math.cos(math.pi * it / N_ITER))
        opt.step()
        model.zero_grad(set_to_none=True)
        out["loss"].append(loss.item())
        if it == 0:
            out["after_step0"] = {k: v.clone() for k, v in model.state_dict().items()}
        print(f"step {it:3d} loss {loss.item():.6f}", flush=True)
    torch.save(out, args.out)


def compare(args):
    a, b = torch.load(args.a), torch.load(args.b)
    for it, (la, lb) in enumerate(zip(a["loss"], b["loss"])):
        print(f"step {it:3d}  {la:.6f}  {lb:.6f}  diff {lb - la:+.2e}")
    print("gradient norms at step 0 (relative difference):")
    for name, ga in a["grad_norms"].items():
        gb = b["grad_norms"][name]
        print(f"  {name:40s} {ga:.6e} {gb:.6e} {abs(ga - gb) / (ga + 1e-30):.1e}")
    print("parameters after step 0 (max |difference| / max |value|):")
    for name, pa in a["after_step0"].items():
        d = (pa.float() - b["after_step0"][name].float()).abs().max().item()
        print(f"  {name:40s} {d / (pa.float().abs().max().item() + 1e-30):.1e}")


def trace(args):
    """Run `scripts.base_train` of that checkout with its flags, printing one line per param group before each of
    the first --steps optimizer steps (exact reprs, so two runs can be diffed), then exit."""
    import runpy

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    count = [0]

    def hook(opt, *_):
        for i, g in enumerate(opt.param_groups):
            hyper = {k: g[k] for k in ("lr", "momentum", "weight_decay", "betas", "eps", "ns_steps", "beta2") if k in g}
            grads = sum(p.grad.double().abs().sum().item() for p in g["params"] if p.grad is not None)
            values = sum(p.double().abs().sum().item() for p in g["params"])
            print(f"TRACE step {count[0]} group {i} {hyper!r} |grad| {grads!r} |param| {values!r}", flush=True)
        count[0] += 1
        if count[0] >= args.steps:
            os._exit(0)

    register_optimizer_step_pre_hook(hook)
    root = os.path.abspath(args.root)
    sys.path.insert(0, root)
    os.chdir(root)
    sys.argv = ["base_train", *args.flags]
    runpy.run_module("scripts.base_train", run_name="__main__")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train K steps of one checkout, save losses, grads and weights")
    r.add_argument("--root", required=True, help="the nanochat checkout to import")
    r.add_argument("--steps", type=int, default=20, help="training steps")
    r.add_argument("--out", required=True, help="output .pt")
    r.add_argument("--like", default=None, help="a reference's output: start from its init and batches")
    t = sub.add_parser("trace", help="print each optimizer step's hyperparameters and sums from a checkout's base_train")
    t.add_argument("--root", required=True, help="the nanochat checkout whose scripts.base_train runs")
    t.add_argument("--steps", type=int, default=8, help="optimizer steps to trace")
    t.add_argument("flags", nargs=argparse.REMAINDER, help="base_train flags (after --)")
    c = sub.add_parser("compare", help="print the differences of two runs")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "trace" and args.flags[:1] == ["--"]:
        args.flags = args.flags[1:]
    {"run": run, "trace": trace, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
