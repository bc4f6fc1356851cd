"""
Conversations from a JSONL file, one JSON array of messages per line; used for nanochat's identity
("who are you?") conversations in SFT.

    from tasks.customjson import CustomJSON, identity_conversations_path
    task = CustomJSON(identity_conversations_path())

Each non-empty line: [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...],
alternating and starting with the user, at least two messages, string contents, no system message.
A missing file is not an error: the task is empty and a warning says how to get the file. The one
exception is the identity file in the base dir: when it is missing, the few dozen identity conversations
shipped with nanochat (nanochat/data/identity_conversations.jsonl) are used instead, announced once and
recorded in tasks.common.fallbacks_used().
"""

import json
import logging
import os

import nanochat
from tasks.common import Task, note_fallback

logger = logging.getLogger(__name__)

IDENTITY_CONVERSATIONS_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
DISCUSSION_URL = "https://github.com/karpathy/nanochat/discussions/139"
IDENTITY_FILENAME = "identity_conversations.jsonl"
# Written for this project: who nanochat is and what it can do, in the upstream file's format.
SHIPPED_IDENTITY_PATH = os.path.join(os.path.dirname(os.path.abspath(nanochat.__file__)), "data", IDENTITY_FILENAME)


def identity_conversations_path():
    """<base_dir>/identity_conversations.jsonl, where the run scripts download the identity data."""
    from nanochat.common import get_base_dir

    return os.path.join(get_base_dir(), IDENTITY_FILENAME)


def _is_identity_path(filepath):
    # Checked only for a file named like the identity file, so other missing paths never touch the base dir.
    if os.path.basename(filepath) != IDENTITY_FILENAME:
        return False
    return os.path.abspath(filepath) == os.path.abspath(identity_conversations_path())


def _validate(messages, where):
    if not isinstance(messages, list):
        raise ValueError(f"{where}: expected a JSON array of messages, got {type(messages).__name__}")
    if len(messages) < 2:
        raise ValueError(f"{where}: need at least 2 messages, got {len(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"{where}: message {i} is from {message['role']!r}, expected {expected!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string")


class CustomJSON(Task):
    """Conversations loaded from `filepath` (JSONL of message arrays)."""

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = os.fspath(filepath)
        self.conversations = []
        if os.path.exists(self.filepath):
            self._load()
        elif _is_identity_path(self.filepath):
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
                line = line.strip()
                if not line:
                    continue
                where = f"{self.filepath}:{lineno}"
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from e
                _validate(messages, where)
                self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.conversations[index]]}
