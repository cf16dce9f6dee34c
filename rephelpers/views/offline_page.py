"""Writes one offline chart page: the page's head, the vega bundle, its body, the chart's spec, its tail.

Run as a script in a child process by :func:`rephelpers.views.render.write_offline_chart_html`
(``python -I offline_page.py BUNDLE TARGET HEAD BODY TAIL``, the spec on stdin), so that the
~1 MB page is never assembled inside a notebook's kernel (render.py says why). It imports only
the standard library: in isolated mode (``-I``) the child finds no other package.
"""

from __future__ import annotations

import os
import shutil
import sys


def write_page(bundle: str, target: str, head: str, body: str, tail: str, spec: str) -> None:
    """``target`` = ``head`` + the file ``bundle`` + ``body`` + ``spec`` + ``tail``, written to
    ``target.part`` and moved over ``target``, so a reader never sees half a page."""
    with open(target + ".part", "w", encoding="utf-8") as out, open(bundle, encoding="utf-8") as js:
        out.write(head)
        shutil.copyfileobj(js, out)
        out.write(body)
        out.write(spec)
        out.write(tail)
    os.replace(target + ".part", target)


if __name__ == "__main__":
    write_page(*sys.argv[1:6], spec=sys.stdin.read())
