"""GSM8K, grade-school math word problems with calculator annotations: HF `openai/gsm8k`, subsets
main / socratic, splits train (7,473) / test (1,319).

    task = GSM8K("main", "test")
    task.evaluate(task[0], "... #### 72")  # 1 or 0
"""

import re

from tasks.common import FinalAnswerTask, check_one_of, load_hf_dataset
from tasks.common import extract_answer  # noqa: F401 (re-exported: GSM8K's grader, importable from here)

CALC_RE = re.compile(r"(<<[^>]+>>)")


def solution_to_parts(solution):
    """Text parts of a reference solution, each <<48/2=24>> annotation made a tool call as the engine runs the
    calculator at inference: the expression a `python` part, its result a `python_output` part."""
    parts = []
    for piece in CALC_RE.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")  # the last '=' splits
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})  # kept even when empty, as upstream
    return parts


class GSM8K(FinalAnswerTask):
    """One GSM8K subset/split; the reference solution ends with "#### <answer>"."""

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        check_one_of("GSM8K subset", subset, ("main", "socratic"))
        check_one_of("GSM8K split", split, ("train", "test"))
        self.ds = load_hf_dataset("openai/gsm8k", subset, split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_to_parts(row["answer"])}]}
