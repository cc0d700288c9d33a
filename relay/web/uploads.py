"""Files a visitor attaches: what they are, decided from their bytes, and whether the form
takes them.

The type comes from the content (the `filetype` package's signatures, then a text check),
never from the name or the browser's claim; the name can only make the verdict stricter (a
text file named `run.bat` is still a script). Programs, scripts, HTML (and SVG, which is
markup that runs scripts) and archives are refused whatever the form allows; anything else
must be in the form's allow-list (relay.formdefs: images, PDF, plain text and office
formats by default). The size limits are checked per file, per form and in total here; the
body carrying them was already capped while it streamed in (relay.web.body).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import filetype

from relay.formdefs import FormDef
from relay.mail.attachments import Attachment, safe_filename
from relay.web.i18n import lazy_gettext as _l

PROGRAMS = frozenset(
    {
        "application/x-msdownload",
        "application/x-executable",
        "application/x-mach-binary",
        "application/wasm",
        "application/x-shockwave-flash",
        "application/x-google-chrome-extension",
        "application/x-deb",
        "application/x-rpm",
        "application/x-nintendo-nes-rom",
        "application/vnd.ms-cab-compressed",
        "application/x-sqlite3",
        "application/postscript",
    }
)
ARCHIVES = frozenset(
    {
        "application/zip",
        "application/x-tar",
        "application/x-rar-compressed",
        "application/gzip",
        "application/x-bzip2",
        "application/x-7z-compressed",
        "application/x-xz",
        "application/zstd",
        "application/x-lz4",
        "application/x-lzip",
        "application/x-lzop",
        "application/x-compress",
        "application/x-unix-archive",
        "application/x-brotli",
        "application/epub+zip",
    }
)
# Names that run when opened, whatever their bytes say.
RISKY_EXTENSIONS = frozenset(
    [
        "exe",
        "com",
        "bat",
        "cmd",
        "msi",
        "msp",
        "scr",
        "pif",
        "cpl",
        "dll",
        "sys",
        "vbs",
        "vbe",
        "js",
        "jse",
        "wsf",
        "wsh",
        "hta",
        "ps1",
        "psm1",
        "sh",
        "bash",
        "zsh",
        "csh",
        "ksh",
        "py",
        "pl",
        "rb",
        "php",
        "jar",
        "apk",
        "app",
        "dmg",
        "deb",
        "rpm",
        "lnk",
        "reg",
        "inf",
        "scf",
        "html",
        "htm",
        "xhtml",
        "shtml",
        "svg",
        "xml",
        "xsl",
        "mht",
        "mhtml",
        "url",
        "desktop",
        "iso",
        "img",
    ]
)
_MARKUP = re.compile(
    rb"<\s*(?:!doctype|html|head|body|script|svg|iframe|object|embed|\?xml|meta|form)\b",
    re.IGNORECASE,
)
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("jpg", "jpeg", "jfif"),
    "image/png": ("png",),
    "image/gif": ("gif",),
    "image/webp": ("webp",),
    "image/heic": ("heic", "heif"),
    "image/avif": ("avif",),
    "image/bmp": ("bmp",),
    "image/tiff": ("tif", "tiff"),
    "application/pdf": ("pdf",),
    "text/plain": ("txt", "text", "log", "csv", "md"),
    "application/msword": ("doc",),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ("docx",),
    "application/vnd.ms-excel": ("xls",),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ("xlsx",),
    "application/vnd.ms-powerpoint": ("ppt",),
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": ("pptx",),
    "application/vnd.oasis.opendocument.text": ("odt",),
    "application/vnd.oasis.opendocument.spreadsheet": ("ods",),
    "application/vnd.oasis.opendocument.presentation": ("odp",),
    "application/rtf": ("rtf",),
}


@dataclass(frozen=True)
class Upload:
    """One file as the request carried it: the visitor's name, the browser's claimed type
    (logged at most, never trusted) and the bytes."""

    filename: str
    claimed_type: str
    data: bytes


def human_size(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    if count < 1_000_000:
        return f"{count / 1000:.0f} kB"
    return f"{count / 1_000_000:.1f} MB"


def sniff(data: bytes) -> str:
    """The MIME type of `data` from its content; "text/html" for markup and scripts that
    pass as text, "" when nothing fits."""
    kind = filetype.guess(data)
    if kind is not None:
        return str(kind.mime)
    head = data[:4096]
    if b"\x00" in head:
        return ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text.lstrip("\ufeff \t\r\n").startswith("#!") or _MARKUP.search(head):
        return "text/html"
    controls = sum(1 for ch in text[:4096] if ord(ch) < 32 and ch not in "\t\r\n\f")
    return "text/plain" if controls == 0 else ""


def refusal(upload: Upload, mime: str, form: FormDef) -> str | None:
    """Why this file is refused, in the visitor's words, or None."""
    name = safe_filename(upload.filename)
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    if mime in PROGRAMS or extension in RISKY_EXTENSIONS or mime == "text/html":
        return str(
            _l(
                "%(name)s is a program, a script or a web page; we do not accept those.",
                name=name,
            )
        )
    if mime in ARCHIVES:
        return str(_l("%(name)s is an archive; please send the files themselves.", name=name))
    if not mime:
        return str(_l("We cannot tell what kind of file %(name)s is.", name=name))
    if mime not in form.attachments.allowed:
        return str(_l("This form does not accept files like %(name)s.", name=name))
    return None


def named_for(filename: str, mime: str) -> str:
    """The safe name, with an extension that says what the file is (a PNG named photo.txt
    becomes photo.txt.png), so the helpdesk opens it with the right program."""
    name = safe_filename(filename)
    extensions = EXTENSIONS.get(mime, ())
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    if extensions and extension not in extensions:
        name = safe_filename(f"{name}.{extensions[0]}")
    return name


def check_files(
    form: FormDef, files: Mapping[str, Sequence[Upload]]
) -> tuple[tuple[Attachment, ...], dict[str, list[str]]]:
    """The attachments, or the visitor's errors by field: count, sizes and kinds."""
    limits = form.attachments
    errors: dict[str, list[str]] = {}
    found: list[Attachment] = []
    count = total = 0
    for spec in form.file_fields:
        uploads = list(files.get(spec.name, ()))
        problems: list[str] = []
        if spec.required and not uploads:
            problems.append(str(_l("Please attach a file.")))
        count += len(uploads)
        for upload in uploads:
            size = len(upload.data)
            total += size
            name = safe_filename(upload.filename)
            if size == 0:
                problems.append(str(_l("%(name)s is empty.", name=name)))
                continue
            if size > limits.max_file_bytes:
                problems.append(
                    str(
                        _l(
                            "%(name)s is too large (%(size)s); each file may be at most %(max)s.",
                            name=name,
                            size=human_size(size),
                            max=human_size(limits.max_file_bytes),
                        )
                    )
                )
                continue
            mime = sniff(upload.data)
            reason = refusal(upload, mime, form)
            if reason:
                problems.append(reason)
            else:
                found.append(Attachment(named_for(upload.filename, mime), mime, upload.data))
        if problems:
            errors[spec.name] = problems
    last = form.file_fields[-1].name if form.file_fields else "form"
    if count > limits.max_files:
        errors.setdefault(last, []).append(
            str(_l("Please attach at most %(count)d files.", count=limits.max_files))
        )
    if total > limits.max_total_bytes:
        errors.setdefault(last, []).append(
            str(
                _l(
                    "These files are too large together (%(size)s); the limit is %(max)s.",
                    size=human_size(total),
                    max=human_size(limits.max_total_bytes),
                )
            )
        )
    return tuple(found), errors
