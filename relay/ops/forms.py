"""`relay forms check`: the forms this relay serves, checked as `relay` starts them, each
with its URL and the snippet that embeds it.

The file is read by relay.config (every problem named by form and key, exit 2); with a PATH,
that file is checked against the rest of this configuration before it is deployed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from relay.config import load_settings
from relay.errors import ConfigError
from relay.formdefs import FormDef
from relay.settings import Settings

NO_PUBLIC_URL = "https://forms.example.com"


def settings_with(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """The configuration, with RELAY_FORMS_FILE set to `path` when given; ConfigError."""
    merged = dict(os.environ if environ is None else environ)
    if path is not None:
        merged["RELAY_FORMS_FILE"] = str(path)
    return load_settings(merged)


def form_path(form: FormDef) -> str:
    return "/form" if form.is_default else f"/f/{form.id}"


def thanks_path(form: FormDef) -> str:
    return "/thanks" if form.is_default else f"/f/{form.id}/thanks"


def embed_snippet(base: str, form: FormDef) -> str:
    attribute = "" if form.is_default else f' data-form="{form.id}"'
    return f'<script src="{base}/embed.js"{attribute} async></script>'


def report(settings: Settings) -> list[str]:
    """One block per form: id, address, fields, origins; URL and embed snippet."""
    base = (settings.public_url or NO_PUBLIC_URL).rstrip("/")
    lines = []
    if not settings.public_url:
        lines.append(f"note: RELAY_PUBLIC_URL is not set; URLs below use {NO_PUBLIC_URL}")
    if settings.forms_file is None:
        lines.append("note: RELAY_FORMS_FILE is not set; the relay serves the default form only")
    forms = [settings.default_form, *settings.forms.values()]
    for form in forms:
        fields = ", ".join(
            f"{f.name} ({f.type}{'' if f.required else ', optional'})" for f in form.fields
        )
        origins = sorted(form.origins(settings.allowed_origins)) or ["(ours only)"]
        files = (
            f"; files: up to {form.attachments.max_files}, "
            f"{form.attachments.max_total_bytes:_} bytes in all"
            if form.file_fields
            else ""
        )
        lines += [
            f"{form.id}: to {form.support_address}; fields: {fields}{files}",
            f"  origins: {', '.join(origins)}",
            f"  thanks:  {form.thanks_url or base + thanks_path(form)}",
            f"  URL:     {base}{form_path(form)}",
            f"  embed:   {embed_snippet(base, form)}",
        ]
    lines.append(f"forms check: {len(forms)} form(s), no problem found")
    return lines


def check(path: Path | None) -> tuple[int, list[str]]:
    """(exit status, lines): 0 and the report, or 2 and every problem."""
    try:
        settings = settings_with(path)
    except ConfigError as exc:
        return 2, [str(exc)]
    return 0, [*(f"warning: {w}" for w in settings.warnings), *report(settings)]
