"""`python -m tools.gpu_check smoke|bench [--dry-run]` (tools/gpu_check.sh runs it)."""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from tools.gpu_check import __doc__ as DOC
from tools.gpu_check.bench import bench
from tools.gpu_check.runner import Check
from tools.gpu_check.smoke import smoke

def main():
    parser = argparse.ArgumentParser(description=DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", nargs="*", metavar="smoke|bench",
                        help="entry points to run (the dry run: both unless named)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    entries = args.entry or (["smoke", "bench"] if args.dry_run else [])
    if not entries or set(entries) - {"smoke", "bench"}:
        parser.error("name the entry points: smoke, bench (or --dry-run for both on the CPU)")
    out = Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")  # this invocation's steps only
    shutil.rmtree(out / "logs", ignore_errors=True)
    start, failed = time.monotonic(), 0
    for entry in entries:
        check = Check(entry, out, args.dry_run)
        print(f"== {entry}{' (dry run on the CPU)' if args.dry_run else ''}: results in "
              f"{out}/results.jsonl", flush=True)
        try:
            (smoke if entry == "smoke" else bench)(check)
        finally:
            shutil.rmtree(check.work, ignore_errors=True)
        bad = [r["step"] for r in check.results if r["rc"] != 0]
        failed += len(bad)
        print(f"== {entry}: {len(check.results) - len(bad)} of {len(check.results)} steps "
              f"passed" + (f" (not: {', '.join(bad)})" if bad else ""), flush=True)
    print(f"== done in {time.monotonic() - start:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
