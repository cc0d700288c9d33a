"""The baseline: a Flask endpoint that does nothing, served exactly as the relay is.

POST /form reads the form (as any handler must) and answers 303 to /thanks, as the relay
does on success; the accept figures divided by this one show what our work costs.
"""

from __future__ import annotations

from flask import Flask, redirect, request
from werkzeug.wrappers import Response

app = Flask(__name__)


@app.post("/form")
def form() -> Response:
    request.form.get("name")
    return redirect("/thanks", code=303)
