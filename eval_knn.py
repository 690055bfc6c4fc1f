"""Weighted k-NN evaluation of a pretrained encoder, as in DINO (SPEC §6).

`python eval_knn.py ...` runs one process; under `torchrun` every process encodes a
shard of the images and keeps its shard of the training bank (1/W of it: ImageNet's
ResNet-50 bank is 10.5 GB in all), the test features are gathered on every process,
and each test chunk is searched against every shard, the per-shard top-k merged into
the whole bank's. `--use_cuda False` keeps each shard in CPU memory.
"""
import torch

import args
from src.data.datasets import eval_datasets
from src.distributed import is_main_process, run_distributed
from src.errors import script_entry
from src.eval.features import Extraction, extract_features, extract_shard
from src.eval.knn import Bank, knn_classifier, knn_eval
from src.eval.pretrained import load_pretrained_encoder
from src.logger import save_results
from src.models import build_encoder
from src.train.startup import start_run

__all__ = ["evaluate", "knn_classifier", "main"]  # knn_classifier: kept importable here

RESULTS = "knn_results.json"


def evaluate(config, processes):
    run, data, knn = config.run, config.data, config.knn
    log, device = start_run(run, processes, workers=data.workers).log, processes.device
    encoder, _ = build_encoder(config.encoder)
    load_pretrained_encoder(encoder.to(device).eval(), knn.pretrained)
    train, val = eval_datasets(data, knn.crops_size[0], knn.num_classes, "plain")
    log.info(f"{len(train)} train and {len(val)} val images of {len(train.classes)} classes")
    torch.backends.cudnn.benchmark = True

    bank_device = device if knn.use_cuda else torch.device("cpu")
    how = Extraction(data.batch_size, data.workers, run.precision, True, bank_device)
    bank = Bank(*extract_shard(encoder, train, how, device, "train features"), len(train))
    test, test_labels = extract_features(encoder, val, how, device, "val features")
    mib = bank.features.numel() * bank.features.element_size() / 2**20
    log.info(f"features ready on {bank_device}: this process's shard of the train bank "
             f"{tuple(bank.features.shape)} ({mib:.1f} MiB) of {len(train)} rows, val "
             f"{tuple(test.shape)}")
    results = knn_eval(bank, test, test_labels, knn.nb_knn, knn.knn_temperature,
                       knn.num_classes)
    for k, (top1, top5) in results.items():
        log.info(f"{k}-NN (T={knn.knn_temperature}): top-1 {top1:.2f} top-5 {top5:.2f}")
    if is_main_process():
        save_results(run.dump_path, RESULTS,
                     {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()})
    return results


@script_entry
def main(argv=None):
    run_distributed(evaluate, args.knn(args.get_args(argv, "eval_knn")))


if __name__ == "__main__":
    main()
