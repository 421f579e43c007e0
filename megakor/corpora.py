"""Small, real, offline-fetchable text for the default job, the tests and the benches.

Korean comes from three public packages that need neither a data hub nor a login:
- the `konlpy` wheel on PyPI carries KoNLPy's corpora: the Constitution of the Republic of Korea
  (`kolaw`) and ten National Assembly bills (`kobill`). It is fetched with `pip download` and read
  out of the zip; it is never installed (it would pull in JPype and Java).
- Debian's `debian-faq-ko` (the Debian FAQ in Korean) and `gimp-help-ko` (the GIMP manual, of which
  only part is translated: we keep the Korean paragraphs). Both are fetched with
  `apt-get download` and unpacked with `dpkg-deb -x`; their HTML is reduced to paragraphs of text.
English replay text is Python's own `pydoc_data.topics` (the help topics), present in every Python.

Everything lands in a cache directory (`$MEGAKOR_CACHE`, else `~/.cache/megakor`) and is fetched
once. Documents are split into train and held-out sets by a hash of their id, so the split is the
same on every machine and evaluation text is never trained on.

    python -m megakor.corpora [CACHE]      # fetch, write the JSONL files, print their sizes
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

KONLPY_VERSION = "0.6.0"  # pinned so every machine reads the same corpus text
DEBIAN_PACKAGES = ("debian-faq-ko", "gimp-help-ko")
HELDOUT_FRACTION = 0.1  # share of documents held out for evaluation
DOC_TARGET_CHARS = 1500  # paragraphs are grouped into documents of about this many characters
# Bump when the text extraction changes, so cached document files are rebuilt rather than reused.
# 2: gimp-help-ko without the translation task's held-out pages.
_EXTRACT_VERSION = 2

_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


class CorpusUnavailable(RuntimeError):
    """A source could not be fetched (no network, no apt, no pip); the message names the fix."""


@dataclass(frozen=True)
class Document:
    id: str  # stable across machines: "<source>/<file>#<index>"; the train/held-out split hashes it
    source: str  # "kolaw", "kobill", "debian-faq-ko", "gimp-help-ko", "pydoc-topics"
    text: str  # NFC, paragraphs separated by one blank line


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache` if given, else `$MEGAKOR_CACHE`, else `~/.cache/megakor`."""
    path = Path(cache or os.environ.get("MEGAKOR_CACHE") or Path.home() / ".cache" / "megakor")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- text helpers


def hangul_count(text: str) -> int:
    """Number of Hangul syllables and jamo in `text`."""
    return len(_HANGUL.findall(text))


def _clean_paragraph(text: str) -> str:
    # NFC first: the same syllable can arrive precomposed or as jamo, and the tokenizer sees bytes.
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"[ \t\u00a0\u3000]+", " ", text).strip()


def group_paragraphs(paragraphs: list[str], target_chars: int = DOC_TARGET_CHARS) -> list[str]:
    """Join consecutive paragraphs (blank-line separated) into documents of at least `target_chars`
    characters (the last one may be shorter), so that held-out text is whole passages, not lines."""
    documents, current, size = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= target_chars:
            documents.append("\n\n".join(current))
            current, size = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


class _HTMLText(html.parser.HTMLParser):
    """Collects the visible text of an HTML page as paragraphs: block elements end a paragraph,
    whitespace inside a paragraph collapses (as a browser renders it) except inside <pre>."""

    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "td", "th", "table",
              "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "title", "hr"}
    _HIDDEN = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._hidden = 0
        self._pre = 0

    def _flush(self) -> None:
        text = "".join(self._current)
        self._current = []
        lines = text.split("\n") if self._pre else [text]
        for line in lines:
            line = _clean_paragraph(line if self._pre else re.sub(r"\s+", " ", line))
            if line:
                self.paragraphs.append(line)

    def handle_starttag(self, tag, attrs):
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCK:
            self._flush()
            self._pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCK:
            self._flush()
            self._pre = max(0, self._pre - (tag == "pre"))

    def handle_data(self, data):
        if not self._hidden:
            self._current.append(data)

    def close(self):
        super().close()
        self._flush()


def html_paragraphs(markup: str) -> list[str]:
    """The visible text of an HTML page as a list of paragraphs (NFC, whitespace collapsed)."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return parser.paragraphs


def unwrap_pdf_lines(text: str) -> list[str]:
    """Paragraphs of KoNLPy's bill texts, which are PDF extractions with one line per printed line
    (every line followed by a blank one) and page markers like "- 3 -". A printed line that ends
    without a space inside a word is glued to the next one; Korean wraps mid-word, so joining with a
    space would invent word boundaries the tokenizer would then learn."""
    lines = [ln for ln in text.replace("\x0c", "\n").split("\n") if ln.strip()]
    lines = [ln for ln in lines if not re.fullmatch(r"\s*-\s*\d+\s*-\s*", ln)]
    paragraphs: list[str] = []
    current, previous = "", ""
    for line in lines:
        # A full printed line (>= 25 characters) continues into the next unless that one is
        # indented, which is how the bills start a paragraph or a list entry.
        if current and len(previous.rstrip()) >= 25 and not line.startswith(" "):
            current = current.rstrip() + " " + line if previous.endswith(" ") else current + line
        else:
            paragraphs.append(current)
            current = line
        previous = line
    paragraphs.append(current)
    return [p for p in (_clean_paragraph(p) for p in paragraphs) if p]


# ---------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path, fix: str) -> None:
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusUnavailable(f"`{' '.join(cmd)}` could not run ({exc}); {fix}") from exc
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CorpusUnavailable(f"`{' '.join(cmd)}` failed ({reason[0]}); {fix}")


def _downloads(cache: Path) -> Path:
    path = cache / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_pypi_wheel(package: str, version: str, filename: str, cache: str | os.PathLike | None = None) -> Path:
    """A wheel (`filename`) of `package`==`version` in the cache, downloaded with `pip download --no-deps`
    on first use."""
    downloads = _downloads(cache_dir(cache))
    if not (downloads / filename).exists():
        # Download into a private folder and move, so concurrent callers never see half a file.
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                  f"{package}=={version}", "-d", tmp], Path(tmp),
                 f"fetch it where PyPI is reachable with `pip download --no-deps {package}=={version} "
                 f"-d {downloads}`")
            os.replace(Path(tmp) / filename, downloads / filename)
    return downloads / filename


def fetch_konlpy_wheel(cache: str | os.PathLike | None = None) -> Path:
    """The konlpy wheel in the cache."""
    return fetch_pypi_wheel("konlpy", KONLPY_VERSION, f"konlpy-{KONLPY_VERSION}-py2.py3-none-any.whl", cache)


def fetch_deb(package: str, cache: str | os.PathLike | None = None) -> Path:
    """The unpacked tree of a Debian package in the cache (`apt-get download` + `dpkg-deb -x`)."""
    root = cache_dir(cache)
    tree = root / "debian" / package
    if (tree / ".complete").exists():
        return tree
    downloads = _downloads(root)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise CorpusUnavailable(
                f"apt-get is not available to fetch {package}; download {package}_*.deb from "
                f"packages.debian.org into {downloads}")
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            fix = (f"run `apt-get update` (as root) where deb.debian.org is reachable, or put "
                   f"{package}_*.deb into {downloads}")
            try:
                _run(["apt-get", "download", package], Path(tmp), fix)
            except CorpusUnavailable:
                if os.geteuid() != 0:
                    raise
                # A fresh machine has no package lists yet: fetch them once, as root, and retry.
                _run(["apt-get", "update", "-qq"], Path(tmp), fix)
                _run(["apt-get", "download", package], Path(tmp), fix)
            for deb in Path(tmp).glob(f"{package}_*.deb"):
                os.replace(deb, downloads / deb.name)
        debs = sorted(downloads.glob(f"{package}_*.deb"))
    if shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable(f"dpkg-deb is needed to unpack {debs[-1].name}; install dpkg")
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=f".{package}-"))
    try:
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], tmp, f"remove {debs[-1]} and fetch it again")
        (tmp / ".complete").touch()
        if not (tree / ".complete").exists():  # another process may have finished first
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(tmp, tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


# ---------------------------------------------------------------- sources


def _documents_from(source: str, name: str, paragraphs: list[str]) -> list[Document]:
    return [Document(f"{source}/{name}#{i}", source, text)
            for i, text in enumerate(group_paragraphs(paragraphs))]


def _konlpy_documents(cache: Path) -> list[Document]:
    documents = []
    with zipfile.ZipFile(fetch_konlpy_wheel(cache)) as wheel:
        for member in sorted(wheel.namelist()):
            match = re.fullmatch(r"konlpy/data/corpus/(kolaw|kobill)/(.+\.txt)", member)
            if not match:
                continue
            source, name = match.groups()
            text = wheel.read(member).decode("utf-8").replace("\r\n", "\n")
            if source == "kobill":
                paragraphs = unwrap_pdf_lines(text)
            else:  # the constitution: one article or paragraph per line
                paragraphs = [p for p in (_clean_paragraph(ln) for ln in text.split("\n")) if p]
            documents += _documents_from(source, name, paragraphs)
    return documents


def _html_documents(source: str, folder: Path) -> list[Document]:
    documents, seen = [], set()
    for page in sorted(folder.glob("*.html")):
        # Only Korean paragraphs: gimp-help-ko leaves much of the manual in English. Repeated
        # paragraphs (navigation, menu names) are kept once, so none straddles the split.
        paragraphs = []
        for paragraph in html_paragraphs(page.read_text(encoding="utf-8", errors="replace")):
            if hangul_count(paragraph) and paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
        if sum(map(hangul_count, paragraphs)) >= 20:  # skip pages that are a title and links
            documents += _documents_from(source, page.name, paragraphs)
    return documents


def _debian_faq_documents(cache: Path) -> list[Document]:
    return _html_documents("debian-faq-ko", fetch_deb("debian-faq-ko", cache) / "usr/share/doc/debian/FAQ/ko")


def _gimp_help_documents(cache: Path) -> list[Document]:
    return _html_documents("gimp-help-ko", fetch_deb("gimp-help-ko", cache) / "usr/share/gimp/2.0/help/ko")


def _cached(cache: Path, name: str, build) -> list[Document]:
    """Documents of one source, extracted once and kept as JSONL next to the downloads."""
    path = cache / "documents" / f"{name}.v{_EXTRACT_VERSION}.jsonl"
    if not path.exists():
        write_jsonl(build(cache), path, with_ids=True)
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def konlpy_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """KoNLPy's `kolaw` (the Constitution) and `kobill` (ten bills) as documents."""
    return _cached(cache_dir(cache), "konlpy", _konlpy_documents)


def debian_faq_ko_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """The Debian FAQ in Korean (Debian package `debian-faq-ko`) as documents."""
    return _cached(cache_dir(cache), "debian-faq-ko", _debian_faq_documents)


def gimp_help_ko_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """The Korean paragraphs of the GIMP manual (Debian package `gimp-help-ko`) as documents, less the
    pages the Korean–English translation task holds out (never trained on, so its chrF is honest)."""
    from megakor.tasks.heldout import is_translation_heldout_page

    return [d for d in _cached(cache_dir(cache), "gimp-help-ko", _gimp_help_documents)
            if not is_translation_heldout_page(d.id.split("/", 1)[1].split("#", 1)[0])]


def pydoc_topics_documents() -> list[Document]:
    """Python's help topics (`pydoc_data.topics`), English, shipped with the interpreter."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        paragraphs = [p for p in (_clean_paragraph(b) for b in re.split(r"\n\s*\n", topics[name])) if p]
        documents += _documents_from("pydoc-topics", name, paragraphs)
    return documents


def korean_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """All Korean documents: KoNLPy's corpora, the Debian FAQ and the GIMP manual."""
    return konlpy_documents(cache) + debian_faq_ko_documents(cache) + gimp_help_ko_documents(cache)


def _libreoffice_help_documents(cache: Path) -> list[Document]:
    root = fetch_deb("libreoffice-help-ko", cache) / "usr/share/libreoffice/help/ko"
    documents = []
    for folder in sorted({page.parent for page in root.rglob("*.html")}):
        name = folder.relative_to(root).as_posix().replace("/", "-") or "root"
        documents += _html_documents(f"libreoffice-help-ko/{name}", folder)
    return [Document(d.id, "libreoffice-help-ko", d.text) for d in documents]


def libreoffice_help_ko_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """The Korean paragraphs of LibreOffice's help (Debian package `libreoffice-help-ko`): office
    software, a domain no training source covers: the default job's second held-out Korean domain, never
    trained on (bench/recipe.py --wide trains on all but its held-out pages, `prepare_wide_corpora`)."""
    return _cached(cache_dir(cache), "libreoffice-help-ko", _libreoffice_help_documents)


def prepare_heldout_domain(cache: str | os.PathLike | None = None) -> Path:
    """`<cache>/corpora/ko2.heldout.jsonl`: the LibreOffice help, all of it held out, in the order of a
    hash of each document id (so a prefix of the file is a sample of the whole manual)."""
    root = cache_dir(cache)
    path = root / "corpora" / f"v{_EXTRACT_VERSION}-ko2" / "ko2.heldout.jsonl"
    if not path.exists():
        documents = libreoffice_help_ko_documents(root)
        documents.sort(key=lambda d: hashlib.sha256(d.id.encode("utf-8")).digest())
        write_jsonl(documents, path)
    return path


def prepare_wide_corpora(cache: str | os.PathLike | None = None,
                         heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, Path]:
    """`prepare_corpora`'s files, except that Korean training also reads LibreOffice's help: all of it but
    its held-out share (`is_heldout`, as for every source), which becomes `ko2.heldout` in the order of
    `prepare_heldout_domain`. Those held-out pages are that file's leading ones, so a prefix of it is the
    same text whichever mode scores it; the rest of the manual is trained on, and the domain is no longer
    unseen. About five times the Korean training text: for budgets at which the training sources alone
    would be read again. Returns prepare_corpora's keys plus "ko2.heldout"."""
    root = cache_dir(cache)
    narrow = prepare_corpora(cache, heldout_fraction)
    folder = root / "corpora" / f"v{_EXTRACT_VERSION}-wide{heldout_fraction:g}"
    paths = {**narrow, "ko.train": folder / "ko.train.jsonl", "ko2.heldout": folder / "ko2.heldout.jsonl"}
    built = all(paths[k].exists() for k in ("ko.train", "ko2.heldout"))
    if not built or paths["ko.train"].stat().st_mtime < narrow["ko.train"].stat().st_mtime:  # narrow rebuilt
        manual = libreoffice_help_ko_documents(root)
        manual.sort(key=lambda d: hashlib.sha256(d.id.encode("utf-8")).digest())
        train, heldout = split_documents(manual, heldout_fraction)
        sources = [Document(f"train-{n}", "ko", t) for n, t in enumerate(read_texts(narrow["ko.train"]))]
        write_jsonl(sources + train, paths["ko.train"])
        write_jsonl(heldout, paths["ko2.heldout"])
    return paths


def english_documents() -> list[Document]:
    """English replay documents (Python's help topics)."""
    return pydoc_topics_documents()


# ---------------------------------------------------------------- split and files


def is_heldout(doc_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether a document belongs to the held-out set: a hash of its id, the same everywhere."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_documents(documents: list[Document], heldout_fraction: float = HELDOUT_FRACTION
                    ) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by `is_heldout`."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} is outside [0, 1); use e.g. 0.1")
    heldout = [d for d in documents if is_heldout(d.id, heldout_fraction)]
    train = [d for d in documents if not is_heldout(d.id, heldout_fraction)]
    return train, heldout


def write_jsonl(documents: list[Document], path: str | os.PathLike, with_ids: bool = False) -> Path:
    """Write `{"text": ...}` per line (plus "id" and "source" if `with_ids`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                     suffix=".tmp") as f:
        for d in documents:
            record = {"id": d.id, "source": d.source, "text": d.text} if with_ids else {"text": d.text}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.chmod(f.name, 0o644)  # temporary files are private; the cache is shared
    os.replace(f.name, path)
    return path


def prepare_corpora(cache: str | os.PathLike | None = None,
                    heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, Path]:
    """Fetch every source and write `ko.train.jsonl`, `ko.heldout.jsonl`, `en.train.jsonl`,
    `en.heldout.jsonl` under `<cache>/corpora/`; returns {"ko.train": path, ...}. Cheap when the
    files exist already."""
    root = cache_dir(cache)
    folder = root / "corpora" / f"v{_EXTRACT_VERSION}-heldout{heldout_fraction:g}"
    paths = {f"{lang}.{part}": folder / f"{lang}.{part}.jsonl"
             for lang in ("ko", "en") for part in ("train", "heldout")}
    if all(p.exists() for p in paths.values()):
        return paths
    for lang, documents in (("ko", korean_documents(root)), ("en", english_documents())):
        train, heldout = split_documents(documents, heldout_fraction)
        write_jsonl(train, paths[f"{lang}.train"])
        write_jsonl(heldout, paths[f"{lang}.heldout"])
    return paths


def read_texts(paths, field: str = "text") -> list[str]:
    """Documents from JSONL files (the `field` of each line) or plain text files (the whole file
    as one document), in order. Paths may be str or Path; `.jsonl`/`.json` are read as JSONL."""
    texts = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"corpus file {path} does not exist; pass existing JSONL or text files")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if field not in record:
                            raise ValueError(f"{path}:{number} has no {field!r} field; "
                                             f"write one JSON object with a {field!r} string per line")
                        texts.append(record[field])
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def source_stats(documents: list[Document]) -> dict[str, dict[str, int]]:
    """Per source: documents, characters and Hangul characters."""
    stats: dict[str, dict[str, int]] = {}
    for d in documents:
        s = stats.setdefault(d.source, {"documents": 0, "chars": 0, "hangul_chars": 0})
        s["documents"] += 1
        s["chars"] += len(d.text)
        s["hangul_chars"] += hangul_count(d.text)
    return stats


if __name__ == "__main__":
    root = cache_dir(sys.argv[1] if len(sys.argv) > 1 else None)
    for lang, documents in (("ko", korean_documents(root)), ("en", english_documents())):
        train, heldout = split_documents(documents)
        for part, docs in (("train", train), ("heldout", heldout)):
            for source, s in sorted(source_stats(docs).items()):
                print(f"{lang} {part:8s} {source:14s} {s['documents']:5d} docs {s['chars']:9,d} chars "
                      f"{s['hangul_chars']:9,d} hangul")
    for name, path in prepare_corpora(root).items():
        print(f"{name}: {path}")
