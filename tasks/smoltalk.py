"""SmolTalk, general multi-turn chat for SFT/midtraining: HF `HuggingFaceTB/smol-smoltalk`, splits train (~460K)
/ test (~24K). A conversation may open with a system message (the tokenizer merges it into the first user turn).

    SmolTalk("test")[0]  # {"messages": [...]}
"""

from tasks.common import Task, check_one_of, load_hf_dataset, validate_messages


class SmolTalk(Task):
    """smol-smoltalk conversations, validated on access. Training/validation only: no evaluate()."""

    def __init__(self, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        check_one_of("SmolTalk split", split, ("train", "test"))
        self.ds = load_hf_dataset("HuggingFaceTB/smol-smoltalk", None, split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        validate_messages(messages, f"SmolTalk row {index}", system_ok=True)
        return {"messages": messages}
