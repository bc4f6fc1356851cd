"""ARC (AI2 Reasoning Challenge), grade-school science multiple choice: HF `allenai/ai2_arc`.

    ARC("ARC-Easy", "test")[0]  # {"messages": [user: render_mc(...), assistant: "B"], "letters": ["A", "B", "C", "D"]}
"""

from tasks.common import MultipleChoiceTask, check_one_of, load_hf_dataset


class ARC(MultipleChoiceTask):
    """One subset (ARC-Easy, ARC-Challenge) and split (train, validation, test)."""

    def __init__(self, subset, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        check_one_of("ARC subset", subset, ("ARC-Easy", "ARC-Challenge"))
        check_one_of("ARC split", split, ("train", "validation", "test"))
        self.ds = load_hf_dataset("allenai/ai2_arc", subset, split, data_files=data_files)

    def mc_row(self, row, index):
        letters = list(row["choices"]["label"])  # usually A-D, sometimes 1-4, 3 to 5 options
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC row {index}: answerKey {row['answerKey']!r} is not one of the labels {letters}")
        return row["question"], letters, row["choices"]["text"], row["answerKey"], {}
