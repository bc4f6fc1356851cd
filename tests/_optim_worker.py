"""
Worker for tests/test_optim_distributed.py: trains a tiny GPT-shaped parameter set with MuonAdamW.

Every rank takes its 1/W slice of each global batch, so W ranks should land where 1 process lands on the
full batch. Run it under torchrun (gloo on CPU) or import it for the 1-process reference:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 tests/_optim_worker.py --out DIR

Writes into DIR, per rank r: final_rank{r}.pt and state_rank{r}.pt (params and this rank's optimizer state
after the fp32 run), final_bf16_rank{r}.pt (bf16-embedding run), optim_rank{r}.pt (optimizer state_dict saved
mid-run) and report_rank{r}.json (resume checks).
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import compute_cleanup, compute_init
from nanochat.optim import MuonAdamW

VOCAB, DIM, HIDDEN, ODD_ROWS = 64, 16, 32, 33
GLOBAL_BATCH, SEQ = 8, 4
STEPS, SAVE_AT = 4, 2


def make_params(embed_dtype=torch.float32, seed=0):
    """The parameter set, chosen to hit every optimizer path when W = 2:
    emb/head (64x16 = 1024 elements): sharded AdamW; odd (33x32, 33 % 2 != 0): AdamW replicated by fallback;
    scale/gain (< 1024 elements): AdamW all-reduced; blocks: Muon stack of K=3 (not divisible by 2);
    up: K=1 tall matrix (rank 1 owns nothing); down: K=2 wide matrices.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std):
        return torch.nn.Parameter(torch.randn(*shape, generator=g) * std)

    params = {
        "emb": rand(VOCAB, DIM, std=0.8),
        "odd": rand(ODD_ROWS, 2 * DIM, std=0.1),
        "scale": rand(DIM, std=0.1),
        "gain": rand(1, std=0.1),
        "head": rand(VOCAB, DIM, std=0.1),
        **{f"blocks.{i}": rand(DIM, DIM, std=DIM**-0.5) for i in range(3)},
        "up": rand(HIDDEN, DIM, std=DIM**-0.5),
        **{f"down.{i}": rand(DIM, HIDDEN, std=HIDDEN**-0.5) for i in range(2)},
    }
    with torch.no_grad():
        params["scale"] += 1
        params["gain"] += 1
    params["emb"] = torch.nn.Parameter(params["emb"].detach().to(embed_dtype))
    return params


def make_optimizer(params):
    """Groups laid out like GPT.setup_optimizer: AdamW groups first, then Muon groups in sorted-shape order."""
    groups = [
        dict(kind="adamw", params=[params["head"]], lr=0.008, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[params["emb"], params["odd"]], lr=0.2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
        dict(kind="adamw", params=[params["scale"], params["gain"]], lr=0.05, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.05),
    ]
    muon = [[params[f"blocks.{i}"] for i in range(3)], [params[f"down.{i}"] for i in range(2)], [params["up"]]]
    for stack in sorted(muon, key=lambda ps: tuple(ps[0].shape)):
        groups.append(dict(kind="muon", params=stack, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2))
    # fp32 orthogonalisation: with bf16 the 1-ulp differences between "mean of two half-batch grads" and
    # "full-batch grad" would be amplified past any tight tolerance.
    opt = MuonAdamW(groups, ortho_dtype=torch.float32)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def batch(step):
    """The global batch of `step`: (GLOBAL_BATCH, SEQ) token ids and targets, identical on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return idx, torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def loss_fn(p, idx, targets):
    B, T = idx.shape
    x = F.embedding(idx, p["emb"]).float() + F.embedding(idx % ODD_ROWS, p["odd"]).view(B, T, 2, DIM).sum(2)
    for i in range(3):
        x = x + torch.tanh(x @ p[f"blocks.{i}"].T)  # (B, T, DIM)
    u = torch.relu(x @ p["up"].T)  # (B, T, HIDDEN)
    x = x + (u @ p["down.0"].T) * torch.sigmoid(u @ p["down.1"].T)
    logits = (x * p["scale"] * p["gain"]) @ p["head"].T  # (B, T, VOCAB)
    return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def train(params, opt, steps, rank=0, world=1):
    """Run the given steps: this rank's rows of each global batch, per-step LR / momentum / WD schedules."""
    rows = GLOBAL_BATCH // world
    for step in steps:
        idx, targets = batch(step)
        loss_fn(params, idx[rank * rows:(rank + 1) * rows], targets[rank * rows:(rank + 1) * rows]).backward()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - 0.1 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.03 * step
                group["weight_decay"] = 0.2 * (1 - 0.2 * step)
        opt.step()
        opt.zero_grad(set_to_none=True)


def snapshot(params):
    return {name: p.detach().clone() for name, p in params.items()}


def snapshot_state(params, opt):
    """This rank's optimizer state tensors by parameter name (Muon state sits under its group's first matrix)."""
    return {name: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for name, p in params.items() if p in opt.state}


def reference(embed_dtype=torch.float32):
    """1-process, full-batch (params, optimizer state) after STEPS steps (call without a process group)."""
    params = make_params(embed_dtype)
    opt = make_optimizer(params)
    train(params, opt, range(STEPS))
    return snapshot(params), snapshot_state(params, opt)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the per-rank result files")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    _, rank, _, world, _ = compute_init("cpu")
    out = args.out
    report = {"world_size": world}

    # fp32 run, with the optimizer state saved at SAVE_AT so the resume below can pick it up.
    params = make_params()
    opt = make_optimizer(params)
    train(params, opt, range(SAVE_AT), rank, world)
    mid = snapshot(params)
    torch.save(opt.state_dict(), os.path.join(out, f"optim_rank{rank}.pt"))
    train(params, opt, range(SAVE_AT, STEPS), rank, world)
    final = snapshot(params)
    torch.save(final, os.path.join(out, f"final_rank{rank}.pt"))
    torch.save(snapshot_state(params, opt), os.path.join(out, f"state_rank{rank}.pt"))
    if world > 1:
        dist.barrier()  # every rank's optimizer file is on disk before anyone reads another rank's

    # Resume: fresh params (from the mid-run snapshot) and optimizer, this rank's shard loaded from its file.
    resumed = make_params()
    with torch.no_grad():
        for name, p in resumed.items():
            p.copy_(mid[name])
    opt2 = make_optimizer(resumed)
    opt2.load_state_dict(torch.load(os.path.join(out, f"optim_rank{rank}.pt"), weights_only=True))
    train(resumed, opt2, range(SAVE_AT, STEPS), rank, world)
    report["resume_bitwise"] = all(torch.equal(resumed[n], final[n]) for n in final)

    # Loading another rank's shard must be refused, not silently mix up the state.
    other = (rank + 1) % world
    try:
        make_optimizer(make_params()).load_state_dict(torch.load(os.path.join(out, f"optim_rank{other}.pt"), weights_only=True))
        report["wrong_rank_error"] = None
    except ValueError as e:
        report["wrong_rank_error"] = str(e)

    # bf16 embedding (as wte is on bf16 hardware): bf16 grads and moments go through the same collectives.
    params = make_params(torch.bfloat16)
    train(params, make_optimizer(params), range(STEPS), rank, world)
    torch.save(snapshot(params), os.path.join(out, f"final_bf16_rank{rank}.pt"))

    with open(os.path.join(out, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    compute_cleanup()


if __name__ == "__main__":
    main()
