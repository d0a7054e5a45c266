"""Prints setup.cfg's requirements, one a line, for installing them into another environment.

.ci/run uses it to build the lowest-pins environment without torch: `--without` drops
packages by name (the subset of tests run there imports neither torch nor torchvision).
"""

from __future__ import annotations

import argparse
import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements(setup_cfg: Path, extras: list[str], without: list[str]) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += cfg["options.extras_require"][extra].splitlines()
    dropped = {canonicalize_name(n) for n in without}
    reqs = [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    return [str(r) for r in reqs if canonicalize_name(r.name) not in dropped]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--extra", action="append", default=[], help="also the requirements of this extra")
    p.add_argument("--without", nargs="*", default=[], help="leave these packages out")
    args = p.parse_args()
    print("\n".join(requirements(Path(__file__).resolve().parent.parent / "setup.cfg", args.extra, args.without)))


if __name__ == "__main__":
    main()
