"""
Reinforcement learning on math word problems: on-policy REINFORCE with a per-question mean baseline.

    stream = RolloutStream(task, tokenizer, engine, examples_per_step=16, num_samples=16, device_batch_size=8, ...)
    step = TrainStep(model, optimizer, stream.micro_batches_per_step, loss_fn=policy_gradient_loss)
    TrainLoop(step=step, batches=stream, prefetch=False, ...)  # rollouts must come from the updated weights

An answer's reward is 1 if its final `#### N` is right, else 0; its advantage is the reward minus its group's
mean. No KL term, reference model or importance ratio (one update per batch of fresh samples); advantages are
not divided by their std. Sampling uses top-k while the loss uses the full softmax.
"""

import logging

import torch
import torch.distributed as dist

from nanochat.common import ConfigError, dist_world_size, get_dist_info
from nanochat.dataloader import ResumeError
from nanochat.engine import model_device, stop_tokens

log = logging.getLogger(__name__)

STATE_FORMAT = "rl-rollouts-1"


def sample_answers(engine, tokenizer, prompt, num_samples, max_tokens, temperature, top_k, seed):
    """num_samples answers to `prompt`, each (token ids after the prompt, mask, finished): mask 0 where the
    calculator wrote. The stop token that ends an answer stays, with mask 1: RL then reinforces stopping."""
    rows, masks, stops = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)], stop_tokens(tokenizer)
    for column, column_masks in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                                temperature=temperature, top_k=top_k, seed=seed):
        for row, mask, token, column_mask in zip(rows, masks, column, column_masks):
            if not (row and row[-1] in stops):  # an ended answer repeats its stop token
                row.append(token)
                mask.append(column_mask)
    return [(row, mask, bool(row) and row[-1] in stops) for row, mask in zip(rows, masks)]


PASS_AT_K = -1  # the first part of pass@k's seeds: never a step, so never a rollout's seed


def _seed(*parts):
    # Python's hash of a tuple of ints is the same in every process and run; a str's is not (PYTHONHASHSEED), and
    # pass@k once seeded with "pass@k", which made its samples, and the tests that read them, differ run to run.
    if not all(isinstance(part, int) for part in parts):
        raise TypeError(f"seed parts must be ints (a str hashes differently in every process), got {parts!r}")
    return hash(parts) & 0x7FFFFFFF


class RolloutStream:
    """Endless micro-batches of sampled answers: (inputs, (targets, advantages), state). Rank r cycles over the
    task's examples r, r + W, ...; a step takes `examples_per_step` questions over all ranks, each one group of
    `num_samples` answers cut into micro-batches of `device_batch_size` rows. targets are -1 where nothing is
    trained (prompt, tool outputs, padding). The state resumes the stream exactly and carries the last step's
    mean reward and answer length."""

    def __init__(self, task, tokenizer, engine, examples_per_step, num_samples, device_batch_size, max_new_tokens,
                 temperature, top_k, resume_state_dict=None):
        _, self.rank, _, self.world_size = get_dist_info()
        if examples_per_step % self.world_size:
            raise ConfigError(f"--examples-per-step {examples_per_step} must be divisible by the number of ranks ({self.world_size})")
        if num_samples % device_batch_size:
            raise ConfigError(f"--num-samples {num_samples} must be a multiple of --device-batch-size {device_batch_size}")
        self.task, self.tokenizer, self.engine = task, tokenizer, engine
        self.examples_per_rank = examples_per_step // self.world_size
        self.num_samples, self.device_batch_size = num_samples, device_batch_size
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.micro_batches_per_step = self.examples_per_rank * (num_samples // device_batch_size)
        self.pad = tokenizer.encode_special("<|assistant_end|>")
        self.examples_done, self.history = 0, []  # history: per step, (mean reward, mean length) of this rank
        if resume_state_dict is not None:
            state = resume_state_dict.get("ranks", [resume_state_dict])[self.rank] if "ranks" in resume_state_dict else resume_state_dict
            if state.get("format") != STATE_FORMAT or state.get("world_size") != self.world_size:
                raise ResumeError(f"the checkpoint's rollout state ({state.get('format')}, world size {state.get('world_size')}) "
                                  f"does not fit this run (world size {self.world_size}); resume with the same number of processes")
            self.examples_done = state["examples_done"]
        self._pending, self._rewards, self._lengths = [], [], []

    def state_dict(self):
        steps = self.examples_done // self.examples_per_rank
        last = self.history[-1] if self.history else (None, None)
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size, "examples_done": self.examples_done,
                "step": steps, "reward": last[0], "sequence_length": last[1]}

    def __iter__(self):
        return self

    def __next__(self):
        if not self._pending:
            self._rollout()
        inputs, targets = self._pending.pop(0)
        return inputs, targets, self.state_dict()

    @torch.no_grad()
    def _rollout(self):
        step, within = divmod(self.examples_done, self.examples_per_rank)
        index = (self.rank + self.world_size * self.examples_done) % len(self.task)
        conversation = self.task[index]
        prompt = self.tokenizer.render_for_completion(conversation)
        was_training = self.engine.model.training
        self.engine.model.eval()
        answers = []
        for sampling_step in range(self.num_samples // self.device_batch_size):
            answers += sample_answers(self.engine, self.tokenizer, prompt, self.device_batch_size, self.max_new_tokens,
                                      self.temperature, self.top_k, _seed(step, index, sampling_step))
        self.engine.model.train(was_training)
        rewards = torch.tensor([self.task.reward(conversation, self.tokenizer.decode(ids)) for ids, _, _ in answers])
        advantages = rewards - rewards.mean()
        length = max(len(prompt) + len(ids) for ids, _, _ in answers)
        ids = torch.full((len(answers), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(answers), length), dtype=torch.bool)
        for row, (tokens, token_mask, _) in enumerate(answers):
            ids[row, :len(prompt) + len(tokens)] = torch.tensor(prompt + tokens)
            mask[row, len(prompt):len(prompt) + len(tokens)] = torch.tensor(token_mask, dtype=torch.bool)
        device = model_device(self.engine.model)
        inputs = ids[:, :-1].to(device)  # (S, T-1)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1).to(device)
        advantages = advantages.to(device)
        for start in range(0, len(answers), self.device_batch_size):
            rows = slice(start, start + self.device_batch_size)
            self._pending.append((inputs[rows], (targets[rows], advantages[rows])))
        self._rewards.append(rewards.mean().item())
        self._lengths.append(float(length))
        self.examples_done += 1
        if within == self.examples_per_rank - 1:  # this rank's last question of the step
            self.history.append((sum(self._rewards) / len(self._rewards), sum(self._lengths) / len(self._lengths)))
            self._rewards, self._lengths = [], []


def policy_gradient_loss(model, inputs, targets_and_advantages):
    """-(sum over trained tokens of log p(token) x its answer's advantage) / trained tokens of the micro-batch."""
    targets, advantages = targets_and_advantages
    nll = model(inputs, targets, loss_reduction="none").view_as(targets)  # (B, T); 0 where targets == -1
    valid = (targets >= 0).sum().clamp_min(1)
    return (nll * advantages.unsqueeze(1)).sum() / valid  # nll = -log p, so this is -objective


def mean_over_ranks(values, device):
    """Average a list of floats over ranks (every rank must call it)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    if dist_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t.tolist()


@torch.no_grad()
def evaluate_pass_at_k(task, tokenizer, engine, num_examples, num_samples, max_new_tokens, temperature, top_k):
    """{k: pass@k} for k = 1..num_samples over the first `num_examples` problems (rank-strided, summed over ranks)."""
    _, rank, _, world_size = get_dist_info()
    device = model_device(engine.model)
    passed = torch.zeros(num_samples, dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.float32, device=device)
    for index in range(rank, min(num_examples, len(task)), world_size):
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        # Each problem's samples from its own seed, not one seed for all of them.
        answers = sample_answers(engine, tokenizer, prompt, num_samples, max_new_tokens, temperature, top_k, _seed(PASS_AT_K, index))
        correct = [task.reward(conversation, tokenizer.decode(ids)) > 0 for ids, _, _ in answers]
        for k in range(1, num_samples + 1):
            passed[k - 1] += float(any(correct[:k]))
        count += 1
    if dist_world_size() > 1:
        dist.all_reduce(passed, op=dist.ReduceOp.SUM)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    total = max(count.item(), 1.0)
    return {k + 1: v / total for k, v in enumerate(passed.tolist())}
