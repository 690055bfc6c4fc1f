"""`smoke`: every CUDA code path once, each defect of issue 16 checked."""
import json
import re
import sys
import time

from src.data.demo import write_jpegs
from tools.gpu_check.files import write_odd_files
from tools.gpu_check.runner import Ranks, preflight

# the resumed run against the uninterrupted one on CUDA: the same weights and samples,
# but fp16 autocast and cuDNN's own choice of algorithms (cudnn.benchmark, atomics)
LOSS_TOLERANCE = 1e-2  # relative, at every step; on the CPU the losses are equal

STEP_LINE = re.compile(r"epoch (\d+)/\d+ iter (\d+)/\d+ .*?\bloss (\S+)")

# the defects of issue 16 and the smoke steps (unit:check) that run them on CUDA
DEFECTS = {
    1: ("eval_knn --use_cuda False under NCCL", ["knn_cpu_bank", "two_processes"]),
    2: ("fp16 resume without a saved scaler", ["fp32_to_fp16", "unit:loss_scaler"]),
    3: ("silent decode fallbacks", ["gpu_backend", "unit:decoding"]),
    4: ("antialiased resize limits", ["gpu_backend", "unit:resize_limits"]),
    5: ("optimizer state across kernels", ["fp32_to_fp16", "unit:optimizer_kernels"]),
    6: ("an undecodable JPEG's crop box", ["gpu_backend", "unit:decoding"]),
    7: ("the benchmark's authors row", ["unit:benchmark_rows"]),
}

def smoke(check):
    if not check.step("preflight", 5, lambda: preflight(check.dry)):
        raise SystemExit(3)  # the preflight's line says why
    check.step("data", 10, lambda: smoke_data(check))
    # (name, estimate on one H200, body, the steps it needs), the longest first
    check.in_lanes([
        ("bf16_compile", 80, lambda: bf16_compile(check), ()),
        ("train_fp16", 25, lambda: train_fp16(check), ()),
        ("sigterm_resume", 35, lambda: sigterm_resume(check), ()),
        ("resume_matches", 1, lambda: resume_matches(check), ("train_fp16", "sigterm_resume")),
        ("knn_cpu_bank", 12, lambda: knn(check, "knn_cpu", "False"), ("train_fp16",)),
        ("two_processes", 40, lambda: two_processes(check), ("knn_cpu_bank",)),
        ("knn_gpu_bank", 12, lambda: knn(check, "knn_gpu", "True"), ("knn_cpu_bank",)),
        ("fp32_to_fp16", 30, lambda: fp32_to_fp16(check), ()),
        ("gpu_backend", 20, lambda: gpu_backend(check), ()),
        ("linear_1_epoch", 15, lambda: linear(check), ("train_fp16",)),
        ("unit_checks", 15, lambda: unit_step(check), ()),
    ])
    for defect, (what, where) in DEFECTS.items():
        verdict = "pass" if all(check.passed(name) for name in where) else "FAIL"
        print(f"defect {defect} ({what}): {verdict} in {', '.join(where)}", flush=True)

def smoke_data(check):
    s = check.sizes
    write_jpegs(check.work / "data" / "train", s.train, s.pixels)
    write_jpegs(check.work / "data" / "val", s.val, s.pixels, seed=1)
    write_jpegs(check.work / "odd" / "train", s.odd_plain, s.pixels, seed=2)
    write_odd_files(check.work / "odd" / "train" / "n01000000", s.large)
    return 0, (f"{s.train} + {s.val} JPEGs of {s.pixels} px; {s.odd_plain} more with CMYK, "
               f"grayscale, progressive, PNG, truncated, undecodable and {s.large[0]}x"
               f"{s.large[1]} files")

def train_fp16(check):
    """The uninterrupted run, also the checkpoint the evaluations read."""
    rc = check.run("train_fp16", "main.py", [*check.train_flags("fp16"), *check.fp16()], 90)
    log = check.log_of("fp16")
    if rc or "epoch 2/2 done" not in log:
        return rc or 1, "did not finish 2 epochs"
    import torch
    saved = torch.load(check.work / "fp16" / "checkpoint.pth.tar", map_location="cpu",
                       weights_only=True)
    scale = saved["scaler"].get("scale")
    speed = re.findall(r"images_per_s (\S+)", log)[-1]
    options = dict(re.findall(r"(channels_last|fused optimizer) (True|False)", log))
    ok = check.dry or (scale is not None and set(options.values()) == {"True"})
    return (0 if ok else 1), (f"loss scale {scale}, channels_last {options.get('channels_last')}"
                              f", fused {options.get('fused optimizer')}, {speed} images/s"
                              + check.note("fp32, the rank started without torchrun"))

def sigterm_resume(check):
    """Started like train_fp16, stopped by SIGTERM early in epoch 1, resumed."""
    flags = [*check.train_flags("resumed"), *check.fp16()]
    ranks = check.start("sigterm_resume", "main.py", flags, 90)
    while ranks.alive() and not re.search(r"epoch 1/2 iter 2/", check.log_of("resumed")):
        time.sleep(0.05)
    if not ranks.alive():  # never wait for a run that already died
        return ranks.wait() or 1, "the run ended before it could be signalled"
    ranks.terminate()
    stopped_rc = ranks.wait()
    stop = re.search(r"stopping on a signal at epoch (\d+), iteration (\d+)",
                     check.log_of("resumed"))
    if not stop:
        return stopped_rc or 1, "no checkpoint-and-stop after SIGTERM"
    rc = check.run("sigterm_resume", "main.py", flags, 90)
    resumed = "resumed from" in check.log_of("resumed")
    return (rc if rc or resumed else 1), (
        f"stopped at epoch {stop.group(1)}, iteration {stop.group(2)} (exit {stopped_rc}); "
        f"resumed {'and finished' if not rc and resumed else 'NOT'}"
        + check.note("SIGTERM to the rank itself, no torchrun between"))

def step_losses(log):
    """{(epoch, iteration): loss} of an out.log, the last line of each step counting."""
    return {(int(e), int(i)): float(v) for e, i, v in STEP_LINE.findall(log)}

def resume_matches(check):
    """The resumed run against the uninterrupted one: losses at every step, and the
    final weights (bit for bit on the CPU)."""
    import torch
    ours, theirs = step_losses(check.log_of("resumed")), step_losses(check.log_of("fp16"))
    if not theirs or set(ours) != set(theirs):
        return 1, f"steps differ: {len(ours)} resumed, {len(theirs)} uninterrupted"
    worst = max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-8) for k in theirs)
    load = lambda dump: torch.load(check.work / dump / "checkpoint.pth.tar",  # noqa: E731
                                   map_location="cpu", weights_only=True)["state_dict"]
    a, b = load("resumed"), load("fp16")
    equal = all(torch.equal(a[k], b[k]) for k in b)
    weights = max(((a[k].double() - b[k].double()).abs().max() / (b[k].double().abs().max()
                   + 1e-12)).item() for k in b if b[k].is_floating_point())
    ok = (equal and worst == 0) if check.dry else worst <= LOSS_TOLERANCE
    rule = "equal (CPU: bit for bit)" if check.dry else f"within {LOSS_TOLERANCE:g} relative"
    return (0 if ok else 1), (f"{len(theirs)} steps, loss differences up to {worst:.2g} "
                              f"({rule}); final weights {'equal' if equal else 'differ'}, "
                              f"up to {weights:.2g} relative")

def fp32_to_fp16(check):
    """An fp32 run with per-tensor AdamW, resumed in fp16 with the fused AdamW: the
    scaler starts afresh, the optimizer state moves to the fused kernel's places."""
    flags = [*check.train_flags("precision"), "--optimizer", "adamw"]
    rc = check.run("fp32_to_fp16", "main.py",
                   [*flags, "--epochs", 1, "--precision", "fp32", "--fused", "False"], 60)
    if rc:
        return rc, "the fp32 run failed"
    resumed = ["--precision", "fp32"] if check.dry else ["--precision", "fp16"]
    rc = check.run("fp32_to_fp16", "main.py", [*flags, *resumed, "--fused", "True"], 60)
    log = check.log_of("precision")
    ok = not rc and "resumed from" in log and "epoch 2/2 done" in log
    return (rc or (0 if ok else 1)), ("an fp32, per-tensor AdamW checkpoint resumed with the "
                                      "fused AdamW" + (" in fp16" if not check.dry else "")
                                      + (", finished" if ok else ", FAILED")
                                      + check.note("fp16 needs CUDA: fp32 again; "
                                                   "tests/test_restore.py covers the scaler"))

def gpu_backend(check):
    """--data_backend gpu over plain JPEGs and the odd files: the worker's CPU decode of
    CMYK/grayscale/progressive/PNG, the substitute of a truncated file (loader) and of
    an undecodable one (decode), the large photo's pre-shrink, the fallbacks' log."""
    flags = check.train_flags("gpu_backend", data="odd", epochs=1)
    flags[flags.index("--batch_size") + 1] = 3 * check.sizes.batch
    rc = check.run("gpu_backend", "main.py", [*flags, *check.fp16(), "--data_backend", "gpu"], 60)
    log = check.log_of("gpu_backend")
    fallbacks = re.findall(r"GPU decoding fell back: (.*)", log)
    ok = not rc and "epoch 1/1 done" in log  # the fallbacks depend on what nvJPEG refuses
    return (rc or (0 if ok else 1)), (f"fallbacks: {fallbacks[-1] if fallbacks else 'none'}"
                                      + check.note("decoded by libjpeg on the CPU, not nvJPEG"))

def knn_results(check, dump):
    path = check.work / dump / "knn_results.json"
    return json.loads(path.read_text()) if path.exists() else None

def knn(check, dump, use_cuda):
    rc = check.run(dump, "eval_knn.py", check.eval_flags(dump, "--nb_knn", 5, 20,
                                                         "--use_cuda", use_cuda), 60)
    results = knn_results(check, dump)
    if rc or not results:
        return rc or 1, "no results"
    figure = ", ".join(f"{k}-NN top-1 {v['top1']:.1f}" for k, v in results.items())
    if dump == "knn_gpu":
        same = results == knn_results(check, "knn_cpu")
        figure += f"; {'equal to' if same else 'differs from'} the CPU bank's"
        figure += check.note("the bank is on the CPU either way")
    return 0, figure

def linear(check):
    rc = check.run("linear", "eval_linear.py",
                   check.eval_flags("linear", "--epochs", 1, "--lr_classifier", 10), 60)
    path = check.work / "linear" / "linear_results.json"
    if rc or not path.exists():
        return rc or 1, "no results"
    return 0, ", ".join(f"{k} {v:.4g}" for k, v in json.loads(path.read_text()).items()
                        if isinstance(v, (int, float)))

def two_processes(check):
    """Two ranks on the one device: SyncBatchNorm's real exchange in main.py, then the
    k-NN shard merge of a CPU bank, against the one-process result. NCCL first (it
    may refuse two ranks on one GPU), else gloo."""
    tried = []
    for backend in ([] if check.dry else ["nccl"]) + ["gloo"]:
        flags = check.train_flags(f"two_{backend}", epochs=1)
        flags[flags.index("--batch_size") + 1] = check.sizes.batch // 2  # the same total
        rc = check.run(f"two_processes_{backend}", "main.py",
                       [*flags, *check.fp16(), "--dist_backend", backend],
                       60 if backend == "nccl" else 90, nproc=2)
        tried.append(f"{backend} rc {rc}")
        if not rc:
            break
        refused = (check.out / "logs" / f"two_processes_{backend}.log").read_text()
        tried[-1] += " (duplicate GPU)" if "Duplicate GPU" in refused else ""
    if rc:
        return rc, "; ".join(tried)
    synced = "synchronised across processes True" in check.log_of(f"two_{backend}")
    rc = check.run("two_processes_knn", "eval_knn.py",
                   check.eval_flags("knn_two", "--nb_knn", 5, 20, "--use_cuda", "False",
                                    "--dist_backend", backend), 60, nproc=2)
    same = knn_results(check, "knn_two") == knn_results(check, "knn_cpu")
    ok = not rc and same and (synced or check.dry)
    return (rc or (0 if ok else 1)), (
        f"{'; '.join(tried)}; SyncBatchNorm {synced}; sharded k-NN "
        f"{'equals' if same else 'DIFFERS from'} one process"
        + check.note("gloo on the CPU, where batch norm is not synchronised"))

def unit_step(check):
    """The direct checks of the defects, in a process of their own (see unit_checks)."""
    command = [sys.executable, "-m", "tools.gpu_check.units", *(["--dry-run"] * check.dry)]
    log = check.out / "logs" / "unit_checks.log"
    left = check.deadline - time.monotonic()
    code = Ranks([command], [{}], min(120, left), log, check.env).wait()
    lines = [line for line in log.read_text().splitlines() if line.startswith(("PASS", "FAIL"))]
    failed = [line.split(":")[0][5:] for line in lines if line.startswith("FAIL")]
    return code, (f"{len(lines) - len(failed)} of {len(lines)} passed"
                  + (f"; failed: {', '.join(failed)}" if failed else "")
                  + check.note("on the CPU")), lines

def bf16_compile(check):
    flags = check.train_flags("compile", epochs=1)
    extra = ["--precision", "fp32", "--compile", "eager"] if check.dry else [
        "--precision", "bf16", "--compile"]
    rc = check.run("bf16_compile", "main.py", [*flags, *extra], 200)
    log = check.log_of("compile")
    ok = not rc and "epoch 1/1 done" in log
    speed = re.findall(r"images_per_s (\S+)", log)
    return (rc or (0 if ok else 1)), (f"{speed[-1] if speed else '?'} images/s in the last step"
                                      + check.note("fp32 and dynamo's eager backend: bf16 is "
                                                   "slow on this CPU, inductor's build long"))
