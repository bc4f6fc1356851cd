"""
MuonAdamW: one optimizer for the whole GPT, on one process or many. AdamW groups (embeddings, lm_head, scalars)
and Muon groups (the transformer matrices, one group per shape, stacked (K, m, n) and updated together:
Nesterov momentum -> MuonEq -> Polar Express -> Muon+ -> NorMuon -> cautious weight decay).

No DDP wrapper: with world size W > 1, `step()` averages the gradients itself and shards the optimizer state
ZeRO-2 style, so each rank saves and loads its own shard and a resume needs the same W. With W = 1 every
collective is skipped and the same code updates full tensors.

Tests: python -m pytest tests/test_optim.py tests/test_optim_distributed.py -q
"""

import functools
import logging
import math

import torch
import torch.distributed as dist

from nanochat import common

log = logging.getLogger("nanochat.optim")

# AdamW params smaller than this are all-reduced and updated in full on every rank: sharding a handful of
# scalars would cost more in collective latency than it saves in memory.
SHARD_MIN_NUMEL = 1024

# Polar Express coefficients (Amsel et al. 2025, arXiv 2505.16932): the optimal degree-5 polynomial for each
# of 5 iterations, computed with safety factor 2e-2 and cushion 2. Iteration i applies
# X <- a*X + b*(X X^T) X + c*(X X^T)^2 X.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# Polar Express needs every singular value <= 1 before its first iteration; dividing by 1.01 * ||X||_F
# leaves a margin for rounding (1.02 before 2026-03-09; 1.01 was better in the autoresearch sweep).
POLAR_EXPRESS_NORM_MARGIN = 1.01

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")


# -----------------------------------------------------------------------------
# Kernels: pure tensor functions, eager by default, torch.compile'd on request. Inputs are updated in place.


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """One AdamW update of `p` (and its moments) in place, all math in fp32.

    p, grad, exp_avg, exp_avg_sq: same shape, any float dtype (bf16 embeddings keep bf16 moments; the
    results are rounded back to the storage dtype once, at the end). step..wd: 0-D fp32 tensors;
    `step` counts from 1 and drives the bias correction.
    """
    g = grad.float()
    # The same operations in the same order as the reference, so an fp32 run rounds as it does.
    # For fp32 storage .float() returns the tensor itself and the in-place ops update it directly.
    p32, m32, v32 = p.float(), exp_avg.float(), exp_avg_sq.float()
    p32.mul_(1 - lr * wd)  # decoupled weight decay, first, scaled by the scheduled lr
    m32.lerp_(g, 1 - beta1)
    v32.lerp_(g.square(), 1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (v32 / bias2).sqrt() + eps
    p32.add_(m32 / denom, alpha=-(lr / bias1))
    p.copy_(p32)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)


def _fused_adamw_cpu(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """`adamw_step` through PyTorch's fused CPU AdamW kernel: the same update (decoupled WD, bias correction,
    fp32 math on bf16 storage, rounded once), but one vectorised, multithreaded pass per tensor.

    The eager `adamw_step` makes ~15 full-size fp32 temporaries; on the (V, d) embedding and lm_head
    tables that was ~0.1 s per table per step on 2 cores, against ~5 ms here. `step` is the step count
    after this update (the kernel reads it, it does not increment it).
    """
    torch._fused_adamw_([p], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))], lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


def muon_eq(X):
    """MuonEq row equilibration of the (K, m, n) stack: every row rescaled to the RMS row norm ||X||_F / sqrt(m),
    so the Frobenius norm is kept but no output neuron dominates the orthogonalisation. fp32 math, X's dtype out."""
    Xf = X.float()
    target = Xf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))  # (K, 1, 1)
    rownorm = Xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (K, m, 1); all-zero rows stay zero
    return (Xf * (target / rownorm)).to(X.dtype)


def polar_express(X, steps=5):
    """Approximate the polar factor U V^T of each matrix in the (K, m, n) stack X = U S V^T (1 <= steps <= 5)."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"Polar Express has coefficients for 1..{len(POLAR_EXPRESS_COEFFS)} steps, got {steps}")
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_NORM_MARGIN + 1e-6)
    if X.size(-2) > X.size(-1):  # the Gram matrix on the short side, so it is the small one
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X.mT @ X  # (K, n, n)
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X @ X.mT  # (K, m, m)
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def normuon(g, second_moment, beta2, red_dim):
    """NorMuon variance reduction (arXiv 2510.05491) of the (K, m, n) update `g`: divide each row (red_dim=-1) or
    column (-2) by the root of an EMA of its mean square (`second_moment`, fp32, in place, no bias correction),
    then restore each matrix's Frobenius norm."""
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)  # (K, m, 1) or (K, 1, n)
    size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()  # (K, 1, 1) == ||g||_F
    second_moment.lerp_(v_mean, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * size * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (scale * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)


def muon_step(grads, params, momentum_buffer, second_moment, momentum, lr, wd, beta2, ns_steps, red_dim, ortho_dtype):
    """One Muon update of the (K, m, n) stack `params` in place; `grads` is used as scratch.
    second_moment: fp32 (K, m, 1) if red_dim == -1 else (K, 1, n). momentum, lr (shape factor included), wd,
    beta2: 0-D fp32 tensors."""
    mu = momentum.to(grads.dtype)
    # Nesterov momentum in EMA form: M <- mu*M + (1-mu)*G, then step along (1-mu)*G + mu*M.
    momentum_buffer.lerp_(grads, 1 - mu)
    g = grads.lerp_(momentum_buffer, mu)
    X = polar_express(muon_eq(g.to(ortho_dtype)), ns_steps)
    g = X.to(params.dtype)
    # Muon+ (arXiv 2602.21545): rescale to the Frobenius norm of an exactly semi-orthogonal matrix,
    # sqrt(min(m, n)), which Polar Express only approximates.
    g = g * (math.sqrt(min(g.size(-2), g.size(-1))) / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    g = normuon(g, second_moment, beta2, red_dim)
    lr = lr.to(g.dtype)
    wd = wd.to(g.dtype)
    # Cautious weight decay: only decay coordinates where the update and the weight agree in sign, so decay
    # never fights the gradient signal.
    mask = (g * params) >= 0
    params.sub_(lr * g + (lr * wd) * params * mask)


@functools.cache
def _compiled(kernel):
    # Compiled lazily (and once per kernel) so that importing this module compiles nothing. dynamic=False:
    # one graph per (shapes, dtypes, ns_steps, red_dim); hyperparameters are tensors, so they never recompile.
    return torch.compile(kernel, dynamic=False, fullgraph=True)


def muon_lr_factor(shape):
    """Shape-based LR multiplier sqrt(max(1, m/n)): tall matrices (c_fc, 4d x d) step 2x, square/wide 1x."""
    m, n = shape[-2], shape[-1]
    return math.sqrt(max(1.0, m / n))


# -----------------------------------------------------------------------------
# Small helpers


class ShardMismatchError(common.UserError, ValueError):
    """An optimizer state shard saved by another rank or under another world size."""


class _Done:
    """A collective's Work handle when there was nothing to communicate (world size 1)."""

    def wait(self):
        return True


_DONE = _Done()

_warned_replicated = set()  # shapes replicated instead of sharded: warned once per process


def _dist_info():
    """(rank, world_size) of the default process group, (0, 1) without one."""
    world_size = common.dist_world_size()
    return (dist.get_rank() if world_size > 1 else 0), world_size


def _validate_group(group):
    """Raise ValueError naming the problem if a param group is not a complete adamw/muon group."""
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}; set group['kind']")
    required = ADAMW_KEYS if kind == "adamw" else MUON_KEYS
    missing = [k for k in required if k not in group]
    if missing:
        raise ValueError(f"{kind} param group is missing {missing}; MuonAdamW has no defaults, every group must carry {list(required)}")
    params = group["params"]
    if not params:
        raise ValueError(f"{kind} param group has no parameters")
    if kind == "adamw" and not (isinstance(group["betas"], (tuple, list)) and len(group["betas"]) == 2):
        raise ValueError(f"adamw betas must be a pair (beta1, beta2), got {group['betas']!r}")
    if kind == "muon":
        shapes = {tuple(p.shape) for p in params}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"a muon group must hold 2-D matrices of one shape (they are stacked), got shapes {sorted(shapes)}; make one group per shape")
        if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)} (Polar Express coefficients), got {group['ns_steps']}")


def _require_grad(p, kind):
    if p.grad is None:
        raise RuntimeError(
            f"a {kind} parameter of shape {tuple(p.shape)} has no gradient; MuonAdamW reduces every parameter on every "
            "rank each step, so each one must take part in the loss (leave frozen parameters out of the param groups)"
        )
    return p.grad


# -----------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """AdamW + Muon in one optimizer, single-process or distributed.

    param_groups: dicts with `params`, `kind` and every hyperparameter of that kind (no defaults):
      adamw: lr, betas=(beta1, beta2), eps, weight_decay
      muon:  lr, momentum, ns_steps (1..5), beta2 (NorMuon EMA), weight_decay (cautious); params of one shape
    compile: torch.compile the kernels; None = only when every parameter is on CUDA (CPU: slow to start, same math).
    ortho_dtype: of the Muon orthogonalisation; None = bf16 when the compute dtype is bf16, else the grads' dtype.
    """

    def __init__(self, param_groups, *, compile=None, ortho_dtype=None):
        super().__init__(param_groups, defaults={})
        if compile is None:
            compile = all(p.is_cuda for group in self.param_groups for p in group["params"])
        self.compile = bool(compile)
        if ortho_dtype is None:  # None: the grads' dtype, fp32 (fp16 is not stable enough to orthogonalise in)
            ortho_dtype = torch.bfloat16 if common.get_compute_dtype()[0] == torch.bfloat16 else None
        self.ortho_dtype = ortho_dtype
        # Hyperparameters reach the kernels as reusable 0-D fp32 tensors, so LR/momentum/WD schedules never recompile.
        names = ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")
        self._hp = {name: torch.tensor(0.0, dtype=torch.float32) for name in names}

    def add_param_group(self, param_group):
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        _validate_group(group)
        super().add_param_group(group)

    def _kernel(self, kernel):
        return _compiled(kernel) if self.compile else kernel

    def _fill(self, **values):
        for name, value in values.items():
            self._hp[name].fill_(value)
        return self._hp

    # --- state_dict: per-rank shards, tagged with their rank and world size ---------------------------------

    def state_dict(self):
        """This rank's shard, tagged {"distributed": {"rank", "world_size"}}."""
        sd = super().state_dict()
        rank, world = _dist_info()
        sd["distributed"] = {"rank": rank, "world_size": world}
        return sd

    def load_state_dict(self, state_dict):
        """Load this rank's shard (saved by the same rank under the same world size) and the groups' hyperparameters."""
        rank, world = _dist_info()
        saved = state_dict.get("distributed")
        if saved is not None and (saved["rank"], saved["world_size"]) != (rank, world):
            raise ShardMismatchError(
                f"optimizer state was saved by rank {saved['rank']} of {saved['world_size']} but is being loaded on rank {rank} "
                f"of {world}; the state is sharded per rank, so resume with the same number of processes and load each rank's own file"
            )
        state_dict = {k: v for k, v in state_dict.items() if k != "distributed"}
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its key parameter's dtype; NorMuon's second moment is fp32
        # whatever the matrices are stored in, so take it from the saved copy again.
        index = 0
        for group in self.param_groups:
            first = group["params"][0]
            if group["kind"] == "muon" and first in self.state:
                src = state_dict["state"][index]["second_momentum_buffer"]
                self.state[first]["second_momentum_buffer"] = src.to(device=first.device, dtype=torch.float32, copy=True)
            index += len(group["params"])

    # --- AdamW -----------------------------------------------------------------------------------------------

    def _adamw_reduce(self, group, rank, world):
        """Phase 1 for an adamw group: launch each param's gradient reduce. Returns [(p, work, grad, rows)]."""
        launched = []
        for p in group["params"]:
            grad = _require_grad(p, "adamw")
            if world == 1:
                launched.append((p, _DONE, grad, None))
            elif p.numel() >= SHARD_MIN_NUMEL and p.shape[0] % world == 0:
                rows = p.shape[0] // world
                grad_slice = torch.empty_like(grad[:rows])
                work = dist.reduce_scatter_tensor(grad_slice, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
                launched.append((p, work, grad_slice, rows))
            else:
                if p.numel() >= SHARD_MIN_NUMEL and tuple(p.shape) not in _warned_replicated:
                    # Upstream asserts here; replicating is correct too, just costs memory on every rank.
                    log.warning("AdamW param of shape %s: dim 0 is not divisible by world size %d, so its state is "
                                "replicated instead of sharded (pad it, e.g. the vocab to a multiple of 64)", tuple(p.shape), world)
                    _warned_replicated.add(tuple(p.shape))
                work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
                launched.append((p, work, grad, None))
        return launched

    def _adamw_update(self, group, launched, rank):
        """Phase 2 for an adamw group: update the owned rows of each param, launch the all-gathers."""
        beta1, beta2 = group["betas"]
        kernel = self._kernel(adamw_step)
        gathers = []
        for p, work, grad, rows in launched:
            work.wait()
            p_view = p if rows is None else p[rank * rows:(rank + 1) * rows]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_view)
                state["exp_avg_sq"] = torch.zeros_like(p_view)
            state["step"] += 1
            # bf16 tables on CPU: the fused kernel (the eager one's fp32 temporaries cost ~0.1 s per table per step).
            # fp32 keeps the eager kernel, which rounds exactly as the reference does (docs/performance.md).
            if not self.compile and p_view.device.type == "cpu" and grad.dtype == p_view.dtype != torch.float32:
                _fused_adamw_cpu(p_view, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], beta1, beta2,
                                 group["eps"], group["weight_decay"])
            else:
                hp = self._fill(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
                kernel(p_view, grad, state["exp_avg"], state["exp_avg_sq"], hp["step"], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["wd"])
            if rows is not None:
                # In-place gather: p_view is already this rank's segment of p.
                gathers.append(dist.all_gather_into_tensor(p, p_view, async_op=True))
        return gathers, None

    # --- Muon ------------------------------------------------------------------------------------------------

    def _muon_reduce(self, group, rank, world):
        """Phase 1 for a muon group: stack the K grads (padded to chunk*W) and reduce-scatter them by chunk."""
        params = group["params"]
        grads = [_require_grad(p, "muon") for p in params]
        chunk = -(-len(params) // world)  # ceil(K / W) matrices per rank
        if world == 1:
            stacked = torch.stack(grads)  # (K, m, n), a copy: the kernel uses it as scratch
            return stacked, stacked, _DONE, chunk
        m, n = params[0].shape
        stacked = torch.zeros(chunk * world, m, n, dtype=grads[0].dtype, device=grads[0].device)
        torch._foreach_copy_(list(stacked[:len(params)].unbind(0)), grads)
        grad_chunk = torch.empty(chunk, m, n, dtype=stacked.dtype, device=stacked.device)
        work = dist.reduce_scatter_tensor(grad_chunk, stacked, op=dist.ReduceOp.AVG, async_op=True)
        return stacked, grad_chunk, work, chunk

    def _muon_update(self, group, launched, rank):
        """Phase 2 for a muon group: update the matrices this rank owns, launch the all-gather of the stack."""
        stacked, grad_chunk, work, chunk = launched
        params = group["params"]
        m, n = params[0].shape
        start = rank * chunk
        owned = min(chunk, max(0, len(params) - start))  # ranks past the end own nothing
        state = self.state[params[0]]  # Muon state is per group, keyed on its first param
        if not state:
            state["momentum_buffer"] = torch.zeros(chunk, m, n, dtype=params[0].dtype, device=params[0].device)
            moment_shape = (chunk, m, 1) if m >= n else (chunk, 1, n)
            state["second_momentum_buffer"] = torch.zeros(moment_shape, dtype=torch.float32, device=params[0].device)
        work.wait()
        # Send buffer for the gather; zero rows pad the last rank's chunk.
        updated = torch.zeros(chunk, m, n, dtype=params[0].dtype, device=params[0].device)
        if owned:
            torch._foreach_copy_(list(updated[:owned].unbind(0)), params[start:start + owned])
            hp = self._fill(momentum=group["momentum"], lr=group["lr"] * muon_lr_factor((m, n)), wd=group["weight_decay"], beta2=group["beta2"])
            self._kernel(muon_step)(
                grad_chunk[:owned], updated[:owned], state["momentum_buffer"][:owned], state["second_momentum_buffer"][:owned],
                hp["momentum"], hp["lr"], hp["wd"], hp["beta2"], group["ns_steps"], -1 if m >= n else -2,
                self.ortho_dtype or grad_chunk.dtype,
            )
        if stacked is grad_chunk:  # world size 1: `updated` already holds all K matrices
            return [], updated
        return [dist.all_gather_into_tensor(stacked, updated, async_op=True)], stacked

    # --- step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self):
        """Average gradients across ranks (if distributed) and apply one update to every parameter."""
        # Three phases so communication overlaps compute. Collectives keep their Work handles and .wait():
        # gloo (the CPU backend of our tests) has no get_future() for reduce_scatter.
        rank, world = _dist_info()
        reduce = {"adamw": self._adamw_reduce, "muon": self._muon_reduce}
        update = {"adamw": self._adamw_update, "muon": self._muon_update}
        # Phase 1: every reduce in flight before any compute, in param-group order (the same on every rank).
        launched = [reduce[g["kind"]](g, rank, world) for g in self.param_groups]
        # Phase 2: group by group, wait for its grads, update the owned shard, start gathering it.
        finished = [update[g["kind"]](g, todo, rank) for g, todo in zip(self.param_groups, launched)]
        # Phase 3: wait for the gathers; copy gathered Muon stacks back into their matrices.
        for group, (gathers, stack) in zip(self.param_groups, finished):
            for work in gathers:
                work.wait()
            if stack is not None:
                torch._foreach_copy_(group["params"], list(stack[:len(group["params"])].unbind(0)))
