"""HumanEval, 164 Python function-completion problems checked by unit tests: HF `openai/openai_humaneval`.
evaluate() runs the model's code and the tests in the sandbox of nanochat/execution.py.

    task = HumanEval()
    task.evaluate(task[0], "```python\ndef f(x):\n    return x\n```")  # True / False
"""

import itertools
import re

from nanochat.execution import execute_code
from tasks.common import Task, load_hf_dataset

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a prompt (blank and comment lines skipped), joined by newlines."""
    lines = [line.strip() for line in prompt.split("\n")]
    code = [line for line in lines if line and not line.startswith("#")]
    return "\n".join(itertools.takewhile(lambda line: line.startswith(("import ", "from ")), code))


def extract_program(completion):
    """The first fenced code block of the completion (```python or bare ```), else the whole completion."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


class HumanEval(Task):
    """HumanEval problems: user = prompt, assistant = prompt + canonical solution."""

    eval_type = "generative"

    def __init__(self, data_files=None, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, **kwargs):
        super().__init__(**kwargs)
        self.timeout, self.maximum_memory_bytes = timeout, maximum_memory_bytes
        self.ds = load_hf_dataset("openai/openai_humaneval", "openai_humaneval", "test", data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
                "entry_point": row["entry_point"], "test": row["test"]}

    def build_program(self, conversation, completion):
        """The script evaluate() runs: the prompt's imports, the completion's code, the tests, the check call."""
        # The completion may be only a function's worth of code; the prompt's imports make it runnable.
        imports = extract_imports(conversation["messages"][0]["content"])
        return (imports + "\n\n" + extract_program(completion) + "\n\n" + conversation["test"] + "\n"
                + f"check({conversation['entry_point']})")

    def evaluate(self, conversation, completion):
        """True when the completion's code passes the problem's tests in the sandbox."""
        program = self.build_program(conversation, completion)
        return execute_code(program, timeout=self.timeout, maximum_memory_bytes=self.maximum_memory_bytes).success
