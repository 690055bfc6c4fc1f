"""Weighted k-NN evaluation of a pretrained encoder, as in DINO (SPEC §6).

`python eval_knn.py ...` runs one process; under `torchrun` every process encodes a
shard of the images, the feature banks are gathered by index on every process, and
each process then votes for its share of the test images. `--use_cuda False` keeps
the banks in CPU memory.
"""
import torch

from args import get_args
from src.data import dataset_info
from src.distributed import is_main_process, run_distributed
from src.engine import extract_features
from src.errors import exit_on_usage_error
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

    encoder, _ = build_encoder(args.arch, dataset_info(args.dataset).small_images)
    load_pretrained_encoder(encoder.to(args.device).eval(), args.pretrained)
    train, val = eval_datasets(args, "plain")
    log.info(f"{len(train)} train and {len(val)} val images of {len(train.classes)} classes")
    torch.backends.cudnn.benchmark = True

    bank_device = args.device if args.use_cuda else torch.device("cpu")
    banks = [extract_features(encoder, dataset, args.batch_size, args.workers, args.device,
                              bank_device=bank_device, normalize=True, desc=f"{name} features")
             for name, dataset in (("train", train), ("val", val))]
    log.info(f"features ready: train {tuple(banks[0][0].shape)}, val "
             f"{tuple(banks[1][0].shape)} on {bank_device}")
    results = knn_eval(*banks[0], *banks[1], args.nb_knn, args.knn_temperature,
                       args.num_classes, args.device)
    for k, (top1, top5) in results.items():
        log.info(f"{k}-NN (T={args.knn_temperature}): top-1 {top1:.2f} top-5 {top5:.2f}")
    if is_main_process():
        save_results(args.dump_path, RESULTS,
                     {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()})
    return results


@exit_on_usage_error
def main(argv=None):
    run_distributed(evaluate, get_args(argv, "eval_knn"))


if __name__ == "__main__":
    main()
