"""Weighted k-NN evaluation of a pretrained encoder, as in DINO (SPEC §6).

`python eval_knn.py ...` runs one process; under `torchrun` every process encodes a
shard of the images and keeps its shard of the training bank (1/W of it: ImageNet's
ResNet-50 bank is 10.5 GB in all), the test features are gathered on every process,
and each test chunk is searched against every shard, the per-shard top-k merged into
the whole bank's. `--use_cuda False` keeps each shard in CPU memory.
"""
import torch

from args import get_args
from src.distributed import is_main_process, run_distributed
from src.engine import extract_features, extract_shard
from src.errors import script_entry
from src.eval_data import eval_datasets
from src.knn import knn_classifier, knn_eval
from src.logger import save_results
from src.models import build_encoder
from src.pretrained import load_pretrained_encoder
from src.runtime import start_run

__all__ = ["evaluate", "knn_classifier", "main"]  # knn_classifier: kept importable here

RESULTS = "knn_results.json"


def evaluate(args):
    log = start_run(args)[0]

    encoder, _ = build_encoder(args.arch, args.stem == "cifar")
    load_pretrained_encoder(encoder.to(args.device).eval(), args.pretrained)
    train, val = eval_datasets(args, "plain")
    log.info(f"{len(train)} train and {len(val)} val images of {len(train.classes)} classes")
    torch.backends.cudnn.benchmark = True

    bank_device = args.device if args.use_cuda else torch.device("cpu")
    features = dict(normalize=True, bank_device=bank_device, precision=args.precision)
    bank, bank_labels, bank_index = extract_shard(encoder, train, args.batch_size, args.workers,
                                                  args.device, desc="train features", **features)
    test, test_labels = extract_features(encoder, val, args.batch_size, args.workers,
                                         args.device, desc="val features", **features)
    log.info(f"features ready on {bank_device}: this process's shard of the train bank "
             f"{tuple(bank.shape)} ({bank.numel() * bank.element_size() / 2**20:.1f} MiB) of "
             f"{len(train)} rows, val {tuple(test.shape)}")
    results = knn_eval(bank, bank_labels, test, test_labels, args.nb_knn, args.knn_temperature,
                       args.num_classes, train_index=bank_index, bank_size=len(train))
    for k, (top1, top5) in results.items():
        log.info(f"{k}-NN (T={args.knn_temperature}): top-1 {top1:.2f} top-5 {top5:.2f}")
    if is_main_process():
        save_results(args.dump_path, RESULTS,
                     {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()})
    return results


@script_entry
def main(argv=None):
    run_distributed(evaluate, get_args(argv, "eval_knn"))


if __name__ == "__main__":
    main()
