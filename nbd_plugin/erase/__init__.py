"""Deep erase of LUKS images and block devices: `erase(path, method)` runs the whole order
resumably and returns the certificate; `METHODS` lists the methods as data. Its modules:
docs/architecture.md.
"""

from nbd_plugin.erase.certificate import Certificate
from nbd_plugin.erase.engine import EraseOptions, erase
from nbd_plugin.erase.methods import METHODS, Method, Pattern, get_method

__all__ = ["METHODS", "Certificate", "EraseOptions", "Method", "Pattern", "erase", "get_method"]
