"""The built-in code domain for post-training: stdlib functions to write from a signature and a summary.

Every function the default corpus already holds is a small instruction-following example:

    user:      Write a Python function `multimode(data)` that returns a list of the most frequently
               occurring values.
    assistant: from collections import Counter
               def multimode(data):
                   '''Return a list of the most frequently occurring values. ... >>> multimode('aabbbbbbbbcc') ...'''
                   counts = Counter(iter(data))
                   ...

`extract_tasks` turns the stdlib sources (or any `Document`s) into `CodeTask`s; `to_messages` /
`write_jsonl` make SFT rows of them; `check` scores a model's answer to one (does it parse, does it
define the function, do the docstring's doctests pass), `reward` shapes that into [0, 1] for RL, and
answers that fail become DPO's rejected side. Generated code is only ever *executed* in
`lmforge.sandbox`; this module only parses it (`ast.parse` runs nothing).

The split: a task is "val" when its file is held out by the corpus (`corpus.is_heldout` of the
document id: pretraining never saw that file), or else when its own id falls in a TASK_HELDOUT_FRACTION
hash slice. The corpus holds out only 2% of files, too few tasks to measure on, so most val tasks are
functions whose source *was* in the pretraining data: val measures answering unseen *prompts* in
chat form (base and fine-tuned models alike had the same chance to learn the code), not writing
code never seen. `heldout_file` on a task says which kind it is.

Selection rules, each counted by reason in `counts` (nothing is dropped silently). The functions
considered are the defs in module and class bodies (also under a module-level if/try/with); a def
inside a function is part of that function.
  files    not a `.py` file (the pydoc topics are prose); a path containing "test" (test suites,
           unittest/doctest themselves, idle_test, lib2to3's test data: their functions are test
           cases, not library code with a spec); a file that does not parse on this Python.
  method   needs its class (and `self`): not writable, or runnable, alone.
  conditional def  a def under a module-level if/try is one of several platform variants.
  async    the doctest runner calls plain functions; async code needs an event loop to check.
  decorated  a decorator changes what the name means (caches, dispatch, context managers) and
           usually comes from the module.
  dunder or mangled name  module-level `__getattr__`/`__dir__` are protocol hooks, not tasks.
           Single-underscore helpers are kept: many are small, documented and self-contained.
  test name  `test*` functions are tests even outside test files.
  no docstring / no summary  the docstring is the spec the prompt is made of (one that opens with
           a doctest, or only restates the signature, has no summary to ask for).
  summary too short (< min_summary_words words) / too long (its first sentence > max_summary_chars):
           a prompt must say what to write, in a sentence or two.
  body too short / too long  2..max_lines lines after the docstring: a one-liner is a lookup, not
           a task; a long function is beyond what a small model writes in one answer.
  uses module-level names  the function (or a default in its signature) reads a name its module
           defines (a helper, a constant, a global) that the prompt never mentions, so its solution
           does not run alone and answers are not writable from the prompt. Imports are fine: the
           ones the function needs are put before it in the solution. `self_contained=False` keeps
           these (about three times as many tasks, for SFT volume).
  does not parse alone  the solution text (imports + function) must parse on its own.
  duplicate  a (name, summary) pair seen before, in corpus order: the first is kept, so the same
           function vendored in two files is never one train and one val task.

Measured on CPython 3.11.7 (about 5 s for `extract_tasks()`: every non-test stdlib module parsed once):
  extract_tasks()                     367 tasks: 325 train, 42 val (2 from held-out files); 12 with
                                      doctests (all train), all 12 verified (`verified_doctest_tasks`)
  extract_tasks(self_contained=False) 1157 tasks: 1032 train, 125 val (7 from held-out files); 43 with
                                      doctests (4 val), 37 verified (all 4 val); 16 would verify with
                                      their answer's globals alone, none of them val
  of 15527 functions in 717 parsed files (1041 test files and 79 non-.py documents skipped): 12197
  methods, 1249 without docstring, 800 using module-level names, 257 bodies too short, 236 too long,
  156 conditional defs, 79 summaries too short, 11 too long, 35 without a summary, 62 decorated,
  40 test names, 19 dunders, 15 async, 4 duplicates.
The stdlib has few doctests (85 module-level functions carry any), so the doctest reward covers few
tasks: the rest are scored on form only. A stdlib task's doctests run in a copy of its module's globals,
as the stdlib's own doctests do (`doctest.testmod`): `statistics.median`'s examples need the module's
`StatisticsError`, and an answer may use the helpers the module has.
"""

from __future__ import annotations

import ast
import builtins
import doctest
import json
import re
import secrets
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge import sandbox
from lmforge.common import atomic_write_text
from lmforge.corpus import Corpus, Document, is_heldout

TASK_HELDOUT_FRACTION = 0.1  # of tasks from files the corpus trains on

@dataclass(frozen=True)
class CodeTask:
    id: str  # "<doc id>::<qualname>": stable across runs and machines with the same stdlib
    name: str  # the function's name
    signature: str  # "name(a, b=1, *args)": the arguments as written (ast.unparse), no return annotation
    summary: str  # the docstring's first paragraph (its leading sentences, <= max_summary_chars)
    prompt: str  # the user message
    solution: str  # the imports the function needs, then its source with the docstring: what SFT trains on
    doctests: str  # the docstring's `>>>` examples as a runnable doctest text ("" if none)
    split: str  # "train" or "val" (see the module docstring)
    heldout_file: bool = False  # its file is in the corpus's held-out split (pretraining never saw it)
    module: str = ""  # the module whose globals its doctests run in ("statistics"); "": the answer's own only


# ----------------------------------------------------------------------------- extraction

_BUILTINS = frozenset(dir(builtins)) | {"__name__", "__file__", "__doc__", "__debug__"}
# A paragraph that only restates the call ("getopt(args, options[, long_options]) -> opts, args"),
# as old C-style docstrings open.
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
# Sentence ends: after . ! ? and before a capital, not after "e.g." / "i.e." / "etc.".
_SENTENCE_END = re.compile(r"(?<![ .]e\.g\.)(?<!i\.e\.)(?<!etc\.)(?<=[.!?])\s+(?=[A-Z`'\"(])")

# Imperative verbs that open stdlib summaries (PEP 257's "Return the ...", measured on the stdlib's
# first words): in the prompt they become third person ("... that returns the ..."), also after an
# adverb ("Recursively copy" -> "that recursively copies"). A verb followed by "of" is a noun
# ("List of names"). A summary that opens with anything else ("Same as ...", "A ...") is quoted
# after a colon instead.
_VERBS = frozenset("""
    accept acquire add allow append apply ask attempt bootstrap build calculate call cancel check clean
    clear close collapse collect combine compare compile compose compress compute configure construct
    convert copy count create customize decide decode decompress define delete deserialize detect
    determine disable disassemble display divide do draw dump emit enable encode ensure escape evaluate
    execute exit expand extend extract fetch fill filter find fix flatten flush format generate get guess
    handle hash ignore import include increment initialize insert install interleave invoke iterate join
    keep launch list load locate log make map match merge modify move normalize obtain open override
    pack page parse perform pop prepare prepend print process produce prompt push put quote raise read
    recalculate receive reduce register reload remove rename render replace represent request reset
    resolve restore retrieve return reverse rewrite run save scale scan schedule search select send
    serialize set shift show shut skip sort split start stop store strip submit substitute summarize swap
    take tally test tokenize transform translate trim truncate try turn uninstall unpack unquote unregister
    unwrap update use validate verify visit wait walk warn wrap write yield
""".split())


def _third_person(verb: str) -> str:
    """return -> returns, copy -> copies, do -> does, byte-compile -> byte-compiles."""
    head, _, last = verb.rpartition("-")
    if re.search(r"(s|sh|ch|x|z|o)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head}-{last}" if head else last


def _verb_of(word: str) -> str | None:
    """The third-person form of a summary's first word when it is an imperative (or already third-person)
    verb from _VERBS, else None. The verb of a hyphenated word is its last part (Byte-compile)."""
    lower = word.lower()
    last = lower.rpartition("-")[2]
    if last in _VERBS:
        return lower[: len(lower) - len(last)] + _third_person(last)
    for stem in (last[:-1], last[:-2], last[:-3] + "y" if last.endswith("ies") else ""):
        if stem in _VERBS and _third_person(stem) == last:
            return lower
    return None


def make_prompt(signature: str, summary: str) -> str:
    """The user message: "Write a Python function `sig` that returns ..." for a summary that opens with
    a verb; otherwise the summary follows a colon, so the sentence never reads as broken English."""
    text = summary.rstrip()
    if text.endswith((":", ",", ";")):
        text = text[:-1]
    if not text.endswith((".", "!", "?")):
        text += "."
    words = text.split(" ")
    adverb = ""
    if len(words) > 1 and re.fullmatch(r"[A-Z][a-z]+ly", words[0]) and _verb_of(words[0]) is None:
        adverb, words = words[0].lower() + " ", words[1:]  # "Recursively copy"
    first, rest = words[0], " ".join(words[1:])
    is_word = re.fullmatch(r"[A-Za-z][a-z]*(-[a-z]+)*", first) and not rest.startswith("of ")
    verb = _verb_of(first) if is_word else None
    if verb is not None:
        # "Find and load the module" -> "finds and loads the module": verbs joined to the first one,
        # in its sentence only (later sentences stay imperative, as written)
        head, *tail = _SENTENCE_END.split(rest, maxsplit=1)
        head = re.sub(r"\b(and|or|then) ([a-z]+)\b(?! of\b)",
                      lambda m: f"{m[1]} {_third_person(m[2]) if m[2] in _VERBS else m[2]}", head)
        rest = " ".join([head, *tail])
        return f"Write a Python function `{signature}` that {adverb}{verb} {rest}".rstrip()
    return f"Write a Python function `{signature}` matching this description: {text}"


def _summary(docstring: str, max_chars: int) -> tuple[str | None, str]:
    """(summary, "") or (None, why not). The summary is the first paragraph that says something (not a
    signature line), whitespace normalised; when longer than max_chars, its leading sentences that fit."""
    for paragraph in re.split(r"\n\s*\n", docstring):
        text = " ".join(paragraph.split())
        if not text or _SIGNATURE_LINE.match(text):
            continue
        if text.startswith(">>>"):
            return None, "no summary"
        if len(text) <= max_chars:
            return text, ""
        kept = ""
        for sentence in _SENTENCE_END.split(text):
            if len(kept) + len(sentence) + 1 > max_chars:
                break
            kept = f"{kept} {sentence}".strip()
        return (kept, "") if kept else (None, "summary too long")
    return None, "no summary"


def doctest_text(docstring: str) -> str:
    """The docstring's examples as a clean doctest text (no prose, no indentation), examples marked
    +SKIP left out. '' if there are none. Parsing here executes nothing."""
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:  # malformed examples (bad indentation): not runnable as written
        return ""
    blocks = []
    for ex in examples:
        if ex.options.get(doctest.SKIP):
            continue
        lines = ex.source.rstrip("\n").split("\n")
        source = "\n".join([">>> " + lines[0]] + ["... " + line for line in lines[1:]])
        blocks.append(source + "\n" + ex.want)
    return "".join(blocks)


def doctest_checks(text: str, name: str) -> list[int]:
    """Which of a doctest text's examples check an answer: those that expect output or an exception, or
    that call the function (`assert get_args(int) == ()`). The rest set the stage (`from decimal import
    Decimal as D`, `data = [...]`): they pass for any answer that runs, so they earn no reward."""
    examples = doctest.DocTestParser().get_examples(text) if text else []
    calls = re.compile(rf"\b{re.escape(name)}\b")
    return [i for i, ex in enumerate(examples) if ex.want or ex.exc_msg is not None or calls.search(ex.source)]


def _bound_names(func: ast.AST) -> set[str]:
    """Names the function binds itself: parameters, assignments, loop/with/except targets, nested defs,
    local imports (scoping simplified: a name bound anywhere in it counts as local everywhere)."""
    bound = set()
    for node in ast.walk(func):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return bound


def _free_names(func: ast.FunctionDef) -> set[str]:
    """Names the function reads from its module: loaded, not bound inside, not builtins."""
    loaded = {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    declared_global = {name for n in ast.walk(func) if isinstance(n, ast.Global) for name in n.names}
    return (loaded - (_bound_names(func) - declared_global) - _BUILTINS) | declared_global


def _module_imports(tree: ast.Module) -> dict[str, str]:
    """name bound by a top-level absolute import -> one import statement that binds it."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault((a.asname or a.name).split(".")[0], f"import {ast.unparse(a)}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            for a in node.names:
                if a.name != "*":
                    found.setdefault(a.asname or a.name, f"from {node.module} import {ast.unparse(a)}")
    return found


def _function_nodes(body: list[ast.stmt], where: str = "module"):
    """The functions a module's statements define, as (node, where): "module" for a def directly in the
    module, "method" for one in a class body, "conditional" for one under a module-level if/try/with/for.
    Only statements are walked, not function bodies: a def inside a function is part of that function."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, where
        elif isinstance(node, ast.ClassDef):
            yield from _function_nodes(node.body, "method")
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _function_nodes(inner, "conditional" if where == "module" else where)


# Modules that act when imported (open a browser, print the Zen, run a program): their tasks' doctests
# run against the answer alone.
_ACTS_ON_IMPORT = frozenset({"antigravity", "this"})


def module_name(doc_id: str) -> str:
    """The importable name of a default-corpus stdlib file ("stdlib/importlib/metadata/__init__.py" ->
    "importlib.metadata"); "" for any other document, and for modules that act when imported."""
    if not doc_id.startswith("stdlib/") or not doc_id.endswith(".py"):
        return ""
    name = doc_id.removeprefix("stdlib/").removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    acts = name in _ACTS_ON_IMPORT or name.endswith("__main__")
    return "" if acts or not all(part.isidentifier() for part in name.split(".")) else name


def _tasks_of_file(doc: Document, tree: ast.Module, *, max_lines: int, min_summary_words: int,
                   max_summary_chars: int, self_contained: bool, counts: Counter):
    imports = _module_imports(tree)
    module = module_name(doc.id)
    heldout_file = is_heldout(doc.id)
    lines = doc.text.splitlines(keepends=True)
    for node, where in _function_nodes(tree.body):
        counts["functions considered"] += 1
        reason = None
        docstring = ast.get_docstring(node)
        body = node.body[1:] if docstring is not None else node.body
        num_lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
        summary, no_summary = _summary(docstring, max_summary_chars) if docstring else (None, "no docstring")
        if where == "method":
            reason = "method (needs its class)"
        elif where == "conditional":
            reason = "conditional def"
        elif isinstance(node, ast.AsyncFunctionDef):
            reason = "async"
        elif node.decorator_list:
            reason = "decorated"
        elif node.name.startswith("__"):
            reason = "dunder or mangled name"
        elif node.name.startswith("test"):
            reason = "test name"
        elif docstring is None or not docstring.strip():
            reason = "no docstring"
        elif summary is None:
            reason = no_summary
        elif len(summary.split()) < min_summary_words:
            reason = "summary too short"
        elif num_lines < 2:
            reason = "body too short"
        elif num_lines > max_lines:
            reason = "body too long"
        if reason is None:
            free = _free_names(node) - {node.name}
            if self_contained and free - imports.keys():
                reason = "uses module-level names"
        if reason is not None:
            counts[reason] += 1
            continue
        needed = sorted({imports[n] for n in free if n in imports})
        source = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
        solution = "\n".join(needed) + ("\n\n\n" if needed else "") + source.rstrip() + "\n"
        try:
            ast.parse(solution)
        except SyntaxError:
            counts["does not parse alone"] += 1
            continue
        signature = f"{node.name}({ast.unparse(node.args)})"
        task_id = f"{doc.id}::{node.name}"
        split = "val" if heldout_file or is_heldout(task_id, TASK_HELDOUT_FRACTION) else "train"
        doctests = doctest_text(docstring)
        yield CodeTask(id=task_id, name=node.name, signature=signature, summary=summary,
                       prompt=make_prompt(signature, summary), solution=solution, doctests=doctests,
                       split=split, heldout_file=heldout_file, module=module if doctests else "")


def extract_tasks(source: Corpus | Iterable[Document] | None = None, *, max_lines: int = 30,
                  min_summary_words: int = 4, max_summary_chars: int = 200, self_contained: bool = True,
                  counts: Counter | None = None) -> list[CodeTask]:
    """Code tasks from a corpus (default: the built-in stdlib corpus) or any iterable of Documents, in
    corpus order then source order. `counts` (if given) is filled with "kept", "functions considered",
    every drop reason (per function) and the file-level reasons ("file: ...", per file)."""
    if counts is None:
        counts = Counter()
    if source is None:
        source = Corpus()
    documents = source.documents() if isinstance(source, Corpus) else source
    tasks, seen, seen_ids = [], set(), set()
    for doc in documents:
        if not doc.id.endswith(".py"):
            counts["file: not python"] += 1
            continue
        if "test" in doc.id.lower():
            counts["file: test path"] += 1
            continue
        try:
            with warnings.catch_warnings():  # invalid escape sequences in old sources warn while parsing
                warnings.simplefilter("ignore")
                tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            counts["file: does not parse"] += 1
            continue
        counts["files parsed"] += 1
        for task in _tasks_of_file(doc, tree, max_lines=max_lines, min_summary_words=min_summary_words,
                                   max_summary_chars=max_summary_chars, self_contained=self_contained,
                                   counts=counts):
            key = (task.name, task.summary)
            if key in seen or task.id in seen_ids:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            seen_ids.add(task.id)
            tasks.append(task)
    counts["kept"] += len(tasks)
    return tasks


def to_messages(task: CodeTask) -> dict:
    """One OpenAI-style chat row: the prompt and the reference solution."""
    return {"messages": [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.solution}]}


def write_jsonl(tasks: Iterable[CodeTask], path: str | Path) -> int:
    """The tasks as chat JSONL (what `lmforge sft --data` reads); returns the number of rows."""
    rows = [json.dumps(to_messages(t), ensure_ascii=False) for t in tasks]
    atomic_write_text(path, "".join(row + "\n" for row in rows))
    return len(rows)


# ----------------------------------------------------------------------------- checking answers

@dataclass
class CheckResult:
    parses: bool
    defines: bool  # a top-level def (or async def) with exactly the task's name
    num_doctests: int  # examples in the task's doctests that check the answer (`doctest_checks`)
    doctests_passed: int  # of those
    reason: str  # "ok", or why it fell short, in a few words

    @property
    def passed_doctests(self) -> bool:
        return self.num_doctests > 0 and self.doctests_passed == self.num_doctests


# Per answer: the sandbox's defaults (5 s wall, 5 s CPU, 512 MB). A frozen dataclass, so safe to share.
CHECK_LIMITS = sandbox.Limits()
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of an answer: the fenced blocks (```python, ```py or bare ```) joined in order when there
    are any (python-tagged ones preferred over other languages), else the whole text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    chosen = python or [body for _, body in blocks]
    if not chosen:
        return completion.strip("\n") + "\n"
    return "\n".join(body.rstrip() for body in chosen).strip("\n") + "\n"


def _defines(tree: ast.Module, name: str) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


# The program the sandbox runs: given {"code", "doctests", "name", "module", "nonce"} (the JSON literal
# `_program` puts before it), it executes the candidate in fresh globals (a copy of the task's module's
# globals when it has one, as `doctest.testmod` runs a module's examples), checks that the name is bound
# to a function the answer itself defined (not the stdlib's own, imported: `from statistics import mean`
# would pass every statistics task), runs the doctests on those globals, and writes one report line,
# nonce + JSON, straight to fd 1 (the candidate may have replaced sys.stdout). The nonce keeps a
# candidate's own prints from passing as the report; a candidate that sets out to forge the report
# (reading the nonce from the runner's frame) is not defended against: RL rewards from a policy that
# learns that are to be read with suspicion, as with any in-process checker.
_RUNNER = r'''
import doctest, importlib, inspect, json, os, sys

def _report(nonce, report):
    os.write(1, ("\n" + nonce + json.dumps(report) + "\n").encode())

def _main(payload):
    nonce, report = payload["nonce"], {"passed": [], "error": "", "failure": ""}
    globs = {"__builtins__": __builtins__}
    if payload["module"]:
        try:
            globs = dict(vars(importlib.import_module(payload["module"])))
        except BaseException as e:
            report["error"] = ("importing " + payload["module"] + ": " + type(e).__name__ + ": " + str(e))[:200]
            return _report(nonce, report)
    globs["__name__"] = "__codetask__"
    try:
        exec(compile(payload["code"], "<answer>", "exec"), globs)
    except BaseException as e:
        report["error"] = (type(e).__name__ + ": " + str(e))[:200]
        return _report(nonce, report)
    func = globs.get(payload["name"])
    if not callable(func):
        report["error"] = "the name is not a function after running the code"
        return _report(nonce, report)
    if getattr(getattr(inspect.unwrap(func), "__code__", None), "co_filename", None) != "<answer>":
        report["error"] = "the name is not the answer's own function (imported or taken from elsewhere)"
        return _report(nonce, report)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    test = doctest.DocTestParser().get_doctest(payload["doctests"], globs, payload["name"], "<doctests>", 0)
    failures, passed = [], []

    class Runner(doctest.DocTestRunner):
        def report_success(self, out, test, example, got):
            passed.append(next(i for i, ex in enumerate(test.examples) if ex is example))

    Runner(verbose=False, optionflags=flags).run(test, out=failures.append)
    report.update(passed=passed, failure="".join(failures)[:1000])
    _report(nonce, report)

_main(json.loads(PAYLOAD))
'''


def _program(code: str, task: CodeTask, nonce: str) -> str:
    """The runner with its input spliced in as one ASCII string literal: ascii() of a str is always a
    valid Python literal that evaluates back to it (quotes, backslashes, newlines, NULs, surrogates),
    so no answer can break out of it. (run_many takes programs only, no stdin per program.)"""
    payload = json.dumps({"code": code, "doctests": task.doctests, "name": task.name, "module": task.module,
                          "nonce": nonce})
    return f"PAYLOAD = {ascii(payload)}\n{_RUNNER}"


def _read_report(result: sandbox.SandboxResult, nonce: str) -> dict | None:
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(nonce):
            try:
                return json.loads(line[len(nonce):])
            except ValueError:
                return None
    return None


def _static_check(task: CodeTask, code: str, num: int) -> CheckResult:
    """Parse and define, without running anything; num: the task's doctest checks."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        return CheckResult(False, False, num, 0, f"does not parse: {getattr(e, 'msg', e)}")
    if not _defines(tree, task.name):
        return CheckResult(True, False, num, 0, f"does not define `{task.name}`")
    if num == 0:
        return CheckResult(True, True, 0, 0, "no doctests")
    return CheckResult(True, True, num, 0, "doctests not run")


def _finish(checks: list[int], static: CheckResult, result: sandbox.SandboxResult, nonce: str) -> CheckResult:
    report = _read_report(result, nonce)
    if report is None:
        detail = result.reason if result.reason != "ok" else "no report"
        tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        return CheckResult(True, True, static.num_doctests, 0, f"{detail}{': ' + tail[0][:160] if tail else ''}")
    if report["error"]:
        return CheckResult(True, True, static.num_doctests, 0, f"error running the code: {report['error']}")
    passed = len(set(report["passed"]) & set(checks))
    reason = "ok" if passed == static.num_doctests else \
        f"failed {static.num_doctests - passed} of {static.num_doctests} doctests"
    return CheckResult(True, True, static.num_doctests, passed, reason)


def check_many(tasks: Sequence[CodeTask], completions: Sequence[str], *, run_doctests: bool = True,
               limits: sandbox.Limits = CHECK_LIMITS, workers: int | None = None) -> list[CheckResult]:
    """`check` for many answers: the static checks here, then every doctest run as one sandbox batch."""
    if len(tasks) != len(completions):
        raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions: give one completion per task")
    codes = [extract_code(c) for c in completions]
    checks = [doctest_checks(t.doctests, t.name) for t in tasks]
    results = [_static_check(t, code, len(c)) for t, code, c in zip(tasks, codes, checks)]
    if not run_doctests:
        return results
    todo = [i for i, r in enumerate(results) if r.defines and r.num_doctests > 0]
    nonces = [f"@@codetask:{secrets.token_hex(8)}@@" for _ in todo]
    programs = [_program(codes[i], tasks[i], nonce) for i, nonce in zip(todo, nonces)]
    for i, nonce, run in zip(todo, nonces, sandbox.run_many(programs, limits=limits, workers=workers)):
        results[i] = _finish(checks[i], results[i], run, nonce)
    return results


def check(task: CodeTask, completion: str, *, run_doctests: bool = True,
          limits: sandbox.Limits = CHECK_LIMITS) -> CheckResult:
    """Does the answer parse, define the task's function, and pass the task's doctests (run in the
    sandbox, against the answer's own globals only)?"""
    return check_many([task], [completion], run_doctests=run_doctests, limits=limits, workers=1)[0]


def reward(result: CheckResult) -> float:
    """Shaped reward in [0, 1]: 0 for code that does not parse, 0.25 for code that parses, 0.5 once it
    defines the requested function, plus 0.5 times the fraction of the doctests' checks passed (examples
    that only set the stage pass for any answer, so they count for nothing: `doctest_checks`). The small steps
    give a young policy a gradient toward well-formed answers before it can pass anything; the doctests
    carry half the scale so passing them outweighs any amount of form. A task without doctests tops
    out at 0.5: nothing about its behaviour is verified (use `verified_doctest_tasks` for RL)."""
    if not result.parses:
        return 0.0
    if not result.defines:
        return 0.25
    if result.num_doctests == 0:
        return 0.5
    return 0.5 + 0.5 * result.doctests_passed / result.num_doctests


def score(tasks: Sequence[CodeTask], answers: Sequence[str], ended: Sequence[bool], *,
          limits: sandbox.Limits = CHECK_LIMITS, workers: int | None = None) -> dict:
    """Figures for answers to tasks. An answer *passes* when it ended its turn (the chat format was
    respected: the model wrote its end-of-turn token), parses, and defines the requested function;
    it *passes its doctests* when, on top of that, every doctest of a task that has some passes.
    Rates come with a 95% Wilson interval."""
    from lmforge.evaluate import wilson_interval

    results = check_many(tasks, answers, limits=limits, workers=workers)
    passed = [done and r.parses and r.defines for r, done in zip(results, ended)]
    with_doctests = [(p and r.passed_doctests) for r, p in zip(results, passed) if r.num_doctests > 0]
    n, k, m, j = len(results), sum(passed), len(with_doctests), sum(with_doctests)
    return {"n": n, "ended": sum(ended), "parses": sum(r.parses for r in results), "passed": k,
            "pass_rate": k / n if n else 0.0, "pass_rate_ci95": wilson_interval(k, n),
            "doctest_tasks": m, "doctests_passed": j, "doctest_rate": j / m if m else 0.0,
            "doctest_rate_ci95": wilson_interval(j, m), "outcomes": dict(Counter(
                "did not end its turn" if not done else "does not parse" if not r.parses else
                "does not define the function" if not r.defines else "passed"
                for r, done in zip(results, ended)))}


# How models answer in evaluations: greedy, with a mild repetition penalty (CTRL's, Keskar et al. 2019).
# Small models decoding greedily fall into loops ("the number of the number of ..."); on the default
# run's chat model (125 held-out tasks) the penalty took passes from 45 to 63, loops cut by the
# context from 50 to 23. Base and fine-tuned models are always decoded the same way.
EVAL_REPETITION_PENALTY = 1.1


def evaluate(llm, tokenizer, tasks: Sequence[CodeTask], *, max_tokens: int = 512,
             repetition_penalty: float = EVAL_REPETITION_PENALTY) -> tuple[dict, list[str]]:
    """Greedy answers of the engine's model to the tasks' prompts, in chat form, and their `score`
    (answers are capped by max_tokens and the model's context). Returns (figures, answers)."""
    from lmforge.rl import Item, rollout

    items = [Item([{"role": "user", "content": t.prompt}], t) for t in tasks]
    _, _, ended, texts = rollout(llm, tokenizer, items, n=1, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                 seed=0, repetition_penalty=repetition_penalty)
    answers = [t[0] for t in texts]
    return score(tasks, answers, [e[0] for e in ended]), answers


def verified_doctest_tasks(tasks: Iterable[CodeTask], *, limits: sandbox.Limits = CHECK_LIMITS,
                           workers: int | None = None, counts: Counter | None = None) -> list[CodeTask]:
    """The tasks whose doctests are a fair check of an answer: they pass when run against the task's own
    reference solution in the sandbox (in its module's globals where it has a module), and they fail
    against a stand-in that defines the name and only raises (doctests that never call the function, or
    call the module's own copy through another name, would pass any answer). Some stdlib doctests need
    an environment the sandbox denies (subprocesses, an event loop, the module under its own name).
    `counts` gets "verified" and the reason for every task with doctests dropped."""
    with_doctests = [t for t in tasks if t.doctests]
    stubs = [f"def {t.name}(*args, **kwargs):\n    raise NotImplementedError\n" for t in with_doctests]
    n = len(with_doctests)
    results = check_many(with_doctests * 2, [t.solution for t in with_doctests] + stubs, limits=limits,
                         workers=workers)
    kept = []
    for task, reference, stub in zip(with_doctests, results[:n], results[n:]):
        if not reference.passed_doctests:
            reason = re.sub(r"\d+ of \d+ ", "", reference.reason.split(":")[0])
        elif stub.passed_doctests:
            reason = "doctests pass without the function"
        else:
            kept.append(task)
            continue
        if counts is not None:
            counts[reason] += 1
    if counts is not None:
        counts["verified"] += len(kept)
    return kept
