"""Text that every machine with Python has: the standard library's own sources, split into a
training part and a held-out part by file (every 20th file is held out)."""
from __future__ import annotations

import os
import sysconfig


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test",
                                                              "__pycache__", "lib2to3"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def corpus(max_bytes: int) -> tuple[str, str]:
    """(training text, held-out text), each at most `max_bytes` characters."""
    train, held = [], []
    sizes = [0, 0]
    for i, path in enumerate(stdlib_files()):
        part, k = (held, 1) if i % 20 == 0 else (train, 0)
        if sizes[k] >= max_bytes:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        part.append(text)
        sizes[k] += len(text)
    return "\n\n".join(train)[:max_bytes], "\n\n".join(held)[:max_bytes]
