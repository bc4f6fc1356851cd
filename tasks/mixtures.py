"""
The conversation mixtures of midtraining and SFT, with the offline stand-ins of tasks/common.py.

    from tasks.mixtures import midtraining_mixture, sft_mixture
    train = sft_mixture("train")          # a TaskMixture
    val = sft_mixture("val")

What each mixture teaches: general chat (SmolTalk), multiple choice (MMLU auxiliary train, questions from
ARC, MC_TEST, OBQA and RACE), arithmetic with the calculator tool (GSM8K), who the model is (identity
conversations, twice), spelling and letter counting (SimpleSpelling, SpellingBee). Midtraining and SFT
use the same tasks; SFT repeats MMLU and GSM8K (`mmlu_epochs`, `gsm8k_epochs`).

Offline, GSM8K becomes synthetic arithmetic problems, the identity file the one shipped in the repo, and
the spelling word list one built from the offline corpus; a hub dataset with no stand-in (SmolTalk, MMLU)
is left out. Each substitution or omission is logged once and listed by `tasks.common.fallbacks_used()`,
which the training scripts write into their report section.
"""

from tasks.common import DatasetUnavailableError, TaskMixture, gsm8k_or_synthetic, note_fallback
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

# Row counts of the validation mixture's slices (as upstream): MMLU test's first 5,200, GSM8K test's first 420.
VAL_MMLU_ROWS = 5200
VAL_GSM8K_ROWS = 420
# Spelling tasks are generated: their sizes are choices, not dataset sizes.
SIMPLE_SPELLING_ROWS = 200_000
SPELLING_BEE_ROWS = 80_000
VAL_SPELLING_ROWS = 256


def _optional(name, make):
    """make() -> task, or None (noted once) when the hub dataset can't be had and nothing stands in for it."""
    try:
        return make()
    except DatasetUnavailableError as e:
        note_fallback(f"missing:{name}", f"{name} unavailable offline: left out of the mixture", detail=str(e))
        return None


def _mixture(tasks, split):
    tasks = [t for t in tasks if t is not None and len(t) > 0]
    if not tasks:
        raise DatasetUnavailableError(f"no task of the {split} mixture is available; export the task datasets "
                                      "(`python -m tasks.common`) or check NANOCHAT_TASKS_DIR")
    return TaskMixture(tasks)


def _val_tasks():
    return [_optional("SmolTalk test", lambda: SmolTalk("test")),
            _optional("MMLU test", lambda: MMLU("all", "test", stop=VAL_MMLU_ROWS)),
            gsm8k_or_synthetic("test", stop=VAL_GSM8K_ROWS),
            # The spelling tasks are generated, so a held-out slice costs nothing and keeps the validation
            # mixture non-empty offline, where SmolTalk and MMLU are missing.
            SimpleSpelling(size=VAL_SPELLING_ROWS, split="test"),
            SpellingBee(size=VAL_SPELLING_ROWS, split="test")]


def midtraining_mixture(split):
    """The midtraining mixture: split "train" (~850K conversations online) or "val"."""
    if split == "val":
        return _mixture(_val_tasks(), split)
    identity = identity_conversations_path()
    return _mixture([_optional("SmolTalk train", lambda: SmolTalk("train")),
                     _optional("MMLU auxiliary_train", lambda: MMLU("auxiliary_train", "train")),
                     gsm8k_or_synthetic("train"),
                     CustomJSON(identity), CustomJSON(identity),  # two epochs of identity
                     SimpleSpelling(size=SIMPLE_SPELLING_ROWS, split="train"),
                     SpellingBee(size=SPELLING_BEE_ROWS, split="train")], split)


def sft_mixture(split, mmlu_epochs=3, gsm8k_epochs=4):
    """The SFT mixture: the midtraining tasks with MMLU x mmlu_epochs and GSM8K x gsm8k_epochs."""
    if split == "val":
        return _mixture(_val_tasks(), split)
    identity = identity_conversations_path()
    mmlu = _optional("MMLU auxiliary_train", lambda: MMLU("auxiliary_train", "train"))
    gsm8k = gsm8k_or_synthetic("train")
    return _mixture([_optional("SmolTalk train", lambda: SmolTalk("train")),
                     *[mmlu] * mmlu_epochs, *[gsm8k] * gsm8k_epochs,
                     CustomJSON(identity), CustomJSON(identity),
                     SimpleSpelling(size=SIMPLE_SPELLING_ROWS, split="train"),
                     SpellingBee(size=SPELLING_BEE_ROWS, split="train")], split)
