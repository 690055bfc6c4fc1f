"""Self-supervised methods: one file each, registered here by name (--method)."""
from method.byol import BYOL
from method.resa import ReSA
from method.simclr import SimCLR
from method.swav import SwAV
from src.models import build_encoder

METHODS = {"resa": ReSA, "byol": BYOL, "swav": SwAV, "simclr": SimCLR}


def build_model(method, heads, encoder):
    """The method of config.Method `method` (on CPU), with the heads of config.Heads
    `heads`, handed a new encoder of config.Encoder `encoder`."""
    return METHODS[method.method](*build_encoder(encoder), heads, **method.hyper)
