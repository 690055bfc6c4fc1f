"""Weighted k-NN (SPEC §6): the vote, its chunking, sharded extraction and the script."""
import json
import logging
import math
import re
import shutil

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import args as cli
import eval_knn
from args import get_args
from helpers_eval import (TensorImages, assert_ok, assert_usage_error, extraction_worker,
                          fast_flags, make_image_folder, run_script, small_encoder, torchrun)
from src.distributed import run_distributed
from src.eval import knn
from src.eval.features import Extraction, extract_features, extract_shard
from src.eval.knn import Bank, knn_classifier, knn_eval
from src.logger import LOGGER_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(degrees):
    angle = math.radians(degrees)
    return [math.cos(angle), math.sin(angle)]


# One class-1 neighbour at similarity 1 against two class-0 neighbours at cos(40°).
TRAIN = torch.tensor([unit(0), unit(40), unit(-40)])
TRAIN_LABELS = torch.tensor([1, 0, 0])


def hand_votes(T):
    """The weighted votes of the test point unit(0), written out."""
    near, far = math.exp(1.0 / T), math.exp(math.cos(math.radians(40)) / T)
    return {1: near, 0: 2 * far}


@pytest.mark.parametrize("T, winner", [(0.07, 1), (1.0, 0)])
def test_weighting_changes_the_majority_answer(T, winner):
    votes = hand_votes(T)
    assert max(votes, key=votes.get) == winner  # the hand computation itself
    test = torch.tensor([unit(0)])
    for label in (0, 1):
        top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, test, torch.tensor([label]), k=3,
                                    T=T, num_classes=10)
        assert top1 == (100.0 if label == winner else 0.0)
        assert top5 == 100.0  # both classes got votes


def test_plain_majority_would_pick_the_other_class():
    # k=3 with equal weights (huge T) is a plain majority vote: class 0 (two votes).
    top1, _ = knn_classifier(TRAIN, TRAIN_LABELS, torch.tensor([unit(0)]), torch.tensor([0]),
                             k=3, T=1e6, num_classes=2)
    assert top1 == 100.0


def test_top5_looks_at_the_first_min_5_k_ranked_classes():
    test = torch.tensor([unit(0)] * 2)
    labels = torch.tensor([1, 0])  # class 1 wins at T=0.07, class 0 comes second
    # k=3: the first min(5, 3) ranked classes hold both voted classes
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, test, labels, k=3, num_classes=10)
    assert (top1, top5) == (pytest.approx(50.0), pytest.approx(100.0))
    # k=1: as in DINO, top-5 looks at min(5, k) = 1 class and equals top-1
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, test, labels, k=1, num_classes=10)
    assert (top1, top5) == (pytest.approx(50.0), pytest.approx(50.0))


def test_k_larger_than_the_bank_uses_every_training_row():
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, torch.tensor([unit(0)]),
                                torch.tensor([1]), k=25, num_classes=1000)
    assert (top1, top5) == (100.0, 100.0)


def brute_force(train, train_labels, test, test_labels, k, T, num_classes):
    """Row by row in plain Python: the reference the chunked version must match."""
    top1 = top5 = 0
    for row, label in zip(test, test_labels.tolist()):
        sims = (train @ row).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[train_labels[j]] += math.exp(sims[j] / T)
        ranked = sorted((c for c in range(num_classes) if votes[c] > 0), key=lambda c: -votes[c])
        # unvoted classes tie at 0; keep the data clear of that ambiguity
        assert len(ranked) >= min(5, k) or votes[label] > 0
        top1 += ranked[0] == label
        top5 += label in ranked[:min(5, k)]
    return 100 * top1 / len(test), 100 * top5 / len(test)


def test_chunked_search_matches_brute_force(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    test = F.normalize(torch.randn(50, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 7, (300,), generator=generator)
    test_labels = torch.randint(0, 7, (50,), generator=generator)
    monkeypatch.setattr(knn, "MAX_SIMILARITIES", 900)  # 3 test rows per chunk
    assert knn.chunk_rows(300) == 3
    both = knn_eval(Bank(train, train_labels), test, test_labels, [1, 20], 0.1, 7)
    for k in (1, 20):
        expected = brute_force(train, train_labels, test, test_labels, k, 0.1, 7)
        got = knn_classifier(train, train_labels, test, test_labels, k, T=0.1, num_classes=7)
        assert got == pytest.approx(expected)
        assert both[k] == pytest.approx(expected)


def test_chunk_rows_bounds():
    assert knn.chunk_rows(50_000) == 1000
    assert 100 <= knn.chunk_rows(1_281_167) < 110


def test_two_gloo_processes_extract_the_same_bank_as_one(tmp_path):
    # 7 samples (odd: shards of 4 and 3), batch 2 (ragged last batch); label = index,
    # so the bank must hold every sample exactly once and in dataset order.
    generator = torch.Generator().manual_seed(0)
    dataset = TensorImages(torch.randn(7, 3, 9, 9, generator=generator), range(7), 7)
    mp.spawn(extraction_worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "pg"), str(tmp_path), dataset, 2, [1, 3]))
    torch.manual_seed(0)
    encoder = small_encoder().train()
    bank, labels = extract_features(encoder, dataset, Extraction(2, normalize=True),
                                    torch.device("cpu"))
    single = {k: knn_classifier(bank, labels, bank, labels, k, num_classes=7) for k in (1, 3)}
    assert encoder.training  # the train mode is given back
    assert labels.tolist() == list(range(7))
    assert single[1] == (100.0, 100.0)  # each row's nearest neighbour is itself
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["labels"].tolist() == list(range(7))
        assert torch.allclose(out["bank"], bank, atol=1e-6)
        assert out["knn"] == {k: pytest.approx(v) for k, v in single.items()}
        assert out["training"]


def tied_bank(seed=0):
    """Integer-valued features (dot products exact in any summation order) with many
    exactly tied similarities: every row appears twice, with two different labels."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(-2, 3, (20, 6), generator=generator).float()
    bank = torch.cat([rows, rows, torch.randint(-2, 3, (7, 6), generator=generator).float()])
    labels = torch.randint(0, 5, (len(bank),), generator=generator)
    queries = torch.cat([rows[:6], torch.randint(-2, 3, (9, 6), generator=generator).float()])
    return bank, labels, queries, torch.randint(0, 5, (len(queries),), generator=generator)


def test_ties_go_to_the_smaller_bank_index():
    bank, labels, queries, _ = tied_bank()
    sims, _, index = knn.nearest_neighbors(bank, labels, queries, 10)
    full = queries @ bank.T
    for row in range(len(queries)):
        expected = sorted(range(len(bank)), key=lambda j: (-full[row, j].item(), j))[:10]
        assert index[row].tolist() == expected
        assert sims[row].tolist() == full[row, expected].tolist()


def test_two_gloo_processes_with_a_sharded_bank_equal_one(tmp_path):
    """Each process holds half of the bank: the merged neighbours (ties included) and
    the accuracies for several k are those of one process holding all of it."""
    bank, labels, queries, query_labels = tied_bank()
    ks = [1, 3, 10, 25, 60]  # 60 > the 47 bank rows: every row votes
    mp.spawn(sharded_worker, nprocs=2, join=True,
             args=(str(tmp_path / "pg"), str(tmp_path), bank, labels, queries, query_labels, ks))
    sims, neighbor_labels, index = knn.nearest_neighbors(bank, labels, queries, max(ks))
    single = knn_eval(Bank(bank, labels), queries, query_labels, ks, 0.5, 5)
    for rank in range(2):
        out = torch.load(tmp_path / f"shard{rank}.pt")
        assert out["rows"] == len(bank[rank::2])  # the memory per process halves
        assert torch.equal(out["index"], index) and torch.equal(out["sims"], sims)
        assert torch.equal(out["labels"], neighbor_labels)
        assert out["knn"] == single


def sharded_worker(rank, init_file, out_dir, bank, labels, queries, query_labels, ks):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard_index = torch.arange(rank, len(bank), 2)
        shard, shard_labels = bank[shard_index], labels[shard_index]
        sims, neighbor_labels, index = knn.nearest_neighbors(
            shard, shard_labels, queries, max(ks), shard_index, len(bank))
        results = knn_eval(Bank(shard, shard_labels, shard_index, len(bank)), queries,
                           query_labels, ks, 0.5, 5)
        torch.save({"sims": sims, "labels": neighbor_labels, "index": index, "knn": results,
                    "rows": len(shard)}, f"{out_dir}/shard{rank}.pt")
    finally:
        dist.destroy_process_group()


def summary(result):
    """{k: (top1, top5)} from the script's final lines."""
    lines = re.findall(r"(\d+)-NN \(T=0.07\): top-1 ([\d.]+) top-5 ([\d.]+)", result.stdout)
    return {int(k): (float(a), float(b)) for k, a, b in lines}


def test_script_logs_one_summary_per_k(image_folder, resnet18_file, tmp_path):
    dump = tmp_path / "knn"
    result = run_script("eval_knn.py", *fast_flags(image_folder, dump, "--nb_knn", 1, 3,
                                                   "--pretrained", resnet18_file,
                                                   "--use_cuda", "False"))
    assert_ok(result)
    scores = summary(result)
    assert list(scores) == [1, 3]
    assert scores[1][0] == 100.0  # val/ is a copy of train/: the nearest image is itself
    log = (dump / "out.log").read_text()
    assert log.count("-NN (T=0.07): top-1") == 2
    assert "encoder-only state dict" in log and "12 train and 12 val images" in log
    saved = json.loads((dump / "knn_results.json").read_text())
    assert {k: (v["top1"], v["top5"]) for k, v in saved.items()} == \
        {str(k): pytest.approx(v, abs=0.005) for k, v in scores.items()}


def test_torchrun_two_processes_match_one(image_folder, resnet18_file, tmp_path):
    flags = ("--nb_knn", 1, 5, "--pretrained", resnet18_file)
    one = run_script("eval_knn.py", *fast_flags(image_folder, tmp_path / "one", *flags))
    two = run_script("eval_knn.py", *fast_flags(image_folder, tmp_path / "two", *flags),
                     launcher=torchrun(2))
    assert_ok(one)
    assert_ok(two)
    assert summary(two) == summary(one) and len(summary(one)) == 2
    assert "2 process(es)" in two.stdout


def test_val_classes_must_match_train(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2, val_copy=False)
    make_image_folder(tmp_path / "valsrc", per_class=2, classes=("n01000001", "n09999999"),
                      val_copy=False)
    shutil.move(tmp_path / "valsrc" / "train", data / "val")
    result = run_script("eval_knn.py", *fast_flags(data, tmp_path / "out"))
    assert_usage_error(result, "val split", "n09999999")


def test_num_classes_smaller_than_the_data(image_folder, tmp_path):
    result = run_script("eval_knn.py", *fast_flags(image_folder, tmp_path / "out",
                                                   "--num_classes", 1))
    assert_usage_error(result, "--num_classes 1", "2 classes")


def dtype_recorder(encoder, seen):
    """`encoder`, recording the dtype of its first convolution's output in `seen`."""
    conv = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return encoder


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32),
                                              ("bf16", torch.bfloat16)])
def test_extraction_runs_the_encoder_under_precision_and_keeps_fp32(precision, dtype):
    torch.manual_seed(0)
    seen = []
    encoder = dtype_recorder(small_encoder(), seen)
    dataset = TensorImages(torch.randn(10, 3, 8, 8), torch.arange(10) % 2, 2)
    cpu = torch.device("cpu")
    how = Extraction(4, precision=precision)
    bank, _ = extract_features(encoder, dataset, how, cpu)
    shard, _, _ = extract_shard(encoder, dataset, how, cpu)
    assert set(seen) == {dtype} and bank.dtype == shard.dtype == torch.float32
    reference, _ = extract_features(encoder, dataset, Extraction(4), cpu)
    assert torch.allclose(bank, reference, atol=0.05 if precision == "bf16" else 0)
    assert torch.equal(shard, bank)


def test_eval_knn_extracts_under_its_precision(image_folder, resnet18_file, tmp_path,
                                               monkeypatch):
    """--precision bf16 reaches the encoder's arithmetic (it was listed and ignored)."""
    seen = []
    build = eval_knn.build_encoder
    monkeypatch.setattr(eval_knn, "build_encoder",
                        lambda *a, **k: (dtype_recorder(build(*a, **k)[0], seen), 512))
    eval_knn.main(fast_flags(image_folder, tmp_path, "--pretrained", resnet18_file,
                             "--precision", "bf16", "--nb_knn", 5))
    for handler in logging.getLogger(LOGGER_NAME).handlers:  # the run's log files
        handler.close()
    assert seen and set(seen) == {torch.bfloat16}
    assert json.loads((tmp_path / "knn_results.json").read_text())["5"]["top1"] >= 0


def test_cpu_bank_under_a_group_without_a_cpu_backend_equals_one_process(
        image_folder, resnet18_file, tmp_path):
    """`--use_cuda False` under NCCL: the CPU shards meet in collectives of a group whose
    only backend is for CUDA. A group made as "cuda:gloo" has no CPU backend either, so
    it stands in for NCCL on this machine: two processes started through the scripts'
    own set-up give the accuracies of one process."""
    flags = fast_flags(image_folder, tmp_path / "one", "--nb_knn", 1, 5,
                       "--pretrained", resnet18_file, "--use_cuda", "False")
    single = run_distributed(eval_knn.evaluate, cli.knn(get_args(flags, "eval_knn")))
    mp.spawn(knn_script_worker, nprocs=2, join=True,
             args=(str(tmp_path / "pg"), str(tmp_path), flags))
    for rank in range(2):
        assert torch.load(tmp_path / f"knn{rank}.pt") == single and len(single) == 2


def knn_script_worker(rank, init_file, out_dir, flags):
    """eval_knn.py's evaluation on one of two processes, its group's only backend for CUDA."""
    import os
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    args = get_args([*flags, "--dump_path", f"{out_dir}/two"], "eval_knn")  # the last one counts
    args.dist_backend, args.dist_url = "cuda:gloo", f"file://{init_file}"
    torch.save(run_distributed(eval_knn.evaluate, cli.knn(args)), f"{out_dir}/knn{rank}.pt")
