"""
GSM8K, grade-school math word problems with calculator annotations: HF `openai/gsm8k`, subsets
main / socratic, splits train (7,473) / test (1,319).

The reference solutions mark each calculation as <<48/2=24>>. Those become tool calls in the assistant
message: the expression as a `python` part and its result as a `python_output` part, which is how the
engine runs the calculator at inference. The final line "#### 72" holds the answer.

    from tasks.gsm8k import GSM8K
    task = GSM8K("main", "test")
    task.evaluate(task[0], "... #### 72")  # 1 or 0
"""

import re

from tasks.common import Task, load_hf_dataset

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]+>>)")
SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")


def extract_answer(text):
    """The number after '#### ' (first match, commas removed), or None. Follows the official grader."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def solution_to_parts(solution):
    """Split a solution at its <<expr=result>> annotations into text / python / python_output parts.

    Inside an annotation the last '=' separates expression and result (no '=' gives an empty result).
    Text pieces are kept even when empty, as upstream.
    """
    parts = []
    for piece in CALC_RE.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def evaluate_final_answer(conversation, response):
    """1 if the '#### n' answer in `response` equals the one ending the reference parts, else 0.

    Exact string comparison after removing commas, so "18" and "18.00" differ (as upstream).
    Shared by GSM8K and SpellingBee.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    parts = conversation["messages"][-1]["content"]
    if not isinstance(parts, list):
        raise TypeError("the reference assistant message must be a list of parts")
    reference = extract_answer(parts[-1]["text"])
    if reference is None:
        raise ValueError(f"reference answer has no '#### <number>' line: {parts[-1]['text']!r}")
    return int(extract_answer(response) == reference)


class GSM8K(Task):
    """One GSM8K subset/split as conversations whose assistant turn uses calculator tool calls."""

    eval_type = "generative"

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        self.ds = load_hf_dataset("openai/gsm8k", subset, split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_to_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation, response):
        return evaluate_final_answer(conversation, response)

    def reward(self, conversation, response):
        """RL reward: 1.0 for the right final answer, else 0.0."""
        return float(self.evaluate(conversation, response))
