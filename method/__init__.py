"""Self-supervised methods. `get_method(args)` builds the module on CPU."""
from method.resa import ReSA
from src.models import pretraining_encoder

METHODS = {"resa": ReSA}


def get_method(args, encoder=None, feature_dim=None):
    """The method of `args` around `encoder` (default: the pretraining encoder that
    the flags describe, see `src.models.pretraining_encoder`)."""
    if encoder is None:
        encoder, feature_dim = pretraining_encoder(args.arch, args.dataset, args.stem)
    return METHODS[getattr(args, "method", "resa")](
        encoder, feature_dim, mlp_layers=args.mlp_layers, mlp_dim=args.mlp_dim,
        emb=args.emb, predictor=args.pred, momentum=args.momentum,
        temperature=args.temperature)
