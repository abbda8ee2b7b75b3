"""Text out of documents: PDF (pypdf), Word .docx (python-docx), HTML (BeautifulSoup: the main
text, without scripts, styles, menus, headers, footers), Markdown and plain text, source code
(verbatim, language noted), and the text fields of JSON/JSONL.

``read_document`` never raises for a bad file: it returns a ``Skipped`` with the reason
(encrypted PDF, corrupt DOCX, binary file, missing optional library...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "Skipped", "read_document", "CODE_LANGUAGES", "document_type"]

CODE_LANGUAGES = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".tsx": "typescript", ".jsx": "javascript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".swift": "swift", ".kt": "kotlin",
    ".scala": "scala", ".sh": "shell", ".bash": "shell", ".sql": "sql", ".r": "r", ".lua": "lua",
    ".pl": "perl", ".m": "objective-c", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml",
}
_TEXT = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "text"}


@dataclass
class Document:
    text: str
    source: str
    type: str  # pdf | docx | html | markdown | text | code:<language> | json


@dataclass
class Skipped:
    source: str
    reason: str


def document_type(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return "pdf"
    if suffix == ".docx":
        return "docx"
    if suffix in (".html", ".htm", ".xhtml"):
        return "html"
    if suffix in (".json", ".jsonl"):
        return "json"
    if suffix in _TEXT:
        return _TEXT[suffix]
    if suffix in CODE_LANGUAGES:
        return f"code:{CODE_LANGUAGES[suffix]}"
    return None


def _decode(raw: bytes) -> str | None:
    """Bytes -> text: UTF-8 (with BOM), UTF-16 with BOM, GB18030; None for binary data."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", errors="replace")
    if b"\x00" in raw[:8192]:
        return None
    for enc in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")  # the garbled filter judges what is left


def _pdf(path: Path) -> str:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    if reader.is_encrypted:
        try:
            ok = reader.decrypt("")
        except Exception:  # unsupported encryption: treated as encrypted
            ok = 0
        if not ok:
            raise _Skip("encrypted PDF (no empty user password)")
    return "\n\n".join((page.extract_text() or "") for page in reader.pages)


def _docx(path: Path) -> str:
    import docx

    doc = docx.Document(str(path))
    parts = [p.text for p in doc.paragraphs]
    for table in doc.tables:
        for row in table.rows:
            parts.append("\t".join(cell.text for cell in row.cells))
    return "\n\n".join(parts)


_BOILERPLATE = ("script", "style", "noscript", "nav", "header", "footer", "aside", "form", "iframe", "svg", "button",
                "template", "menu")


def _html(raw: bytes) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(list(_BOILERPLATE)):
        tag.decompose()
    for tag in soup.find_all(attrs={"role": ["navigation", "banner", "contentinfo", "complementary"]}):
        tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    blocks = []
    for el in root.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "td", "dd", "dt"]):
        if el.find_parent(["p", "li", "pre", "blockquote", "td"]) is not None:
            continue  # nested: its text is in the parent block already
        text = el.get_text(" ", strip=True) if el.name != "pre" else el.get_text()
        if text:
            blocks.append(text)
    return "\n\n".join(blocks) if blocks else root.get_text("\n", strip=True)


class _Skip(Exception):
    pass


def _json_texts(path: Path, raw: str) -> list[str]:
    records = []
    if path.suffix.lower() == ".jsonl":
        for line in raw.splitlines():
            if line.strip():
                records.append(json.loads(line))
    else:
        data = json.loads(raw)
        records = data if isinstance(data, list) else [data]
    texts = []
    for rec in records:
        if isinstance(rec, str):
            texts.append(rec)
        elif isinstance(rec, dict):
            for key in ("text", "content", "body"):
                if isinstance(rec.get(key), str):
                    texts.append(rec[key])
                    break
    return texts


def read_document(path: Path) -> list[Document] | Skipped:
    """The documents in one file (several for JSON/JSONL), or why it was skipped."""
    kind = document_type(path)
    source = str(path)
    if kind is None:
        return Skipped(source, f"unsupported file type {path.suffix or '(none)'}")
    try:
        if kind == "pdf":
            return [Document(_pdf(path), source, "pdf")]
        if kind == "docx":
            return [Document(_docx(path), source, "docx")]
        raw = path.read_bytes()
        if kind == "html":
            return [Document(_html(raw), source, "html")]
        text = _decode(raw)
        if text is None:
            return Skipped(source, "binary file")
        if kind == "json":
            return [Document(t, f"{source}#{i}", "json") for i, t in enumerate(_json_texts(path, text))]
        return [Document(text, source, kind)]
    except _Skip as why:
        return Skipped(source, str(why))
    except ImportError as err:
        return Skipped(source, f"needs an optional library ({err.name}): pip install 'lorakit[docs]'")
    except Exception as err:  # a corrupt file of any kind: skipped with its reason, never a crash
        return Skipped(source, f"unreadable {kind} ({type(err).__name__}: {str(err)[:120]})")
