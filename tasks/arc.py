"""
ARC (AI2 Reasoning Challenge), grade-school science multiple choice: HF `allenai/ai2_arc`,
subsets ARC-Easy / ARC-Challenge, splits train / validation / test.

    from tasks.arc import ARC
    task = ARC("ARC-Easy", "test")
    task[0]  # {"messages": [user: render_mc(...), assistant: "B"], "letters": ["A", "B", "C", "D"]}
"""

from tasks.common import Task, load_hf_dataset, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    """One ARC subset/split. Labels come from the row: usually A-D, sometimes 1-4, 3 to 5 options."""

    eval_type = "categorical"

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.ds = load_hf_dataset("allenai/ai2_arc", subset, split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = list(row["choices"]["label"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {index}: answerKey {answer!r} is not one of the labels {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation, response):
        """True when the chosen letter is the reference answer; the caller must pick among the letters."""
        if response not in conversation["letters"]:
            raise ValueError(f"response {response!r} is not one of the letters {conversation['letters']}")
        return response == conversation["messages"][-1]["content"]
