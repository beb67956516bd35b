"""Which pauses of a past end-of-turn run would the word rules now treat differently?

benchmarks/end_of_turn.py records, for every labelled pause and true end,
the words Whisper heard at the pause and the window the word rules gave
them (``labelled_inputs``). A change to asr/endpointing.py moves that run's
figures only through those windows, so re-reading the words with today's
rules says whether its tables still stand or must be re-run:

    python -m benchmarks.word_rules_check benchmarks/results/end_of_turn.json

Prints each item whose window changed and exits 1 if any did, 0 if none.
It says nothing about calls the set does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asr.config import ASRConfig
from asr.endpointing import endpoint_window


def changed_windows(results: dict, config: ASRConfig) -> list[dict]:
    """The labelled items whose word-rule window differs from the recorded one."""
    changed = []
    for item in results.get("labelled_inputs", []):
        now = endpoint_window(item["text"], config, item.get("agent"))
        if abs(now - item["rule_window_s"]) > 1e-9:
            changed.append({**item, "rule_window_now_s": now})
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmarks.end_of_turn results file")
    ns = parser.parse_args(argv)
    results = json.loads(ns.results.read_text())
    items = results.get("labelled_inputs", [])
    if not items:
        parser.error(f"{ns.results}: no labelled_inputs (not a benchmarks.end_of_turn results file?)")
    changed = changed_windows(results, ASRConfig())
    commit = (results.get("versions") or {}).get("firstline") or results.get("commit")
    print(f"{len(items)} items heard in the run at {commit}; {len(changed)} get another window from today's rules")
    for item in changed:
        print(f"  {item['label']:<20} {item['rule_window_s']:.1f} -> {item['rule_window_now_s']:.1f} s  {item['case']}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
