"""The part of receipt rendering that runs inside a worker process.

WeasyPrint's layout is CPU-bound and holds the GIL, so it runs in a process pool, never on the
event loop. Each worker parses the stylesheet and builds one ``FontConfiguration`` once and
reuses them for every PDF: rebuilding them per render leaks about 240 KB a PDF outside
Python and costs time (see DESIGN.md, Receipts).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from services.receipt_signing import SigningMaterial, sign_pdf

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
DOCUMENT_TEMPLATES = ("receipt.html", "credit_note.html")


@dataclass
class _Renderer:
    environment: jinja2.Environment
    font_config: Any
    stylesheet: Any
    base_url: str


_renderer: _Renderer | None = None


def init_worker(templates_dir: str = str(TEMPLATES_DIR)) -> None:
    """Process-pool initializer: build the template, fonts and stylesheet once."""
    global _renderer
    from weasyprint import CSS
    from weasyprint.text.fonts import FontConfiguration

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir), autoescape=True, auto_reload=False
    )
    font_config = FontConfiguration()
    # Passed as a CSS object, never inlined into the HTML: autoescaping would mangle it.
    stylesheet = CSS(filename=os.path.join(templates_dir, "receipt.css"), font_config=font_config)
    for name in DOCUMENT_TEMPLATES:
        environment.get_template(name)  # parsed once, here; cached by the environment
    _renderer = _Renderer(
        environment=environment,
        font_config=font_config,
        stylesheet=stylesheet,
        base_url=templates_dir,
    )


def init_pool_worker() -> None:
    """The render pool's initializer: ``init_worker``, and deaf to SIGINT. Ctrl-C in a
    terminal signals the whole process group, pool workers included; the service stops its
    pool itself as it shuts down, and a worker that took the signal would only die with a
    traceback in the middle of the server's orderly stop (or of a render)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker()


def render_pdf(context: dict[str, Any]) -> bytes:
    """Render one receipt or credit note (``context["template"]``) to PDF bytes."""
    from weasyprint import HTML

    if _renderer is None:
        init_worker()
    assert _renderer is not None
    template = _renderer.environment.get_template(context.get("template", "receipt.html"))
    html = template.render(**context)
    document = HTML(string=html, base_url=_renderer.base_url)
    pdf: bytes = document.write_pdf(
        stylesheets=[_renderer.stylesheet], font_config=_renderer.font_config
    )
    return pdf


def render_to_file(
    context: dict[str, Any], destination: str, signing: SigningMaterial | None = None
) -> bytes:
    """Render (and sign, with ``signing``), then write atomically: a reader sees the whole
    PDF or none."""
    pdf = render_pdf(context)
    if signing is not None:
        pdf = sign_pdf(pdf, signing, reason=str(context.get("title", "")))
    path = Path(destination)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(pdf)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return pdf


def warm_up(context: dict[str, Any] | None = None, signing: SigningMaterial | None = None) -> int:
    """Run in each worker at start so that the first real receipt does not pay for what a
    process's first document costs: imports, and with ``context`` one throwaway document
    rendered (and signed, with ``signing``), never written. A first document sets up what
    WeasyPrint and its C bindings build lazily (cffi parsing type declarations, fonts loaded
    for shaping): some 140 ms of a first render, measured, that a customer would wait for."""
    if _renderer is None:
        init_worker()
    if context is not None:
        pdf = render_pdf(context)
        if signing is not None:
            sign_pdf(pdf, signing, reason=str(context.get("title", "")))
    return os.getpid()
