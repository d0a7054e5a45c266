"""A child for tests/unit/test_zygote.py: reports what it sees, then waits to be stopped or exits."""

import gc
import json
import os
import sys
import time

if __name__ == "__main__":
    out = sys.argv[sys.argv.index("--report") + 1]
    with open(out, "w") as f:
        json.dump({"argv": sys.argv, "ppid": os.getppid(), "env": os.environ.get("ZYGOTE_TEST", ""),
                   "preloaded": "json.decoder" in sys.modules and "colorsys" in sys.modules,
                   "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}, f)
    if "--exit" in sys.argv:
        sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
    time.sleep(600)
