"""MMLU, 57-subject multiple choice: HF `cais/mmlu`.

    MMLU("all", "test")               # evaluation (14,042 rows); also "validation", "dev"
    MMLU("all", "auxiliary_train")    # ~100K training rows drawn from ARC, MC_TEST, OBQA, RACE
    MMLU("auxiliary_train", "train")  # the same rows through the older subset (rows wrapped in "train")
"""

from tasks.common import MultipleChoiceTask, check_one_of, load_hf_dataset

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("auxiliary_train", "validation", "dev", "test"), "auxiliary_train": ("train",)}


class MMLU(MultipleChoiceTask):
    """One MMLU subset/split; every question has exactly four choices and an integer answer 0-3."""

    letters = LETTERS

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        check_one_of("MMLU subset", subset, tuple(SPLITS))
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU subset {subset!r} has splits {SPLITS[subset]}, got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_hf_dataset("cais/mmlu", subset, split, data_files=data_files)

    def mc_row(self, row, index):
        if "train" in row and isinstance(row["train"], dict):  # the auxiliary_train subset nests each row
            row = row["train"]
        if len(row["choices"]) != len(LETTERS):
            raise ValueError(f"MMLU row {index} has {len(row['choices'])} choices, expected 4")
        answer = row["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
            raise ValueError(f"MMLU row {index}: answer must be an int 0-3, got {answer!r}")
        return row["question"], LETTERS, row["choices"], LETTERS[answer], {"subject": row["subject"]}
