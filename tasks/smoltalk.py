"""
SmolTalk, general multi-turn chat for SFT/midtraining: HF `HuggingFaceTB/smol-smoltalk`, splits
train (~460K) / test (~24K). Conversations may start with a system message (merged into the first
user turn by the tokenizer's renderer). Training/validation only: no evaluate().

    from tasks.smoltalk import SmolTalk
    SmolTalk("test")[0]  # {"messages": [...]}
"""

from tasks.common import Task, load_hf_dataset

SPLITS = ("train", "test")


def validate_messages(messages, where):
    """Check the chat shape: optional system first, then user/assistant alternating (>= 2), string contents."""
    if not messages:
        raise ValueError(f"{where}: conversation has no messages")
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    if len(rest) < 2:
        raise ValueError(f"{where}: need at least a user and an assistant message, got {len(rest)}")
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"{where}: message {i} is from {message['role']!r}, expected {expected!r}")
    for message in messages:
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message content must be a string, got {type(message['content']).__name__}")


class SmolTalk(Task):
    """smol-smoltalk conversations, validated on access."""

    def __init__(self, split, data_files=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        self.ds = load_hf_dataset("HuggingFaceTB/smol-smoltalk", None, split, data_files=data_files)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        validate_messages(messages, f"SmolTalk row {index}")
        return {"messages": messages}
