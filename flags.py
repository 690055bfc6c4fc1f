"""Every flag of the scripts, in one table: its group, the scripts that read it, its
option strings and argparse keywords (args.py builds each script's parser from it).

Flag names and defaults follow the authors' repositories (winci-ai/resa and
resa_cifar) so that their commands run unchanged. A default of None is resolved after
parsing from the dataset's and the method's recipes (args.py); the help says how.
Each method's hyper-parameters are declared in its own file (method/*.py, HYPER).
"""
import argparse

from src.config import PRECISIONS
from src.data.datasets import DATASETS
from src.models import ARCHS

SCRIPTS = {
    "main": "ReSA self-supervised pretraining: `python main.py ...` runs one process, "
            "`torchrun ... main.py ...` one per GPU (or CPU process).",
    "eval_linear": "Linear probe (--weights freeze) or fine-tuning (--weights finetune) of a "
                   "pretrained encoder with a linear head.",
    "eval_knn": "Weighted k-NN evaluation of a pretrained encoder, as in DINO.",
    "clusters": "Clustering properties of a checkpoint's encodings and embeddings "
                "(silhouette, k-means ARI/NMI, k-NN) and their t-SNE picture.",
}
ALL, MAIN, LINEAR, KNN = set(SCRIPTS), {"main"}, {"eval_linear"}, {"eval_knn"}
CLUSTERS = {"clusters"}


def str2bool(value):
    """Parse 'True'/'False' as the authors' `--use_cuda False` intends."""
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


# (group, read by, option strings, argparse keywords), in the order --help shows them
FLAGS = [
    ("run", ALL, ("--dump_path",), dict(
        type=str, default=".",
        help="folder for checkpoints, out.log and TensorBoard events; a run resumes "
        "automatically from the checkpoint found here")),
    ("run", ALL, ("--seed",), dict(
        type=int, default=None,
        help="random seed: model initialisation, data order and augmentations (the "
        "views of sample i in epoch e are drawn from (seed, e, i) alone, whatever the "
        "number of workers or processes); unset = a random seed, logged and kept in the "
        "checkpoint")),
    ("run", MAIN | LINEAR, ("--checkpoint_minutes",), dict(
        type=float, default=30,
        help="also write the checkpoint inside an epoch every N minutes of training "
        "(rank 0's clock decides for every process); 0 = at epoch ends only")),
    ("run", MAIN | LINEAR, ("--checkpoint_iters",), dict(
        type=int, default=0,
        help="also write the checkpoint every N iterations; 0 = off")),
    ("run", MAIN | LINEAR, ("--log_every",), dict(
        type=int, default=50, help="iterations between two log lines in out.log")),
    ("run", ALL, ("--precision",), dict(
        type=str, default=None, choices=PRECISIONS,
        help="fp16 = float16 autocast with loss scaling (CUDA only), bf16 = bfloat16 "
        "autocast (CUDA or CPU), fp32 = no autocast; in main.py Sinkhorn-Knopp is fp32 in "
        "every mode; in eval_knn.py and clusters.py the encoder runs under it and the "
        "features are kept in fp32 (default: fp16 for main.py on CUDA, the authors' "
        "choice; fp32 for resa_cifar's recipe (cifar10/cifar100/stl10), for the "
        "evaluations, and on CPU)")),
    ("run", MAIN | LINEAR, ("--wandb_project",), dict(
        type=str, default=None,
        help="also log the TensorBoard scalars to this Weights & Biases project (rank 0; "
        "needs the optional wandb package; WANDB_MODE=offline logs without network); a "
        "restart continues the same W&B run, whose id is kept in --dump_path (default: "
        "resa_cifar for main.py on cifar10/cifar100/stl10, as resa_cifar does, else off; "
        "'' = off)")),
    ("run", MAIN | LINEAR, ("--env_name",), dict(
        type=str, default="resa_cifar", help="name of the Weights & Biases run")),

    ("speed", MAIN | LINEAR, ("--channels_last",), dict(
        type=str2bool, default=None,
        help="channels_last memory format for the networks and their inputs, True or False; "
        "numerics equal up to float rounding (default: True on CUDA, False on CPU)")),
    ("speed", MAIN | LINEAR, ("--fused",), dict(
        type=str2bool, default=None,
        help="fused optimizer step: one kernel for all parameters and, with fp16 loss "
        "scaling, no host synchronisation; True or False (default: True on CUDA, False on "
        "CPU)")),
    ("speed", MAIN, ("--compile",), dict(
        type=str, nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="torch.compile every network (encoder, projector, predictor and the momentum "
        "copies) with BACKEND (inductor if none is named; aot_eager compiles fast, for "
        "checks); off unless given")),

    ("data", ALL, ("--dataset",), dict(
        type=str, default="imagenet", choices=tuple(DATASETS),
        help="imagenet = any ImageFolder with train/ (and val/) under --data_path; "
        "cifar10/cifar100/stl10 through torchvision; fashion_mnist from the Debian "
        "package dataset-fashion-mnist; demo = a small synthetic ImageFolder this project "
        "generates into --data_path; your own images (README 'Your own images'): folder = "
        "every image under --data_path, any layout, no labels (pretraining); filelist = "
        "a .csv (path,label) or .txt (path [label]) list, or for the evaluations a folder "
        "with train.csv and val.csv; shards = WebDataset tar shards (pretraining)")),
    ("data", ALL, ("--data_path",), dict(
        type=str, default=None,
        help="dataset folder, list (filelist) or shard pattern such as "
        "'DIR/train-{000000..000099}.tar' (shards) (required for imagenet, folder, filelist "
        "and shards; default: ./data for torchvision datasets and fashion_mnist, "
        "./data/demo for demo)")),
    ("data", ALL, ("--mean",), dict(
        type=float, nargs=3, default=None, metavar=("R", "G", "B"),
        help="per-channel mean of the images' normalisation, pixels in [0, 1]; give the "
        "same to the evaluations (default: the dataset's statistics; ImageNet's for "
        "imagenet, folder, filelist, shards and demo)")),
    ("data", ALL, ("--std",), dict(
        type=float, nargs=3, default=None, metavar=("R", "G", "B"),
        help="per-channel standard deviation of the images' normalisation (default: the "
        "dataset's, as --mean)")),
    ("data", MAIN, ("--data_backend",), dict(
        type=str, default="pil", choices=("pil", "gpu"),
        help="pil = the authors' pipeline, decoded and augmented with PIL in the loader "
        "workers; gpu = workers only read the files, JPEGs are decoded in batches on the "
        "GPU (nvjpeg) and the views made there with the same laws (on CPU it runs too)")),
    ("data", MAIN, ("--crops_nmb",), dict(
        type=int, nargs="+", default=[1],
        help="number of strong views per crop group, e.g. 1 or 1 6")),
    ("data", ALL, ("--crops_size",), dict(
        type=int, nargs="+", default=None,
        help="crop resolution per group; the weak view and the evaluations use the first "
        "(default: 224; 32 on cifar10/cifar100/stl10/fashion_mnist/demo)")),
    ("data", MAIN, ("--crops_min_scale",), dict(
        type=float, nargs="+", default=[0.2], help="RandomResizedCrop lower scale per group")),
    ("data", MAIN, ("--crops_max_scale",), dict(
        type=float, nargs="+", default=[1.0], help="RandomResizedCrop upper scale per group")),
    ("data", MAIN, ("--solarization_prob",), dict(
        type=float, nargs="+", default=[0.2],
        help="solarization probability of the strong views per group")),
    ("data", MAIN, ("--size_dataset",), dict(
        type=int, default=-1, help="keep only the first N training samples; -1 keeps all")),
    ("data", ALL, ("--workers",), dict(
        type=int, default=8, help="data-loading worker processes per process")),

    ("architecture", ALL, ("-a", "--arch"), dict(
        type=str, default=None, metavar="ARCH",
        help="encoder: " + ", ".join(ARCHS) + " (torchvision's), or the name of any timm "
        "model, e.g. vit_small_patch16_224, vit_base_patch16_224, convnext_tiny (needs "
        "timm; built without weights and without its classifier; the README's Backbones "
        "section) (default: resnet50 on imagenet, resnet18 elsewhere)")),
    ("architecture", ALL, ("--patch_size",), dict(
        type=int, default=None,
        help="patch size of a timm ViT, whose position embedding is sized for "
        "--crops_size[0] and interpolated for the other crops; every crop size must be a "
        "multiple of it (default: the model's, e.g. 16 for vit_small_patch16_224)")),
    ("architecture", ALL, ("--stem",), dict(
        type=str, default=None, choices=("imagenet", "cifar"),
        help="the ResNets' first layers (a timm --arch keeps its own: this flag is not read "
        "then): imagenet = 7x7 stride-2 conv and max-pool; cifar = resa_cifar's 3x3 stride-1 "
        "conv zero-padding by 2, no max-pool (a 32 px image gives 34x34 maps through "
        "layer1 instead of 8x8, about 6x the cost) (default: cifar on "
        "cifar10/cifar100/fashion_mnist, imagenet elsewhere, stl10 included as in "
        "resa_cifar); evaluate with the stem "
        "the encoder was trained with")),
    ("architecture", MAIN, ("--mlp_layers",), dict(
        type=int, default=None,
        help="number of Linear layers in the projector (default: 3; the --method's recipe "
        "may say otherwise, see its group)")),
    ("architecture", MAIN, ("--mlp_dim",), dict(
        type=int, default=None,
        help="hidden width of the projector and predictor (default: 2048, or the --method's)")),
    ("architecture", MAIN, ("--emb",), dict(
        type=int, default=None,
        help="embedding (projector output) size (default: 512, or the --method's)")),
    ("architecture", MAIN, ("--pred",), dict(
        dest="pred", action="store_const", const=True, default=None,
        help="train with a predictor on the online branch (default: on, except on "
        "cifar10/cifar100/stl10, where resa_cifar has none)")),
    ("architecture", MAIN, ("--no_pred",), dict(
        dest="pred", action="store_const", const=False,
        help="train without the predictor")),

    ("optimization", MAIN | LINEAR, ("--epochs",), dict(
        type=int, default=None,
        help="training epochs (default: 100; 1000 on cifar10/cifar100/stl10)")),
    ("optimization", ALL, ("--batch_size",), dict(
        type=int, default=256,
        help="batch size per process (B); the total batch is B x world size")),
    ("optimization", MAIN, ("--lr",), dict(
        type=float, default=None,
        help="base learning rate, scaled by total batch / 256 (default: 0.5; 0.3 on "
        "cifar10/cifar100/stl10; 5e-4 for timm backbones)")),
    ("optimization", MAIN, ("--final_lr",), dict(
        type=float, default=None,
        help="learning rate at the end of the cosine, absolute (default: 0.1 x the scaled "
        "lr)")),
    ("optimization", MAIN, ("--wd", "--weight_decay"), dict(
        dest="wd", type=float, default=None,
        help="weight decay, at the start of its schedule (default: 1e-5; 1e-4 on "
        "cifar10/cifar100/stl10; 0.04 for timm backbones)")),
    ("optimization", MAIN, ("--weight_decay_end",), dict(
        type=float, default=None,
        help="weight decay at the end: a half-cosine from --wd to this, per iteration "
        "(default: --wd, constant; 0.4 for timm backbones, as DINO)")),
    ("optimization", MAIN, ("--wd_norms_biases",), dict(
        type=str2bool, default=None,
        help="weight decay on the biases and 1-D tensors (norms) too, True or False "
        "(default: True, as the authors; False for timm backbones)")),
    ("optimization", MAIN, ("--clip_grad",), dict(
        type=float, default=None,
        help="clip the gradients' total norm to this before each step (after taking out "
        "the fp16 loss scale); 0 = off (default: 0; 3.0 for timm backbones, as DINO)")),
    ("optimization", MAIN, ("--optimizer",), dict(
        type=str, default=None, choices=("sgd", "adamw"),
        help="SGD uses momentum 0.9 (default: sgd; adamw for timm backbones)")),
    ("optimization", MAIN, ("--warmup_epochs",), dict(
        type=int, default=2, help="linear learning-rate warm-up from 0, in epochs")),

    ("distributed (torchrun or SLURM set these up)", set(), ("--world_size",), dict(
        type=int, default=1,
        help="ignored: the launcher's WORLD_SIZE (or SLURM_NTASKS) decides; accepted so "
        "that the authors' commands parse")),
    ("distributed (torchrun or SLURM set these up)", set(), ("--rank",), dict(
        type=int, default=0,
        help="ignored: the launcher's RANK (or SLURM_PROCID) decides; accepted so that the "
        "authors' commands parse")),
    ("distributed (torchrun or SLURM set these up)", ALL, ("--dist-backend", "--dist_backend"),
     dict(dest="dist_backend", type=str, default=None, choices=("nccl", "gloo"),
          help="process-group backend (default: nccl on CUDA, gloo on CPU)")),
    ("distributed (torchrun or SLURM set these up)", ALL, ("--dist-url", "--dist_url"), dict(
        dest="dist_url", type=str, default="env://", help="process-group init method")),
    ("distributed (torchrun or SLURM set these up)", ALL,
     ("--no-set-device-rank", "--no_set_device_rank"), dict(
         dest="no_set_device_rank", action="store_true",
         help="use cuda:0 in every process (when CUDA_VISIBLE_DEVICES already gives each "
         "process one GPU)")),

    ("online monitor (main.py, non-ImageNet datasets)", MAIN, ("--eval_every",), dict(
        type=int, default=5,
        help="after the first epoch, every N epochs and after the last: 5-NN, weighted "
        "k-NN and a linear classifier on the evaluated encoder's features (the momentum "
        "encoder for resa); 0 disables")),
    ("online monitor (main.py, non-ImageNet datasets)", MAIN, ("--eval_at_start",), dict(
        action="store_true",
        help="also run the monitor before the first step, on the initialisation (the "
        "first point of an accuracy-versus-minutes curve)")),

    ("evaluation", LINEAR | KNN | CLUSTERS, ("--pretrained",), dict(
        type=str, default="",
        help="checkpoint to evaluate: our checkpoint.pth.tar, the authors' full or "
        "encoder-only release, or an exported encoder; empty = a randomly initialised "
        "encoder (the random baseline)")),
    ("evaluation", ALL, ("--num_classes",), dict(
        type=int, default=None,
        help="classifier outputs (default: the dataset's number of classes)")),
    ("evaluation", LINEAR, ("--weights",), dict(
        type=str, default="freeze", choices=("freeze", "finetune"),
        help="freeze = linear probe on a frozen encoder in eval mode; finetune = train "
        "encoder and head")),
    ("evaluation", LINEAR, ("--train_percent",), dict(
        type=int, default=100, choices=(100, 10, 1),
        help="train on the standard ImageNet 1%% or 10%% subset")),
    ("evaluation", LINEAR, ("--train_files",), dict(
        type=str, default=None,
        help="subset list (one training file name a line) for --train_percent 1/10 "
        "(default: the public list shipped in src/data/imagenet_subset/, as the authors ship "
        "it; nothing is downloaded)")),
    ("evaluation", LINEAR, ("--lr_encoder",), dict(
        type=float, default=2e-4,
        help="fine-tuning encoder base lr, scaled by total batch / 256")),
    ("evaluation", LINEAR, ("--lr_classifier",), dict(
        type=float, default=40.0,
        help="head base lr, scaled by total batch / 256 (use 10 for a batch-256 "
        "pretraining)")),
    ("evaluation", LINEAR, ("--scheduler",), dict(
        type=str, default="step", choices=("step", "cos"),
        help="step = x0.1 at epochs 60 and 80; cos = cosine to 0")),
    ("evaluation", KNN | MAIN | CLUSTERS, ("--nb_knn",), dict(
        type=int, nargs="+", default=[5, 10, 15, 20, 25],
        help="k values of the weighted k-NN (the monitor uses the one nearest 20)")),
    ("evaluation", KNN | MAIN | CLUSTERS, ("--knn_temperature",), dict(
        type=float, default=0.07, help="temperature of the weighted k-NN votes")),
    ("evaluation", KNN, ("--use_cuda",), dict(
        type=str2bool, default=True,
        help="keep the k-NN feature bank on the GPU; False keeps it in CPU memory")),
]
