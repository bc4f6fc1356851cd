"""
MMLU, 57-subject multiple choice: HF `cais/mmlu`.

    MMLU("all", "test")               # evaluation (14,042 rows); also "validation", "dev"
    MMLU("all", "auxiliary_train")    # ~100K training rows drawn from ARC, MC_TEST, OBQA, RACE
    MMLU("auxiliary_train", "train")  # the same rows through the older subset (rows wrapped in "train")
"""

from tasks.common import Task, load_hf_dataset, render_mc

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("auxiliary_train", "validation", "dev", "test"), "auxiliary_train": ("train",)}


class MMLU(Task):
    """One MMLU subset/split; every question has exactly four choices and an integer answer 0-3."""

    eval_type = "categorical"
    letters = LETTERS

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be one of {tuple(SPLITS)}, got {subset!r}")
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU subset {subset!r} has splits {SPLITS[subset]}, got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_hf_dataset("cais/mmlu", subset, split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if "train" in row and isinstance(row["train"], dict):  # the auxiliary_train subset nests each row
            row = row["train"]
        choices = row["choices"]
        if len(choices) != len(LETTERS):
            raise ValueError(f"MMLU row {index} has {len(choices)} choices, expected 4")
        answer = row["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
            raise ValueError(f"MMLU row {index}: answer must be an int 0-3, got {answer!r}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "subject": row["subject"],
            "letters": LETTERS,
        }

    def evaluate(self, conversation, response):
        """True when the chosen letter is the reference answer; the caller must pick among A-D."""
        if response not in LETTERS:
            raise ValueError(f"response {response!r} is not one of the letters {LETTERS}")
        return response == conversation["messages"][-1]["content"]
