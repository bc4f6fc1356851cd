"""Conversations from a JSONL file, one JSON array of messages per line (user first, alternating, no system
message); used for nanochat's identity ("who are you?") conversations in SFT:

    CustomJSON(identity_conversations_path())
"""

import json
import logging
import os

import nanochat
from nanochat.common import get_base_dir
from tasks.common import Task, note_fallback, validate_messages

logger = logging.getLogger(__name__)

IDENTITY_CONVERSATIONS_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
DISCUSSION_URL = "https://github.com/karpathy/nanochat/discussions/139"
IDENTITY_FILENAME = "identity_conversations.jsonl"
# Written for this project: who nanochat is and what it can do, in the upstream file's format.
SHIPPED_IDENTITY_PATH = os.path.join(os.path.dirname(os.path.abspath(nanochat.__file__)), "data", IDENTITY_FILENAME)


def identity_conversations_path():
    """<base_dir>/identity_conversations.jsonl, where the run scripts download the identity data."""
    return os.path.join(get_base_dir(), IDENTITY_FILENAME)


class CustomJSON(Task):
    """Conversations of `filepath`. A missing file gives an empty task and a warning saying how to get it, except
    the base dir's identity file: then the identity conversations shipped in nanochat/data/ stand in."""

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = os.fspath(filepath)
        self.conversations = []
        if os.path.exists(self.filepath):
            self._load()
        # The name is checked first, so other missing paths never touch the base dir.
        elif (os.path.basename(self.filepath) == IDENTITY_FILENAME
              and os.path.abspath(self.filepath) == os.path.abspath(identity_conversations_path())):
            missing, self.filepath = self.filepath, SHIPPED_IDENTITY_PATH
            self._load()
            note_fallback("identity",
                          f"identity conversations: {missing} not found, the {len(self.conversations)} conversations "
                          f"shipped in nanochat/data/{IDENTITY_FILENAME} used instead",
                          f"For upstream's ~1,000 conversations: curl -L -o {missing} {IDENTITY_CONVERSATIONS_URL}")
        else:
            rule = "-" * 80
            logger.warning(
                "\n%s\nCustomJSON: %s does not exist, so this task has 0 conversations.\n"
                "Since Oct 2025 the SFT mixture includes nanochat's identity conversations; get them with\n"
                "  curl -L -o %s %s\n"
                "or write your own in the same format (see %s).\n%s",
                rule, self.filepath, self.filepath, IDENTITY_CONVERSATIONS_URL, DISCUSSION_URL, rule)

    def _load(self):
        with open(self.filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.filepath}:{lineno}"
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from e
                validate_messages(messages, where)
                self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.conversations[index]]}
