"""Which GIMP-manual pages are held out of everything the translation task's evaluation must not have
seen: the translation task's held-out pages (`megakor.tasks.translation`) and, dropped for that reason,
from the default job's `gimp-help-ko` training text (`megakor.corpora`). Standalone (hashlib only), so
the corpus layer can import it."""

from __future__ import annotations

import hashlib

TRANSLATION_HELDOUT_FRACTION = 0.1  # share of GIMP-manual pages whose translation pairs are held out


def is_translation_heldout_page(page: str) -> bool:
    """Whether a GIMP-manual page (its file name, e.g. "gimp-tool-crop.html") is a held-out translation
    page: a hash of the name, the same on every machine and for every language of the manual."""
    digest = hashlib.sha256(f"gimp-help-translation/{page}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < TRANSLATION_HELDOUT_FRACTION
