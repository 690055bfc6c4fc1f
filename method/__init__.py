"""Self-supervised methods. `get_method(args)` builds the module on CPU."""
from method.resa import ReSA

METHODS = {"resa": ReSA}


def get_method(args):
    return METHODS[getattr(args, "method", "resa")](args)
