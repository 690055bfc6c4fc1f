"""Run a script as `python SCRIPT ARGS...` does, offline and trusting the tests' data:

- no way to the network: connections and name look-ups for anything but this machine
  raise OSError, so a script that tried to download would fail;
- torchvision's md5 check of the CIFAR and STL-10 files is off: the tests' tiny
  stand-ins of those archives (in torchvision's own format, see helpers_eval.py) cannot
  match the real checksums, and with the check on torchvision would try a download.

    python tests/offline_run.py main.py --dataset cifar100 ...
"""
import os
import runpy
import socket
import sys

from torchvision.datasets import cifar, stl10

LOCAL = {"127.0.0.1", "::1", "localhost", None}
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo


def local_connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
        raise OSError(f"offline test run: no connection to {address}")
    return _connect(sock, address)


def local_getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL:
        raise socket.gaierror(f"offline test run: no name look-up of {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.getaddrinfo = local_connect, local_getaddrinfo
cifar.check_integrity = stl10.check_integrity = lambda *args, **kwargs: True
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` sets it
runpy.run_path(sys.argv[0], run_name="__main__")
