"""One deep erase as `vmshield image erase`, `disk destroy` and the destroy worker run it.

`run_erase` is `nbd_plugin.erase.erase` with its outcomes as the product's errors: a busy
image stays `ImageBusy` (exit 75), Ctrl-C becomes `Interrupted` (130) and an I/O error an
`EraseError`, each saying that the same command resumes from the journal; a last pass that
did not read back as written becomes `VerificationFailed` (74), naming the certificate.
"""

from __future__ import annotations

from keystore.errors import KeystoreError
from keystore.services.interrupts import Interrupted
from nbd_plugin.erase import Certificate, EraseOptions
from nbd_plugin.erase import erase as erase_image
from nbd_plugin.erase.progress import Reporter
from nbd_plugin.errors import VerificationFailed


class EraseError(KeystoreError):
    """The erase stopped on an I/O error; its journal lets the same command resume."""


def run_erase(
    path: str, method: str, options: EraseOptions, reporter: Reporter | None = None
) -> Certificate:
    """Erase `path` with `method`; the certificate of a verified erase, else an error."""
    try:
        cert = erase_image(path, method, options, reporter)
    except KeyboardInterrupt:
        raise Interrupted(
            f"{path}: interrupted; run the same command again to continue where it stopped"
        ) from None
    except OSError as e:
        raise EraseError(
            f"{path}: {e.strerror or e}; run the same command again to resume"
        ) from None
    if not cert.verified:
        v = cert.data["verification"]
        raise VerificationFailed(
            f"{path}: verification FAILED: {v['mismatched_bytes']} bytes read back differ "
            f"(first at byte {v['first_mismatch']}); the image was kept for inspection. "
            f"Certificate: {cert.path}",
            certificate=cert.path,
            sha256=cert.sha256,
        )
    return cert
