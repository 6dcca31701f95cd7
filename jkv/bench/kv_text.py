"""The text of the KV-cache quality evaluation: English that ships in every Python, split so that the evaluation
text is never trained on.

Training text: the CPython documentation topics (`pydoc_data.topics`) and the docstrings of the standard library
outside the evaluation modules (read with `ast`, nothing imported). Evaluation text: the docstrings of a fixed
list of other standard-library modules and of the public classes and functions they define (`inspect.getdoc`).
`ngram_overlap` is the leak check between the two.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

import numpy as np

EOS = 50256  # GPT-2's <|endoftext|>, between documents

# Held-out evaluation text: docstrings of these modules (and of the public classes and functions they define).
# pdb is left out: its docstring repeats the debugger-command help of the pydoc topic "debugger" (23 % of its
# 8-grams occur in the training text; the modules below share about 4 %, common phrases).
EVAL_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
    "email.message", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json",
    "locale", "logging", "mailbox", "mimetypes", "operator", "optparse", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip


def stdlib_docstrings(exclude: tuple[str, ...] = ()) -> list[str]:
    """Docstrings (>= 80 characters) of every standard-library source file, read with `ast` (nothing imported).

    Modules in `exclude` and their submodules are skipped, as are the test suites and IDLE.
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in ("test", "idlelib", "site-packages", "lib2to3") or "tests" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if any(name == m or name.startswith(m + ".") for m in exclude):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    docs.append(doc)
    return docs


def train_documents(exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(training, validation) documents: the CPython documentation topics shipped in the stdlib
    (`pydoc_data.topics`) and the docstrings of every stdlib module outside EVAL_MODULES, distinct, without any
    text in `exclude` (the evaluation docstrings); every 10th document is held out for early stopping."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)] + stdlib_docstrings(EVAL_MODULES)
    texts = [x for x in dict.fromkeys(texts) if x not in exclude]  # a few texts occur twice: keep them once
    return [x for i, x in enumerate(texts) if i % 10], [x for i, x in enumerate(texts) if not i % 10]


def eval_documents(modules=EVAL_MODULES) -> tuple[list[str], list[str]]:
    """Distinct docstrings (>= 80 characters) of `modules` and of the public classes and functions each defines."""
    seen: set[str] = set()
    docs, used = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        used.append(name)
        objs = [mod] + [vars(mod)[n] for n in sorted(vars(mod)) if not n.startswith("_")]
        for obj in objs:
            if obj is not mod and getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            with warnings.catch_warnings():  # typing.io / typing.re warn when their docs are read
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs, used


def ngram_overlap(ids: np.ndarray, train_ids: np.ndarray, n: int = 8) -> float:
    """Share of `ids`' n-grams that also occur in `train_ids` (a leak check between the two texts)."""
    seen = {tuple(train_ids[i : i + n]) for i in range(len(train_ids) - n + 1)}
    return float(np.mean([tuple(ids[i : i + n]) in seen for i in range(len(ids) - n + 1)]))


def token_stream(tok, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + [EOS]
    return np.asarray(ids, np.int32)
