"""Forms files the tests share: three forms on two sites to three support addresses, one
with attachments and every field type (the issue's "done when")."""

from __future__ import annotations

from pathlib import Path

SITE_A = "http://shop-a.test"
SITE_B = "http://shop-b.test"

THREE_FORMS = """
[forms.sales]
support_address = "sales@support.test"
from_name = "Example sales"
subject = "[Sales] {subject}"
allowed_origins = ["{site_a}"]
thanks_url = "{site_a}/thanks"
language = "en"
title = { en = "Talk to sales", ja = "営業へのお問い合わせ" }

[[forms.sales.fields]]
name = "email"
type = "email"
required = true
label = { en = "Your email", ja = "メールアドレス" }

[[forms.sales.fields]]
name = "subject"
type = "text"
required = true
max_length = 80
label = { en = "Subject", ja = "件名" }

[[forms.sales.fields]]
name = "plan"
type = "select"
choices = ["Starter", "Business", "Enterprise"]
label = { en = "Plan", ja = "プラン" }

[forms.bugs]
support_address = "bugs@support.test"
subject = "[Bug] {summary} ({severity})"
allowed_origins = ["{site_b}"]
language = "ja"
rate_limit = "50/minute"
attachments = { max_files = 3, max_file_bytes = 400_000, max_total_bytes = 600_000 }

[[forms.bugs.fields]]
name = "email"
type = "email"
required = true
label = { en = "Your email", ja = "メールアドレス" }

[[forms.bugs.fields]]
name = "name"
type = "text"
label = { en = "Your name", ja = "お名前" }

[[forms.bugs.fields]]
name = "summary"
type = "text"
required = true
label = { en = "Summary", ja = "概要" }
help = { en = "One line.", ja = "一行で。" }

[[forms.bugs.fields]]
name = "severity"
type = "radio"
required = true
choices = ["low", "high"]
label = { en = "Severity", ja = "重要度" }

[[forms.bugs.fields]]
name = "areas"
type = "checkbox"
choices = ["web", "mail"]
label = { en = "Where", ja = "場所" }

[[forms.bugs.fields]]
name = "agree"
type = "checkbox"
required = true
label = { en = "I may be contacted", ja = "連絡を受けてもよい" }

[[forms.bugs.fields]]
name = "phone"
type = "tel"
label = { en = "Phone", ja = "電話番号" }

[[forms.bugs.fields]]
name = "page"
type = "url"
label = { en = "Page", ja = "ページ" }

[[forms.bugs.fields]]
name = "count"
type = "number"
label = { en = "How often", ja = "回数" }

[[forms.bugs.fields]]
name = "seen"
type = "date"
label = { en = "Seen on", ja = "発生日" }

[[forms.bugs.fields]]
name = "ticket"
type = "text"
pattern = "[A-Z]{2}-[0-9]+"
label = { en = "Ticket", ja = "チケット" }

[[forms.bugs.fields]]
name = "details"
type = "textarea"
required = true
label = { en = "What happened", ja = "内容" }

[[forms.bugs.fields]]
name = "files"
type = "file"
label = { en = "Screenshots", ja = "スクリーンショット" }

[forms.careers]
support_address = "jobs@support.test"
allowed_origins = ["{site_a}"]

[[forms.careers.fields]]
name = "email"
type = "email"
required = true
label = "Email"

[[forms.careers.fields]]
name = "message"
type = "textarea"
required = true
label = { en = "About you", ja = "自己紹介" }
"""


def three_forms(folder: Path, site_a: str = SITE_A, site_b: str = SITE_B) -> Path:
    path = folder / "forms.toml"
    path.write_text(THREE_FORMS.replace("{site_a}", site_a).replace("{site_b}", site_b))
    return path
