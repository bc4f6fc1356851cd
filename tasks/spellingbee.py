"""
Synthetic spelling tasks that teach a tokenized model to see letters, generated from an English word list
(downloaded once to <base_dir>/words_alpha.txt; offline, words from the offline corpus stand in).

SpellingBee: "How many r are in strawberry?" The assistant spells the word, walks it letter by letter keeping
a running count, checks with a python tool call ('strawberry'.count('r')) and ends with "#### 3".
SimpleSpelling: "Spell the word: cat" -> "cat:c,a,t".
"""

import functools
import logging
import os
import random
import re
import string

from filelock import FileLock

import nanochat.common
from nanochat.common import atomic_write, get_base_dir
from tasks.common import FinalAnswerTask, GeneratedTask, note_fallback

logger = logging.getLogger(__name__)

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORD_LIST_FILENAME = "words_alpha.txt"
OFFLINE_WORD_LIST_FILENAME = "words_offline.txt"
# Enough text for about 20k distinct words: on CPython 3.11 this is the standard library alone, read in
# a few seconds (the installed packages after it take minutes to walk and add few new words).
OFFLINE_MAX_CHARS = 32_000_000
# A word: 2-20 lowercase letters with a vowel, not glued to other identifier characters, a backslash
# (the "n" of "\nfoo") or a dot (attribute names), and not a call ("print(").
OFFLINE_WORD_RE = re.compile(r"(?<![A-Za-z0-9_\\.])[a-z]{2,20}(?![A-Za-z0-9_(])")
# Test seeds start far above any train index. (Upstream first used negative seeds, but
# random.seed(-n) == random.seed(n), so test examples repeated train examples.)
TEST_RANDOM_SEED_OFFSET = 10_000_000

USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}", "How many times is {letter} in {word}",
    "Number of {letter} in {word}", "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}",
    "{word} has how many {letter}", "In {word}, count the {letter}", "How many {letter} appear in {word}",
    "Count the {letter} in {word}", "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}", "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}", "¿Cuántas letras {letter} tiene {word}?",
    # Chinese
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}", "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
]


_DOWNLOAD_FAILED = {}  # base dir -> why the word-list download failed in this process


@functools.lru_cache(maxsize=4)
def _read_words(path):
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f)


def words_from_offline_corpus():
    """Distinct words (OFFLINE_WORD_RE) of the offline corpus's first OFFLINE_MAX_CHARS characters, in a fixed
    shuffled order: the same list wherever the same Python and packages are installed."""
    # The corpus is mostly code, so identifiers ("isinstance") come along: still fair spelling questions.
    from nanochat.offline_corpus import iter_offline_documents

    found = set()
    for text in iter_offline_documents(max_chars=OFFLINE_MAX_CHARS):
        found.update(OFFLINE_WORD_RE.findall(text))
    words = sorted(w for w in found if not set(w).isdisjoint("aeiouy"))  # sorted first: set order varies by run
    random.Random(42).shuffle(words)
    return words


def offline_word_list():
    """Path of <base_dir>/words_offline.txt, built from the offline corpus on first use (one rank builds it)."""
    path = os.path.join(get_base_dir(), OFFLINE_WORD_LIST_FILENAME)
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            logger.info("Building a word list from the offline corpus...")
            words = words_from_offline_corpus()
            if not words:
                raise ValueError("the offline corpus gave no words; place a word list at "
                                 f"{os.path.join(get_base_dir(), WORD_LIST_FILENAME)} (one word per line)")
            atomic_write(path, "\n".join(words) + "\n")
    return path


def load_words(word_list_path=None):
    """The words of `word_list_path`, else of <base_dir>/words_alpha.txt (downloaded on first use; where that
    fails, offline_word_list()'s, noted in fallbacks_used())."""
    if word_list_path is None:
        try:
            if get_base_dir() in _DOWNLOAD_FAILED:  # one failed attempt per process is enough
                raise RuntimeError(_DOWNLOAD_FAILED[get_base_dir()])
            word_list_path = nanochat.common.download_file_with_lock(WORD_LIST_URL, WORD_LIST_FILENAME, desc="word list")
        except RuntimeError as e:  # the one error the downloader raises: host unreachable or HTTP error
            _DOWNLOAD_FAILED[get_base_dir()] = str(e)
            word_list_path = offline_word_list()
            count = len(_read_words(str(word_list_path)))
            note_fallback("spelling-words",
                          f"SpellingBee/SimpleSpelling word list unavailable offline: {count:,} words from the "
                          f"offline corpus used instead",
                          f"{e}\nThe stand-in is cached at {word_list_path}. For upstream's list, put {WORD_LIST_URL} "
                          f"at {os.path.join(get_base_dir(), WORD_LIST_FILENAME)}.")
    words = _read_words(str(word_list_path))
    if not words:
        raise ValueError(f"word list {word_list_path} is empty")
    return words


def _seed(split, index):
    return index if split == "train" else TEST_RANDOM_SEED_OFFSET + index


def spell(word):
    """'cat' -> 'c,a,t'."""
    return ",".join(word)


class SpellingBee(GeneratedTask, FinalAnswerTask):
    """Count a letter in a word, by hand and then with a python tool call; `size` generated examples."""

    def __init__(self, size=1000, split="train", word_list_path=None, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = load_words(word_list_path)

    def get_example(self, index):
        # The order of rng calls is part of the data format: changing it changes every example.
        rng = random.Random(_seed(self.split, index))
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        quotes = ["", "'", '"']
        letter_quote, word_quote = rng.choice(quotes), rng.choice(quotes)
        user_msg = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user_msg += "?"
        # The manual walk: "i:c" per character, no space after the colon, so the letter is the same
        # token as in the spelled-out "w,o,r,d" form.
        walk = "".join(f"{i}:{c} hit! count={word[:i].count(letter)}\n" if c == letter else f"{i}:{c}\n"
                       for i, c in enumerate(word, start=1))
        parts = [
            {"type": "text", "text": f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual "
                                     f"approach first.\n\nFirst spell the word out:\n{word}:{spell(word)}\n\nThen count "
                                     f"the occurrences of '{letter}':\n{walk}\nThis gives us {count}."},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": user_msg}, {"role": "assistant", "content": parts}]}


class SimpleSpelling(GeneratedTask):
    """"Spell the word: cat" -> "cat:c,a,t"; `size` generated examples. Training only."""

    eval_type = "generative"

    def __init__(self, size=1000, split="train", word_list_path=None, **kwargs):
        super().__init__(size, split, **kwargs)
        # Its own fixed order (seed 42), so SimpleSpelling draws different words than SpellingBee for the same seed.
        self.words = list(load_words(word_list_path))
        random.Random(42).shuffle(self.words)

    def get_example(self, index):
        word = random.Random(_seed(self.split, index)).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{spell(word)}"}]}
