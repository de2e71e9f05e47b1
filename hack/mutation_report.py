"""Summarise `mutmut results --all true` (stdin): per module, mutants by outcome, then the survivors.

Only mutants inside the scope patterns given as arguments count (mutmut generates mutants for whole
files; `make mutate` runs only the trust-boundary functions).
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>\S+)__mutmut_(?P<n>\d+): (?P<status>.+?)\s*$")


def module_of(name: str) -> str:
    return name.split(".xǁ")[0] if ".xǁ" in name else name.rsplit(".", 1)[0]


def main(patterns: list[str]) -> int:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        mutant = f"{m['name']}__mutmut_{m['n']}"
        if patterns and not any(fnmatch.fnmatch(mutant, p) for p in patterns):
            continue
        counts[module_of(m["name"])][m["status"]] += 1
        if m["status"] in ("survived", "no tests"):
            survivors.append(f"{mutant} ({m['status']})")
    statuses = ["killed", "survived", "no tests", "timeout", "suspicious", "not checked"]
    print(f"{'module':32} " + " ".join(f"{s:>11}" for s in statuses))
    total: Counter[str] = Counter()
    for module in sorted(counts):
        total.update(counts[module])
        print(f"{module:32} " + " ".join(f"{counts[module][s]:>11}" for s in statuses))
    print(f"{'total':32} " + " ".join(f"{total[s]:>11}" for s in statuses))
    for s in survivors:
        print("  " + s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
