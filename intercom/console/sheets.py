"""Pairing sheets: one printable A4 page per flat with its pairing QR code, as a PDF.

Written here without a PDF library: a page is a few lines of text in the PDF's own
Helvetica and Courier (no font is embedded) and the QR code drawn as filled squares
from segno's matrix, so the sheets cost the station no new dependency.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import segno

from intercom.deploy.stationca import grouped

A4 = (595, 842)  # points
MARGIN = 56
QR_SIZE = 300.0
QUIET = 4  # modules of white around the code


@dataclass(frozen=True)
class Sheet:
    """One flat's page: what the QR code holds and what is printed around it."""

    station: str
    flat: str
    link: str
    fingerprint: str  # the station CA's SHA-256 (the owner's certificate's, without a trust page)
    expires_at: float
    trust_url: str = ""  # where the station's CA is installed from; empty: nothing to install


def _text(value: str) -> str:
    """A PDF string literal in WinAnsi (Latin-1 here): escaped, others as '?'."""
    safe = value.encode("latin-1", "replace").decode("latin-1")
    return "(" + safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def _line(font: str, size: float, x: float, y: float, text: str) -> str:
    return f"BT /{font} {size:g} Tf {x:g} {y:g} Td {_text(text)} Tj ET\n"


def _qr(link: str, x: float, y: float, size: float) -> str:
    """The QR code of ``link`` as filled rectangles, lower-left corner at (x, y)."""
    matrix = segno.make(link, error="m").matrix
    count = len(matrix) + 2 * QUIET
    step = size / count
    ops = ["1 1 1 rg", f"{x:g} {y:g} {size:g} {size:g} re f", "0 0 0 rg"]
    for row_index, row in enumerate(matrix):
        top = y + size - (row_index + QUIET + 1) * step
        col = 0
        while col < len(row):
            if not row[col]:
                col += 1
                continue
            start = col
            while col < len(row) and row[col]:
                col += 1
            left = x + (start + QUIET) * step
            ops.append(f"{left:.3f} {top:.3f} {(col - start) * step:.3f} {step:.3f} re")
    ops.append("f")
    return "\n".join(ops) + "\n"


def page_content(sheet: Sheet) -> str:
    """The drawing operators of one flat's page."""
    width, height = A4
    fp = grouped(sheet.fingerprint)  # as browsers and the trust page show it
    expires = dt.datetime.fromtimestamp(sheet.expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    y = float(height - MARGIN - 24)
    out = [_line("F1", 24, MARGIN, y, f"Flat {sheet.flat}: pair your phone with the door")]
    y -= 22
    out.append(_line("F1", 12, MARGIN, y, f"Door station {sheet.station}"))
    check = ("2. Check this fingerprint of the door station's certificate authority (the "
             "page shows it):" if sheet.trust_url else
             "2. Check that your browser's certificate view shows this fingerprint:")
    steps = ["1. Scan this code with your phone's camera and open the link.", check]
    y -= 34
    for step in steps:
        out.append(_line("F1", 12, MARGIN, y, step))
        y -= 18
    for i in range(0, len(fp), 48):
        out.append(_line("F2", 10, MARGIN + 14, y, fp[i:i + 48]))
        y -= 14
    y -= 4
    last = ['3. Tap "pair", then add the door code to your authenticator app.',
            "   The door opens only with the code that app shows."]
    if sheet.trust_url:
        last += ["4. To be rung with the app closed, install the station's certificate",
                 "   (of the fingerprint above) from the page " + sheet.trust_url]
    for step in last:
        out.append(_line("F1", 12, MARGIN, y, step))
        y -= 18
    qr_x, qr_y = (width - QR_SIZE) / 2, y - 16 - QR_SIZE
    out.append(_qr(sheet.link, qr_x, qr_y, QR_SIZE))
    y = qr_y - 28
    out.append(_line("F1", 11, MARGIN, y, f"This code pairs one phone, once, until {expires}."))
    out.append(_line("F1", 11, MARGIN, y - 16,
                     "Used or expired? Ask your building manager for a new sheet."))
    out.append(_line("F2", 7, MARGIN, y - 40, sheet.link))
    return "".join(out)


def pairing_sheets_pdf(sheets: list[Sheet]) -> bytes:
    """A PDF with one A4 page per sheet."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    add(b"<< /Type /Catalog /Pages 2 0 R >>")
    add(b"")  # the page tree, filled in once the pages are known
    helvetica = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
                    b"/Encoding /WinAnsiEncoding >>")
    courier = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier "
                  b"/Encoding /WinAnsiEncoding >>")
    pages = []
    for sheet in sheets:
        stream = page_content(sheet).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n%b\nendstream" % (len(stream), stream))
        pages.append(add(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font "
            b"<< /F1 %d 0 R /F2 %d 0 R >> >> /Contents %d 0 R >>"
            % (A4[0], A4[1], helvetica, courier, content)))
    kids = b" ".join(b"%d 0 R" % page for page in pages)
    objects[1] = b"<< /Type /Pages /Kids [%b] /Count %d >>" % (kids, len(pages))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)
