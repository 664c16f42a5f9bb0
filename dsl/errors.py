"""Diagnostics: `file:line:col: message`, the source line and a caret; never a traceback.

A `DSLError` carries every diagnostic found in one pass, so a file with five mistakes
reports five messages.
"""
from __future__ import annotations

from dataclasses import dataclass

from .source import SourceFile, Span


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str
    hint: str | None = None

    def format(self, source: SourceFile | None = None) -> str:
        where = str(self.span) if self.span.line > 0 else self.span.file  # no position: a file-level error
        head = f"{where}: error: {self.message}"
        lines = [head]
        if source is not None and self.span.line > 0:
            text = source.line_text(self.span.line).replace("\t", " ")
            if text:
                lines.append(f"    {text}")
                col = max(self.span.col, 1)
                if self.span.end_line == self.span.line and self.span.end_col > col:
                    width = self.span.end_col - col
                else:
                    width = 1
                width = max(1, min(width, len(text) - col + 1))
                lines.append("    " + " " * (col - 1) + "^" + "~" * (width - 1))
        if self.hint:
            lines.append(f"    hint: {self.hint}")
        return "\n".join(lines)


class DSLError(Exception):
    """One or more user errors in DSL source (or in a specialisation request)."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, SourceFile] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(self.format())

    def format(self) -> str:
        parts = [d.format(self.sources.get(d.span.file)) for d in self.diagnostics]
        n = len(self.diagnostics)
        if n > 1:
            parts.append(f"{n} errors")
        return "\n".join(parts)

    def __str__(self) -> str:  # keep str() stable even after sources are attached
        return self.format()


class DiagnosticSink:
    """Collects diagnostics while a pass keeps going, so that all errors are reported."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []

    def error(self, span: Span, message: str, hint: str | None = None) -> None:
        d = Diagnostic(span, message, hint)
        if d not in self.items:
            self.items.append(d)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, sources: dict[str, SourceFile]) -> None:
        if self.items:
            ordered = sorted(self.items, key=lambda d: (d.span.file, d.span.line, d.span.col))
            raise DSLError(ordered, sources)
