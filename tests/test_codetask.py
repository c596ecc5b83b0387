"""The stdlib code domain: which functions become tasks (and why the rest do not), the prompts they
make, the split, and answers checked in the sandbox: parse, define, doctests, timeouts, reward."""

import json
import time
from collections import Counter
from dataclasses import replace

import pytest

from lmforge.codetask import (
    TASK_HELDOUT_FRACTION,
    CodeTask,
    check,
    check_many,
    doctest_checks,
    extract_code,
    extract_tasks,
    make_prompt,
    module_name,
    reward,
    verified_doctest_tasks,
    write_jsonl,
)
from lmforge.conversations import read_conversations
from lmforge.corpus import Document, is_heldout
from lmforge.sandbox import Limits

MODULE = '''
import math
from os import path as osp

LIMIT = 3


def clamp(x, lo=0, hi=3):
    """Return x limited to the range [lo, hi].

    >>> clamp(5, 0, 3)
    3
    >>> [clamp(v, 0, 3) for v in (-1, 2)]
    [0, 2]
    """
    low = max(lo, x)
    return min(hi, low)


def hypot2(a, b):
    """Compute the length of the hypotenuse of a right triangle."""
    s = a * a + b * b
    return math.sqrt(s)


def _first_key(mapping):
    """Return the smallest key of a non-empty mapping."""
    keys = sorted(mapping)
    return keys[0]


def __getattr__(name):
    """Look up a lazily created module attribute."""
    value = name.upper()
    return value


def no_doc(x):
    y = x + 1
    return y


def one_liner(x):
    """Return x plus one, in a single line."""
    return x + 1


def too_long(x):
    """Return x after counting up through many lines."""
    x += 1
    x += 1
    x += 1
    x += 1
    x += 1
    return x


def test_clamp():
    """Check that clamp limits values to the range."""
    assert clamp(5) == 3
    assert clamp(-1) == 0


def terse(x):
    """Do it."""
    y = x
    return y


def uses_helper(x, hi=LIMIT):
    """Return the first key of x after clamping it."""
    y = clamp(x)
    return _first_key({y: 1})


def base(p):
    """Return the last component of the path p."""
    parts = osp.split(p)
    return parts[1]


@staticmethod
def decorated(x):
    """Return x unchanged by the decorator here."""
    y = x
    return y


async def fetch(x):
    """Fetch x over the network, asynchronously."""
    y = x
    return y


if math.pi > 3:
    def variant(x):
        """Return x on platforms where pi is large."""
        y = x
        return y


class Box:
    def size(self):
        """Return the number of items in the box."""
        n = len(self.items)
        return n
'''


def module_docs():
    return [Document("pkg/mod.py", MODULE), Document("pkg/copy_of_mod.py", MODULE),
            Document("pkg/tests/test_mod.py", MODULE), Document("notes.txt", "def f(): pass"),
            Document("pkg/broken.py", "def f(:\n")]


def test_extraction_keeps_the_right_functions_and_counts_every_drop():
    counts = Counter()
    tasks = extract_tasks(module_docs(), max_lines=5, counts=counts)
    assert [t.id for t in tasks] == ["pkg/mod.py::clamp", "pkg/mod.py::hypot2", "pkg/mod.py::_first_key",
                                     "pkg/mod.py::base"]
    per_file = {"dunder or mangled name": 1, "no docstring": 1, "body too short": 1, "body too long": 1,
                "test name": 1, "summary too short": 1, "uses module-level names": 1, "decorated": 1,
                "async": 1, "conditional def": 1, "method (needs its class)": 1}
    # two copies of the module were parsed: the second one's kept functions are duplicates
    assert counts == Counter({**{k: 2 * v for k, v in per_file.items()}, "duplicate": 4, "kept": 4,
                              "functions considered": 30, "files parsed": 2, "file: test path": 1,
                              "file: not python": 1, "file: does not parse": 1})
    clamp, hypot2, _, base = tasks
    assert clamp.signature == "clamp(x, lo=0, hi=3)" and clamp.name == "clamp"
    assert clamp.summary == "Return x limited to the range [lo, hi]."
    assert clamp.solution.startswith('def clamp(x, lo=0, hi=3):\n    """Return x limited')
    assert clamp.solution.endswith("    return min(hi, low)\n")
    assert clamp.doctests == ">>> clamp(5, 0, 3)\n3\n>>> [clamp(v, 0, 3) for v in (-1, 2)]\n[0, 2]\n"
    # the imports a function needs come with it, so the solution runs on its own
    assert hypot2.solution.startswith("import math\n\n\ndef hypot2(a, b):") and hypot2.doctests == ""
    assert base.solution.startswith("from os import path as osp\n\n\ndef base(p):")
    # with self_contained=False the function that calls its module's helpers is kept as well
    loose = extract_tasks(module_docs()[:1], max_lines=5, self_contained=False)
    assert "uses_helper" in [t.name for t in loose] and len(loose) == 5


def test_prompts_read_as_sentences():
    tasks = {t.name: t for t in extract_tasks(module_docs()[:1], max_lines=5)}
    assert tasks["clamp"].prompt == "Write a Python function `clamp(x, lo=0, hi=3)` that returns x limited " \
                                    "to the range [lo, hi]."
    assert tasks["hypot2"].prompt.startswith("Write a Python function `hypot2(a, b)` that computes the length")
    assert make_prompt("f(x)", "Copy x and return the copy:") == "Write a Python function `f(x)` that copies x " \
                                                                 "and returns the copy."
    assert make_prompt("f(x)", "Recursively walk x") == "Write a Python function `f(x)` that recursively walks x."
    assert make_prompt("f(x)", "Returns True if x is odd.") == "Write a Python function `f(x)` that returns True " \
                                                               "if x is odd."
    assert make_prompt("f(x)", "Do the thing. Then return it.") == "Write a Python function `f(x)` that does the " \
                                                                   "thing. Then return it."
    # not a verb (or a verb used as a noun): quoted after a colon rather than mangled
    assert make_prompt("f(x)", "Same as g, but faster.") == "Write a Python function `f(x)` matching this " \
                                                            "description: Same as g, but faster."
    assert make_prompt("f(x)", "List of the names in x") == "Write a Python function `f(x)` matching this " \
                                                            "description: List of the names in x."


def test_summary_is_the_first_paragraph_that_says_something():
    long = " ".join(["word"] * 50)
    text = f'''
def getopt(args, options):
    """getopt(args, options) -> opts, args

    Parse command line options and parameter list.
    Only short options are supported.

    Long options come later.
    """
    opts = []
    return opts, args


def lengthy(x):
    """Return x doubled, which is the first sentence. Then {long}.

    More here.
    """
    y = x
    return 2 * y


def rambling(x):
    """Return x {long} {long}."""
    y = x
    return y
'''
    counts = Counter()
    tasks = {t.name: t for t in extract_tasks([Document("m.py", text)], counts=counts)}
    assert tasks["getopt"].summary == "Parse command line options and parameter list. Only short options are supported."
    assert tasks["lengthy"].summary == "Return x doubled, which is the first sentence."
    assert "rambling" not in tasks and counts["summary too long"] == 1


def test_split_holds_out_files_the_corpus_holds_out_and_a_hash_slice_of_tasks():
    ids = [f"pkg/mod{i}.py" for i in range(200)]
    held = next(i for i in ids if is_heldout(i))
    sliced = next(i for i in ids if not is_heldout(i) and is_heldout(f"{i}::limit", TASK_HELDOUT_FRACTION))
    kept = next(i for i in ids if not is_heldout(i) and not is_heldout(f"{i}::bound", TASK_HELDOUT_FRACTION))
    docs = [Document(held, MODULE), Document(sliced, MODULE.replace("clamp", "limit")),
            Document(kept, MODULE.replace("clamp", "bound"))]
    tasks = {t.id: t for t in extract_tasks(docs, max_lines=5)}
    assert tasks[f"{held}::clamp"].split == "val" and tasks[f"{held}::clamp"].heldout_file
    assert {t.split for i, t in tasks.items() if i.startswith(held)} == {"val"}
    assert tasks[f"{sliced}::limit"].split == "val" and not tasks[f"{sliced}::limit"].heldout_file
    assert tasks[f"{kept}::bound"].split == "train" and not tasks[f"{kept}::bound"].heldout_file


def test_jsonl_rows_are_chat_conversations_sft_reads(tmp_path):
    tasks = extract_tasks(module_docs(), max_lines=5)
    path = tmp_path / "code.jsonl"
    assert write_jsonl(tasks, path) == len(tasks)
    conversations, _, _ = read_conversations(path, on_error="raise")
    assert [c[0]["content"] for c in conversations] == [t.prompt for t in tasks]
    assert [c[1]["content"] for c in conversations] == [t.solution for t in tasks]


def test_extract_code_takes_fenced_or_bare_code():
    code = "def f(x):\n    return x\n"
    assert extract_code(code) == code
    assert extract_code(f"Here it is:\n```python\n{code}```\nIt returns x.") == code
    assert extract_code(f"```\n{code}```") == code
    assert extract_code(f"```py\n{code}") == code  # the answer ran out before the closing fence
    assert extract_code(f"```python\nimport os\n```\nthen\n```python\n{code}```") == "import os\n" + code
    assert extract_code(f"```text\nusage\n```\n```python\n{code}```") == code  # python blocks preferred


@pytest.fixture(scope="module")
def clamp_task():
    return extract_tasks(module_docs()[:1], max_lines=5)[0]


FAST = Limits(timeout_s=2.0, cpu_s=2)


def test_check_runs_doctests_and_reward_orders_answers(clamp_task):
    answers = {
        "correct": "```python\ndef clamp(x, lo=0, hi=3):\n    return max(lo, min(hi, x))\n```",
        "half": "def clamp(x, lo=0, hi=3):\n    return min(hi, x)\n",  # passes the first example only
        "wrong": "def clamp(x, lo=0, hi=3):\n    return x\n",
        "crashes": "import nothing_of_that_name\ndef clamp(x, lo=0, hi=3):\n    return x\n",
        "other name": "def limit(x, lo=0, hi=3):\n    return max(lo, min(hi, x))\n",
        "no parse": "def clamp(x, lo=0, hi=3)\n    return x\n",
    }
    results = dict(zip(answers, check_many([clamp_task] * len(answers), list(answers.values()), limits=FAST)))
    assert results["correct"].passed_doctests and results["correct"].reason == "ok"
    assert (results["half"].num_doctests, results["half"].doctests_passed) == (2, 1)
    assert results["wrong"].doctests_passed == 0 and not results["wrong"].passed_doctests
    assert "ModuleNotFoundError" in results["crashes"].reason and results["crashes"].doctests_passed == 0
    assert results["other name"].parses and not results["other name"].defines
    assert not results["no parse"].parses
    scores = {k: reward(r) for k, r in results.items()}
    assert scores == {"correct": 1.0, "half": 0.75, "wrong": 0.5, "crashes": 0.5, "other name": 0.25,
                      "no parse": 0.0}
    # the reference solution itself passes; without running, nothing is credited beyond form
    assert check(clamp_task, clamp_task.solution, limits=FAST).passed_doctests
    assert reward(check(clamp_task, clamp_task.solution, run_doctests=False)) == 0.5


def test_only_examples_that_check_the_answer_count(clamp_task):
    doctests = (">>> import math\n>>> x = 5\n>>> clamp(x)\n3\n>>> assert clamp(-1) == 0\n"
                ">>> clamp(None)\nTraceback (most recent call last):\nTypeError: ...\n")
    # the import and the assignment set the stage; the rest expect output, call clamp, or expect an error
    assert doctest_checks(doctests, "clamp") == [2, 3, 4]
    task = replace(clamp_task, doctests=doctests)
    identity, no_floor = check_many([task] * 2, ["def clamp(x, lo=0, hi=3):\n    return x\n",
                                                 "def clamp(x, lo=0, hi=3):\n    return min(hi, x)\n"], limits=FAST)
    assert (identity.num_doctests, identity.doctests_passed) == (3, 0)  # the setup lines earn it nothing
    assert reward(identity) == 0.5
    assert no_floor.doctests_passed == 2 and reward(no_floor) == pytest.approx(0.5 + 0.5 * 2 / 3)  # not clamp(-1)


def test_a_hanging_or_lying_answer_fails_without_hanging(clamp_task):
    hang = "def clamp(x, lo=0, hi=3):\n    while True:\n        pass\n"
    # prints what a report might look like and leaves before the runner can write the real one
    forge = ('import os\nprint(\'{"attempted": 2, "failed": 0, "error": "", "failure": ""}\')\n'
             "def clamp(x, lo=0, hi=3):\n    return x\nos._exit(0)\n")
    start = time.perf_counter()
    hung, forged = check_many([clamp_task, clamp_task], [hang, forge], limits=Limits(timeout_s=1.0, cpu_s=1))
    assert time.perf_counter() - start < 8
    assert hung.defines and hung.doctests_passed == 0 and "timeout" in hung.reason
    assert forged.doctests_passed == 0 and reward(forged) == 0.5


def test_code_with_quotes_backslashes_and_unicode_reaches_the_sandbox_intact():
    solution = ('def tag(s):\n    """Wrap s in quotes.\n\n    >>> print(tag("café"))\n    \'\'\'café\\\\n\'\'\'\n'
                '    """\n    q = "\'\'\'"\n    return q + s + "\\\\n" + q\n')
    task = CodeTask(id="m.py::tag", name="tag", signature="tag(s)", summary="Wrap s in quotes.", prompt="",
                    solution=solution, doctests=">>> print(tag('café'))\n'''café\\n'''\n", split="train")
    assert check(task, solution, limits=FAST).passed_doctests


def test_verified_tasks_drop_doctests_that_need_their_module(clamp_task):
    needs_module = '''
LIMIT = 3


def clip(x, hi):
    """Return x, but no larger than hi.

    >>> clip(7, LIMIT)
    3
    """
    y = min(x, hi)
    return y
'''
    tasks = extract_tasks([Document("pkg/clip.py", needs_module)]) + [clamp_task]
    assert [t.name for t in tasks] == ["clip", "clamp"] and tasks[0].doctests
    counts = Counter()
    assert verified_doctest_tasks(tasks, limits=FAST, counts=counts) == [clamp_task]
    assert counts["verified"] == 1 and sum(counts.values()) == 2


MEDIAN_LOW = ("def median_low(data):\n    data = sorted(data)\n    if not data:\n"
              "        raise StatisticsError('no median for empty data')\n    return data[(len(data) - 1) // 2]\n")


def test_doctests_run_in_their_modules_globals_and_only_the_answer_answers_to_the_name():
    doctests = (">>> median_low([5, 1, 7, 3])\n3\n>>> try:\n...     median_low([])\n"
                "... except StatisticsError as e:\n...     print(e)\nno median for empty data\n")
    task = CodeTask(id="stdlib/statistics.py::median_low", name="median_low", signature="median_low(data)",
                    summary="Return the low median.", prompt="", solution=MEDIAN_LOW, doctests=doctests,
                    split="val", module="statistics")
    answers = {
        "reference": MEDIAN_LOW,  # raises the module's StatisticsError, which the doctest catches by name
        "wrong": "def median_low(data):\n    return sorted(data)[0]\n",
        # defines the name, then takes the stdlib's own: the reward is for writing it, not importing it
        "imports": "def median_low(data):\n    return 0\nfrom statistics import median_low\n",
    }
    results = dict(zip(answers, check_many([task] * 3, list(answers.values()), limits=FAST)))
    assert results["reference"].passed_doctests
    assert results["wrong"].doctests_passed == 0
    assert results["imports"].defines and results["imports"].doctests_passed == 0
    assert "not the answer's own function" in results["imports"].reason
    alone = replace(task, module="")  # the same task without its module's globals
    assert not check(alone, MEDIAN_LOW, limits=FAST).passed_doctests
    missing = replace(task, module="no_module_of_that_name")
    assert "importing no_module_of_that_name" in check(missing, MEDIAN_LOW, limits=FAST).reason
    # doctests that never call the function pass any answer: not a fair check, so not verified
    idle = replace(task, id="stdlib/statistics.py::idle", doctests=">>> 1 + 1\n2\n")
    counts = Counter()
    assert verified_doctest_tasks([task, alone, idle], limits=FAST, counts=counts) == [task]
    assert counts == {"verified": 1, "failed doctests": 1, "doctests pass without the function": 1}


def test_module_names_of_corpus_files():
    assert module_name("stdlib/statistics.py") == "statistics"
    assert module_name("stdlib/importlib/metadata/__init__.py") == "importlib.metadata"
    assert module_name("stdlib/json/tool.py") == "json.tool"
    for acts_or_not_stdlib in ("stdlib/antigravity.py", "stdlib/this.py", "stdlib/venv/__main__.py",
                               "stdlib/lib2to3/tests/data/bom-0.py", "pkg/mod.py", "stdlib/site-x/y.py"):
        assert module_name(acts_or_not_stdlib) == "", acts_or_not_stdlib
    source = ('"""Doc."""\n\ndef f(x):\n    """Return x plus one, as written.\n\n    >>> f(1)\n    2\n    """\n'
              '    y = x + 1\n    return y\n\n\n'
              'def g(x):\n    """Return x minus one, as written."""\n    y = x - 1\n    return y\n')
    f, g = extract_tasks([Document("stdlib/mod.py", source)])
    assert (f.module, g.module) == ("mod", "")  # only a task with doctests runs them in its module


def test_the_stdlib_gives_hundreds_of_tasks():
    counts = Counter()
    tasks = extract_tasks(counts=counts)  # about 4 s: every stdlib module parsed once
    splits = Counter(t.split for t in tasks)
    assert splits["train"] >= 300 and splits["val"] >= 30
    assert len({t.id for t in tasks}) == len(tasks) == counts["kept"]
    assert sum(bool(t.doctests) for t in tasks) >= 5
    assert all(t.prompt.startswith(f"Write a Python function `{t.signature}`") for t in tasks)
    assert json.dumps([t.solution for t in tasks])  # plain text, no surrogates
