"""A child for tests/unit/test_zygote.py: reports what it sees, then waits to be stopped or exits."""

import gc
import importlib
import json
import os
import sys
import time



def cached() -> dict:
    """For each --cached MODULE:FUNCTION, what its functools.lru_cache holds here, read without calling it
    (0 entries: this child would compute it), and the value where it holds one."""
    out = {}
    for i, arg in enumerate(sys.argv):
        if arg == "--cached":
            module, _, name = sys.argv[i + 1].partition(":")
            fn = getattr(importlib.import_module(module), name)
            size = fn.cache_info().currsize
            out[sys.argv[i + 1]] = {"entries": size, "value": str(fn())[:40] if size else None}
    return out


if __name__ == "__main__":
    out = sys.argv[sys.argv.index("--report") + 1]
    with open(out, "w") as f:
        json.dump({"argv": sys.argv, "ppid": os.getppid(), "env": os.environ.get("ZYGOTE_TEST", ""),
                   "preloaded": "json.decoder" in sys.modules and "colorsys" in sys.modules,
                   "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "cached": cached()}, f)
    if "--exit" in sys.argv:
        sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
    time.sleep(600)
