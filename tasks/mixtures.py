"""The conversation mixtures of midtraining and SFT.

    train, val = sft_mixture("train"), sft_mixture("val")  # TaskMixtures; midtraining_mixture alike

They teach general chat (SmolTalk), multiple choice (MMLU auxiliary train: ARC, MC_TEST, OBQA, RACE questions),
arithmetic with the calculator tool (GSM8K), who the model is (identity conversations, twice), spelling and
letter counting. Offline, the stand-ins of tasks/common.py replace GSM8K, the identity file and the word list,
and a hub dataset with none (SmolTalk, MMLU) is left out; each is logged once and listed by fallbacks_used().
"""

from tasks.common import DatasetUnavailableError, TaskMixture, gsm8k_or_synthetic, note_fallback
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

def _optional(name, make):
    """make() -> task, or None (noted once) when the hub dataset can't be had and nothing stands in for it."""
    try:
        return make()
    except DatasetUnavailableError as e:
        note_fallback(f"missing:{name}", f"{name} unavailable offline: left out of the mixture", detail=str(e))
        return None


def sft_mixture(split, mmlu_epochs=3, gsm8k_epochs=4):
    """The SFT mixture of `split` ("train" or "val"), with MMLU x mmlu_epochs and GSM8K x gsm8k_epochs."""
    if split == "val":
        tasks = [_optional("SmolTalk test", lambda: SmolTalk("test")),
                 _optional("MMLU test", lambda: MMLU("all", "test", stop=5200)),  # slice sizes as upstream
                 gsm8k_or_synthetic("test", stop=420),
                 # Generated, so a held-out slice costs nothing and keeps the mixture non-empty offline.
                 SimpleSpelling(size=256, split="test"),
                 SpellingBee(size=256, split="test")]
    else:
        identity = identity_conversations_path()
        mmlu = _optional("MMLU auxiliary_train", lambda: MMLU("auxiliary_train", "train"))
        gsm8k = gsm8k_or_synthetic("train")
        tasks = [_optional("SmolTalk train", lambda: SmolTalk("train")),
                 *[mmlu] * mmlu_epochs, *[gsm8k] * gsm8k_epochs,
                 CustomJSON(identity), CustomJSON(identity),  # two epochs of identity
                 SimpleSpelling(size=200_000, split="train"),  # generated: sizes are choices, not dataset sizes
                 SpellingBee(size=80_000, split="train")]
    tasks = [t for t in tasks if t is not None and len(t) > 0]
    if not tasks:
        raise DatasetUnavailableError(f"no task of the {split} mixture is available; export the task datasets "
                                      "(`python -m tasks.common`) or check NANOCHAT_TASKS_DIR")
    return TaskMixture(tasks)


def midtraining_mixture(split):
    """The midtraining mixture: the SFT tasks, each once per epoch (~850K conversations online for "train")."""
    return sft_mixture(split, mmlu_epochs=1, gsm8k_epochs=1)
