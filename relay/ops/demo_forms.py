"""The demo's second form (RELAY_FORMS_FILE): a bug report with a file field, to its own
support address, embedded on its own page of the demo shop (`/report`)."""

from __future__ import annotations

from pathlib import Path

FORM_ID = "report"
SUPPORT_LOCAL = "bugs"

FORMS = """# The demo's forms file (RELAY_FORMS_FILE): one form besides the default one at /form.
[forms.report]
support_address = "{support}"
from_name = "Demo Shop bug reports"
subject = "[Bug] {{summary}}"
allowed_origins = ["{base}", "{shop}"]
language = "en"
title = {{ en = "Report a problem", ja = "不具合の報告" }}
attachments = {{ max_files = 3, max_file_bytes = 5_000_000, max_total_bytes = 10_000_000 }}

[[forms.report.fields]]
name = "email"
type = "email"
required = true
label = {{ en = "Your email address", ja = "メールアドレス" }}

[[forms.report.fields]]
name = "summary"
type = "text"
required = true
max_length = 120
label = {{ en = "What went wrong?", ja = "何が起きましたか" }}

[[forms.report.fields]]
name = "severity"
type = "radio"
required = true
choices = ["It is annoying", "I cannot order"]
label = {{ en = "How bad is it?", ja = "影響の大きさ" }}

[[forms.report.fields]]
name = "details"
type = "textarea"
label = {{ en = "Details", ja = "詳細" }}

[[forms.report.fields]]
name = "screenshot"
type = "file"
label = {{ en = "Screenshots or documents", ja = "スクリーンショットや資料" }}
help = {{ en = "Images, PDF, text or office files.", ja = "画像、PDF、テキスト、Office 文書。" }}
"""


def write_forms(folder: Path, *, support: str, base: str, shop: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "forms.toml"
    path.write_text(FORMS.format(support=support, base=base, shop=shop), encoding="utf-8")
    return path


def report_page(base_url: str) -> bytes:
    """The demo shop's bug-report page, embedding the second form by its id."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Demo Shop: report a problem</title></head>
<body style="font-family: sans-serif; max-width: 44rem; margin: 2rem auto">
<h1>Demo Shop</h1>
<p>A second form of the same relay, with a file field, to its own support address:</p>
<pre>&lt;script src="{base_url}/embed.js" data-form="{FORM_ID}" async&gt;&lt;/script&gt;</pre>
<script src="{base_url}/embed.js" data-form="{FORM_ID}" data-title="Report a problem" async>
</script>
<p><a href="/">The contact form</a></p>
</body></html>
""".encode()
