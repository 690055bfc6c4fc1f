"""The checks of tools/gpu_check.sh: the CUDA path in GPU slots of a few minutes.

    tools/gpu_check.sh smoke       every CUDA code path once (under 5 minutes on one H200)
    tools/gpu_check.sh bench       the side-by-side benchmark and the data pipelines (same)
    tools/gpu_check.sh --dry-run   both, with tiny sizes on the CPU (what the tests run)

Each step runs its commands under `timeout -s TERM -k 30` (torchrun passes the TERM on
to its ranks, which write a checkpoint and stop), prints one line as it ends (name, rc,
seconds, its figure) and appends the same to OUT/results.jsonl, so a run cut off by the
slot's limit still reports every finished step; the benchmark writes each row as it is
measured. A step never waits for a process that already died, and the steps of an entry
point share one time budget: a step that would start past it is reported as skipped.
Nothing is installed; the first step stops everything in one line if CUDA or a module
is missing. The dry run executes every step's logic on the CPU and says, step by step,
what only a GPU can run.

The package: runner.py (steps, budget, processes), smoke.py and bench.py (the two
entry points), units.py (direct checks of the defects, in a process of their own),
files.py (the odd image files); run it as `python -m tools.gpu_check`."""
