"""
SyntheticArithmetic: 1- to 3-step grade-school word problems (+ - * and exact division, small numbers) made up
on the fly and solved as GSM8K's references are, with calculator tool calls and a final "#### N". It needs no
download, so it stands in for GSM8K offline (tasks.common.gsm8k_or_synthetic), and a tiny model has a chance.

    task = SyntheticArithmetic(size=1000, split="test")
    task.evaluate(task[0], "... #### 12")   # 1 or 0, exactly as GSM8K
"""

import random
import zlib

from tasks.common import FinalAnswerTask, GeneratedTask
from tasks.gsm8k import solution_to_parts

TEST_SHARE = 10  # one problem (template + numbers) in TEST_SHARE belongs to the test split

# Division is written // so that the calculator's result is an int: the engine writes str(result) as the
# tool output, and 48/2 would come back as "24.0" while the text goes on with "24".
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "//": lambda a, b: a // b}

# (name, subject pronoun, possessive)
PEOPLE = [
    ("Maya", "she", "her"), ("Tom", "he", "his"), ("Aisha", "she", "her"), ("Leo", "he", "his"),
    ("Priya", "she", "her"), ("Omar", "he", "his"), ("Grace", "she", "her"), ("Ben", "he", "his"),
    ("Sofia", "she", "her"), ("Kenji", "he", "his"), ("Lena", "she", "her"), ("Diego", "he", "his"),
    ("Zoe", "she", "her"), ("Samuel", "he", "his"), ("Nora", "she", "her"), ("Ravi", "he", "his"),
    ("Emma", "she", "her"), ("Lucas", "he", "his"), ("Hana", "she", "her"), ("Felix", "he", "his"),
    ("Chloe", "she", "her"), ("Marcus", "he", "his"), ("Ines", "she", "her"), ("Jonah", "he", "his"),
]
# (singular, plural) of things one collects or counts
ITEMS = [
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"),
    ("cookie", "cookies"), ("book", "books"), ("stamp", "stamps"), ("shell", "shells"),
    ("card", "cards"), ("balloon", "balloons"), ("cupcake", "cupcakes"), ("crayon", "crayons"),
    ("egg", "eggs"), ("flower", "flowers"), ("button", "buttons"), ("orange", "oranges"),
    ("peach", "peaches"), ("toy car", "toy cars"), ("candle", "candles"), ("muffin", "muffins"),
    ("bead", "beads"), ("pebble", "pebbles"), ("ribbon", "ribbons"), ("lemon", "lemons"),
]
CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"),
              ("crate", "crates"), ("tray", "trays"), ("tin", "tins")]
# (singular, plural) of things with a price
GOODS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("toy", "toys"),
         ("plant", "plants"), ("mug", "mugs"), ("comic", "comics"), ("scarf", "scarves"), ("kite", "kites")]
TWO_LEGGED = ["chickens", "ducks", "geese", "turkeys"]
FOUR_LEGGED = ["goats", "cows", "sheep", "pigs", "horses", "rabbits"]
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
GET_VERBS = ["finds", "buys", "is given", "wins", "picks up"]


class _Solution:
    """A GSM8K-style reference: one line per calculation, annotated <<expr=result>>."""

    def __init__(self):
        self.lines = []
        self.operands = []  # every number that enters a calculation: what makes the problem itself

    def step(self, before, a, op, b, after):  # appends `before` + "a op b = <<a op b=r>>r" + `after`; returns r
        if op == "//" and (b == 0 or a % b):
            raise ValueError(f"{a}//{b} is not an exact division")
        result = _OPS[op](a, b)
        if result < 0:
            raise ValueError(f"{a}{op}{b} is negative")
        expr = f"{a}{op}{b}"
        self.lines.append(f"{before}{expr} = <<{expr}={result}>>{result}{after}")
        self.operands += [a, b]
        return result

    def text(self, answer):
        return "\n".join(self.lines) + f"\n#### {answer}"


def _person(rng, other_than=None):
    while True:
        person = rng.choice(PEOPLE)
        if person[0] != other_than:
            return person


# -----------------------------------------------------------------------------
# Templates: each takes (rng, solution), adds its steps and returns (question, the last step's result).


def _gain(rng, s):
    (name, he, _), (_, many) = _person(rng), rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    verb = rng.choice(GET_VERBS)
    q = f"{name} has {a} {many}. Then {he} {verb} {b} more. How many {many} does {name} have now?"
    return q, s.step(f"{name} now has ", a, "+", b, f" {many}.")


def _give_away(rng, s):
    (name, _, _), (_, many) = _person(rng), rng.choice(ITEMS)
    friend = _person(rng, other_than=name)[0]
    a = rng.randint(8, 60)
    b = rng.randint(2, a - 1)
    verb = rng.choice(["gave", "sold", "lent"])
    q = f"{name} had {a} {many} and {verb} {b} of them to {friend}. How many {many} does {name} have left?"
    return q, s.step(f"{name} has ", a, "-", b, f" {many} left.")


def _groups(rng, s):
    (name, _, _), (_, many) = _person(rng), rng.choice(ITEMS)
    (box, boxes) = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} buys {a} {boxes} of {many}. Each {box} holds {b} {many}. How many {many} did {name} buy?"
    return q, s.step(f"{name} bought ", a, "*", b, f" {many}.")


def _share(rng, s):
    (name, _, _), (_, many) = _person(rng), rng.choice(ITEMS)
    k, each = rng.randint(2, 9), rng.randint(2, 12)
    total = k * each
    q = (f"{name} has {total} {many} and shares them equally among {k} friends. "
         f"How many {many} does each friend get?")
    return q, s.step("Each friend gets ", total, "//", k, f" {many}.")


def _packs_and_loose(rng, s):
    (name, he, _), (_, many) = _person(rng), rng.choice(ITEMS)
    (box, boxes) = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 8), rng.randint(2, 10), rng.randint(1, 15)
    q = (f"{name} has {a} {boxes} with {b} {many} in each {box}, and {c} more {many} that are not in a {box}. "
         f"How many {many} does {he} have in all?")
    inside = s.step(f"The {boxes} hold ", a, "*", b, f" {many}.")
    return q, s.step(f"In all {he} has ", inside, "+", c, f" {many}.")


def _change(rng, s):
    (name, he, _), (one, many) = _person(rng), rng.choice(GOODS)
    price, count = rng.randint(2, 9), rng.randint(2, 6)
    bill = next(b for b in (20, 50, 100) if b > price * count)
    q = (f"A {one} costs ${price}. {name} buys {count} {many} and pays with a ${bill} bill. "
         f"How much change does {he} get, in dollars?")
    cost = s.step(f"The {many} cost $", count, "*", price, ".")
    return q, s.step("The change is $", bill, "-", cost, ".")


def _wage(rng, s):
    (name, he, _) = _person(rng)
    rate, hours, days = rng.randint(3, 12), rng.randint(2, 6), rng.randint(2, 5)
    job = rng.choice(["walking dogs", "at a bakery", "at the library", "washing cars", "tutoring"])
    q = (f"{name} earns ${rate} an hour {job}. {he.capitalize()} works {hours} hours a day for {days} days. "
         f"How many dollars does {he} earn in total?")
    per_day = s.step(f"Each day {he} earns $", rate, "*", hours, ".")
    return q, s.step(f"Over {days} days {he} earns $", per_day, "*", days, ".")


def _reading(rng, s):
    (name, he, _) = _person(rng)
    pages, weeks = rng.randint(2, 15), rng.randint(1, 4)
    week_word = "week" if weeks == 1 else "weeks"
    q = f"{name} reads {pages} pages every day. How many pages does {he} read in {weeks} {week_word}?"
    days = s.step(f"{weeks} {week_word} is ", weeks, "*", 7, " days.")
    return q, s.step(f"{he.capitalize()} reads ", pages, "*", days, " pages.")


def _times_as_many(rng, s):
    (name, _, _), (_, many) = _person(rng), rng.choice(ITEMS)
    friend = _person(rng, other_than=name)[0]
    a, k = rng.randint(2, 15), rng.randint(2, 5)
    q = f"{name} has {a} {many}. {friend} has {k} times as many. How many {many} do they have together?"
    theirs = s.step(f"{friend} has ", a, "*", k, f" {many}.")
    return q, s.step("Together they have ", a, "+", theirs, f" {many}.")


def _fill_jars(rng, s):
    (name, he, _), (_, many) = _person(rng), rng.choice(ITEMS)
    (box, boxes) = rng.choice(CONTAINERS)
    k, each = rng.randint(2, 6), rng.randint(2, 10)
    total = k * each
    morning = rng.randint(1, total - 1)
    afternoon = total - morning
    q = (f"{name} collects {morning} {many} in the morning and {afternoon} in the afternoon. {he.capitalize()} "
         f"puts them into {k} {boxes} with the same number in each. How many {many} go in each {box}?")
    got = s.step(f"{he.capitalize()} collects ", morning, "+", afternoon, f" {many}.")
    return q, s.step(f"Each {box} gets ", got, "//", k, f" {many}.")


def _fraction_left(rng, s):
    (name, he, _), (_, many) = _person(rng), rng.choice(ITEMS)
    d, part = rng.choice(sorted(FRACTIONS)), rng.randint(2, 12)
    total = d * part
    q = f"{name} has {total} {many} and gives away {FRACTIONS[d]} of them. How many {many} does {he} keep?"
    given = s.step(f"{he.capitalize()} gives away ", total, "//", d, f" {many}.")
    return q, s.step(f"{he.capitalize()} keeps ", total, "-", given, f" {many}.")


def _garden(rng, s):
    (name, he, his) = _person(rng)
    plant = rng.choice(["tomato plants", "rose bushes", "sunflowers", "carrots", "tulips", "pepper plants"])
    rows, per_row = rng.randint(2, 8), rng.randint(3, 10)
    lost = rng.randint(1, rows * per_row - 1)
    q = (f"{name} plants {rows} rows of {plant} with {per_row} in each row. Later {lost} of them are eaten by "
         f"rabbits. How many {plant} are left in {his} garden?")
    planted = s.step(f"{he.capitalize()} plants ", rows, "*", per_row, f" {plant}.")
    return q, s.step("There are ", planted, "-", lost, f" {plant} left.")


def _legs(rng, s):
    birds, beasts = rng.choice(TWO_LEGGED), rng.choice(FOUR_LEGGED)
    b, f = rng.randint(2, 12), rng.randint(2, 12)
    place = rng.choice(["A farm", "A petting zoo", "A barn", "A field"])
    q = f"{place} has {b} {birds} and {f} {beasts}. How many legs do these animals have altogether?"
    two = s.step(f"The {birds} have ", b, "*", 2, " legs.")
    four = s.step(f"The {beasts} have ", f, "*", 4, " legs.")
    return q, s.step("Altogether there are ", two, "+", four, " legs.")


def _shopping(rng, s):
    (name, he, _), (one, many) = _person(rng), rng.choice(GOODS)
    (other, _plural) = rng.choice([g for g in GOODS if g[0] != one])
    count, price, extra = rng.randint(2, 5), rng.randint(2, 8), rng.randint(2, 15)
    money = count * price + extra + rng.randint(1, 30)
    q = (f"{name} has ${money}. {he.capitalize()} buys {count} {many} for ${price} each and a {other} for ${extra}. "
         f"How many dollars does {he} have left?")
    cost = s.step(f"The {many} cost $", count, "*", price, ".")
    spent = s.step(f"In total {he} spends $", cost, "+", extra, ".")
    return q, s.step(f"{he.capitalize()} has $", money, "-", spent, " left.")


def _buy_then_give(rng, s):
    (name, he, _), (_, many) = _person(rng), rng.choice(ITEMS)
    (box, boxes) = rng.choice(CONTAINERS)
    friend = _person(rng, other_than=name)[0]
    start, packs, per_pack = rng.randint(1, 20), rng.randint(2, 5), rng.randint(2, 10)
    give = rng.randint(1, start + packs * per_pack - 1)
    q = (f"{name} has {start} {many}. {he.capitalize()} buys {packs} {boxes} with {per_pack} {many} in each, "
         f"then gives {give} {many} to {friend}. How many {many} does {name} have now?")
    bought = s.step(f"{he.capitalize()} buys ", packs, "*", per_pack, f" {many}.")
    had = s.step(f"Then {he} has ", start, "+", bought, f" {many}.")
    return q, s.step(f"After giving some away {he} has ", had, "-", give, f" {many}.")


def _ages(rng, s):
    (name, he, _) = _person(rng)
    friend, fhe, _ = _person(rng, other_than=name)
    age, gap, years = rng.randint(5, 40), rng.randint(2, 12), rng.randint(2, 10)
    q = (f"{name} is {age} years old. {friend} is {gap} years older than {name}. "
         f"How old will {friend} be in {years} years?")
    now = s.step(f"{friend} is ", age, "+", gap, " years old now.")
    return q, s.step(f"In {years} years {fhe} will be ", now, "+", years, ".")


TEMPLATES = (_gain, _give_away, _groups, _share, _packs_and_loose, _change, _wage, _reading, _times_as_many,
             _fill_jars, _fraction_left, _garden, _legs, _shopping, _buy_then_give, _ages)


def split_of(template_name, operands):
    """The split of a problem, from its template and numbers alone (a stable hash, not hash()): the same for
    every seed, so no test problem is in any train set (names and nouns aside)."""
    key = f"{template_name}:{','.join(map(str, operands))}".encode()
    return "test" if zlib.crc32(key) % TEST_SHARE == 0 else "train"


class SyntheticArithmetic(GeneratedTask, FinalAnswerTask):
    """`size` generated arithmetic word problems of one split, shaped and scored like GSM8K."""

    def __init__(self, size=1000, split="train", seed=0, **kwargs):
        super().__init__(size, split, **kwargs)
        self.seed = seed

    def get_example(self, index):
        # A string seed: random.Random hashes it (sha512), the same on every machine and Python run.
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        while True:  # draw until the problem is one of this split's (1 in TEST_SHARE tries for test)
            template = rng.choice(TEMPLATES)
            solution = _Solution()
            question, answer = template(rng, solution)
            if split_of(template.__name__, solution.operands) == self.split:
                break
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": solution_to_parts(solution.text(answer))}]}
