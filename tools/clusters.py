"""The clustering analysis under its former name: `python tools/clusters.py ...` runs
`python eval_clusters.py ...` (the same flags, the same outputs)."""
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    script = Path(__file__).resolve().parents[1] / "eval_clusters.py"
    sys.path.insert(0, str(script.parent))
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
