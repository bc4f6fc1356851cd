"""
EleutherAI's lm-evaluation-harness on a nanochat model: an lm-eval model registered as `nanochat`.

    import lm_eval
    from nanochat.lm_eval_adapter import NanochatLM
    lm = NanochatLM(model=model, tokenizer=tokenizer, batch_size=8)     # or NanochatLM(source="sft") to load one
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)
    # lm-eval's own loader: simple_evaluate(model="nanochat", model_args="source=sft,model_tag=d20", ...)

Needs the `eval` extra (`uv sync --extra eval`); without it this module imports but NanochatLM refuses to be
built. `python -m scripts.lm_eval` wraps it for a checkpoint. Texts are encoded with BOS first, as our own
evaluations do; special-token names in a text (a chat-templated prompt) become the special tokens.
"""

import logging

import torch
import torch.nn.functional as F

from nanochat.batching import END, BatchScheduler
from nanochat.common import UserError
from nanochat.engine import model_device

try:
    # lm-eval fills its model registry with its own models (lazily, cheap) only while the registry is empty:
    # fill it first, or registering `nanochat` would hide `hf` and the rest.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the optional `eval` extra is missing: NanochatLM says how to install it when built
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls

logger = logging.getLogger(__name__)


class EvalExtraMissingError(UserError, ImportError):
    """lm-eval is not installed."""


def require_lm_eval():
    """Raise the one-line fix when the `eval` extra is missing."""
    if TemplateLM is object:
        raise EvalExtraMissingError("lm-evaluation-harness is not installed: run `uv sync --extra eval`")


@register_model("nanochat")
class NanochatLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and generate_until on our GPT, in batched forwards.

    Give `model` and `tokenizer`, or `source` (base, mid, sft, rl) with optional `model_tag`/`step` to load a
    checkpoint on `device`. batch_size: rows per forward pass, for log-likelihoods and for generation alike.
    """

    def __init__(self, model=None, tokenizer=None, source=None, model_tag=None, step=None, device=None, batch_size=8,
                 max_length=None, **unused):
        require_lm_eval()
        super().__init__()
        if model is None:
            from nanochat.checkpoint_manager import load_model
            from nanochat.common import autodetect_device_type

            device = device or autodetect_device_type()
            model, tokenizer, _ = load_model(source or "base", device, phase="eval", model_tag=model_tag,
                                             step=None if step in (None, "") else int(step))
        elif tokenizer is None:
            raise ValueError("NanochatLM(model=...) needs the tokenizer too")
        self.model, self.nanochat_tokenizer = model, tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.bos_text = tokenizer.decode([self.bos])
        self.batch_size = max(1, int(batch_size) if str(batch_size).isdigit() else 8)  # lm-eval's "auto" -> 8
        self._max_length = int(max_length) if max_length else model.config.sequence_len
        if unused:
            logger.info("NanochatLM ignores %s", ", ".join(sorted(unused)))

    # -- what TemplateLM needs ---------------------------------------------------

    @property
    def eot_token_id(self):
        return self.bos  # documents are separated by BOS: it ends one text and starts the next

    @property
    def prefix_token_id(self):
        return self.bos

    @property
    def max_length(self):
        return self._max_length

    @property
    def device(self):
        return model_device(self.model)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """Ids of `string`, BOS first unless add_special_tokens is False or the text already starts with BOS."""
        ids = self.nanochat_tokenizer.enc.encode(string, allowed_special="all")
        if add_special_tokens is False or string.startswith(self.bos_text):
            return ids
        return [self.bos] + ids

    def tok_decode(self, ids, **kwargs):
        return self.nanochat_tokenizer.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(sum of log-probs of the continuation, whether greedy decoding gives it)] per (key, context, continuation).

        Each row is the last max_length + 1 tokens of context + continuation (the first is only input); rows are
        right-padded (causal: padding never reaches an earlier position), longest first to pad little.
        """
        out = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        device = self.device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError("an empty continuation has no log-likelihood")
                full = (list(context) + list(continuation))[-(self.max_length + 1):]
                rows.append(full[:-1])
                spans.append((len(full) - 1 - len(continuation), full[-len(continuation):]))
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [self.bos] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
            row_idx = [r for r, (a, target) in enumerate(spans) for _ in target]
            pos_idx = [p for a, target in spans for p in range(a, a + len(target))]
            targets = torch.tensor([t for _, target in spans for t in target], dtype=torch.long, device=device)
            hidden = self.model.hidden_states(ids)  # (B, T, d)
            logits = self.model.logits(hidden[row_idx, pos_idx]).float()  # (N, V): only the scored positions
            logprobs = F.log_softmax(logits, dim=-1)
            picked = logprobs.gather(1, targets[:, None])[:, 0]
            hits = (logits.argmax(dim=-1) == targets).tolist()
            picked = picked.tolist()
            k = 0
            for i, (_, target) in zip(chunk, spans):
                n = len(target)
                out[i] = (sum(picked[k:k + n]), all(hits[k:k + n]))
                k += n
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Total log-probability of each whole text, BOS-prefixed, in disjoint windows of max_length tokens."""
        results = []
        for (text,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            results.append(sum(logprob for logprob, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm=False):
        """Continuations as gen_kwargs ask (greedy unless do_sample), cut at the first stop string. The requests share
        forward passes, batch_size rows at a time (BatchScheduler: each gets the tokens Engine.generate gives it alone);
        a request leaves the batch once its text holds a stop string or the model ends its turn."""
        scheduler = BatchScheduler(self.model, self.nanochat_tokenizer, max_batch=self.batch_size, worker=False)
        jobs = [self._submit(scheduler, context, dict(gen_kwargs)) for context, gen_kwargs in [req.args for req in requests]]
        while not all(job["request"].done.is_set() for job in jobs if job["request"] is not None):
            scheduler.step()
        scheduler.close()
        for job in jobs:
            if job["error"] is not None:
                raise job["error"]
        return [self._cut(job["text"], job["until"]) for job in jobs]

    def _submit(self, scheduler, context, gen_kwargs):
        until = gen_kwargs.get("until") or []
        job = {"until": [until] if isinstance(until, str) else list(until), "tokens": [], "text": "", "error": None,
               "request": None}
        max_new = int(gen_kwargs.get("max_gen_toks", 256))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
        max_new = min(max_new, self.max_length - len(prompt))
        if max_new <= 0:
            return job
        stops = scheduler.stop_tokens  # <|assistant_end|> and <|bos|>: delivered, but not part of the text

        def deliver(item):
            if isinstance(item, BaseException):
                job["error"] = item
            elif item is not END and item[0] not in stops:
                job["tokens"].append(item[0])
                job["text"] = self.tok_decode(job["tokens"])
                if any(stop in job["text"] for stop in job["until"]):
                    job["request"].cancel()

        job["request"] = scheduler.submit(prompt, max_tokens=max_new, temperature=temperature, deliver=deliver)
        return job

    @staticmethod
    def _cut(text, until):
        for stop in until:
            text = text.split(stop)[0]
        return text

    # -- chat ------------------------------------------------------------------

    @property
    def tokenizer_name(self):
        return "nanochat"

    def chat_template(self, chat_template=False):
        from nanochat.hf_export import CHAT_TEMPLATE

        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The prompt text our chat format gives `chat_history` (render_conversation); with add_generation_prompt
        it ends in <|assistant_start|>, else the last assistant message is left open to be continued."""
        tok = self.nanochat_tokenizer
        if add_generation_prompt:
            ids = tok.render_for_completion({"messages": list(chat_history) + [{"role": "assistant", "content": ""}]})
        else:
            ids, _ = tok.render_conversation({"messages": list(chat_history)}, max_tokens=1 << 30)
            if chat_history and chat_history[-1]["role"] == "assistant":
                ids = ids[:-1]  # no <|assistant_end|>: the reply goes on
        return tok.decode(ids)
