"""Answers as Markdown: Qt's own CommonMark reader, plus the look of code blocks.

Qt's reader (md4c inside ``QTextDocument.setMarkdown``) already handles the GitHub dialect
(tables, task lists, fenced code); what it leaves plain is code blocks, which get a
monospace font and a tinted background here. Long code lines wrap instead of scrolling:
a transcript is one scrolling column, and a second, horizontal scroller inside each
message is the kind of nesting that makes a transcript hard to read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from PySide6.QtGui import (
    QColor,
    QFontDatabase,
    QPalette,
    QTextBlock,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
    QTextFragment,
)

CODE_MARGIN_PX = 8


def is_code_block(block: QTextBlock) -> bool:
    """True for a line of a fenced or indented code block (the reader marks them)."""
    fmt = block.blockFormat()
    return fmt.hasProperty(QTextFormat.Property.BlockCodeLanguage) or fmt.hasProperty(
        QTextFormat.Property.BlockCodeFence
    )


def code_background(palette: QPalette) -> QColor:
    """A tint of the text colour over the window colour: visible in light and dark themes.

    Messages are drawn on the window's background (their views are transparent), so the
    tint starts from that colour, not from the white of a text field.
    """
    base = palette.color(QPalette.ColorRole.Window)
    text = palette.color(QPalette.ColorRole.WindowText)
    mix = 0.09
    return QColor(
        round(base.red() + (text.red() - base.red()) * mix),
        round(base.green() + (text.green() - base.green()) * mix),
        round(base.blue() + (text.blue() - base.blue()) * mix),
    )


def render_markdown(document: QTextDocument, text: str, palette: QPalette) -> None:
    """Replace ``document``'s content with ``text`` read as Markdown, code styled."""
    document.setMarkdown(text, QTextDocument.MarkdownFeature.MarkdownDialectGitHub)
    style_code(document, palette)


def style_code(document: QTextDocument, palette: QPalette) -> None:
    """Code blocks: monospace, tinted, wrapping lines. Inline code: monospace, tinted.

    The reader asks for the generic "monospace" family, which not every system maps to
    a fixed-width font; the system's own fixed font is named first.
    """
    fixed = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
    background = code_background(palette)
    code_chars = QTextCharFormat()
    code_chars.setFontFamilies([fixed.family(), "monospace"])
    code_chars.setFontFixedPitch(True)
    inline_chars = QTextCharFormat(code_chars)
    inline_chars.setBackground(background)
    cursor = QTextCursor(document)
    cursor.beginEditBlock()
    block = document.begin()
    previous_was_code = False
    while block.isValid():
        code = is_code_block(block)
        if code:
            next_is_code = block.next().isValid() and is_code_block(block.next())
            block_format = QTextBlockFormat()
            block_format.setBackground(background)
            block_format.setNonBreakableLines(False)
            block_format.setLeftMargin(CODE_MARGIN_PX)
            block_format.setRightMargin(CODE_MARGIN_PX)
            # Lines of one block touch; the block as a whole keeps its distance.
            block_format.setTopMargin(0 if previous_was_code else CODE_MARGIN_PX / 2)
            block_format.setBottomMargin(0 if next_is_code else CODE_MARGIN_PX / 2)
            cursor.setPosition(block.position())
            cursor.mergeBlockFormat(block_format)
            end = block.position() + block.length() - 1
            cursor.setPosition(end, QTextCursor.MoveMode.KeepAnchor)
            cursor.mergeCharFormat(code_chars)
        else:
            spans = [
                (fragment.position(), fragment.length())
                for fragment in fragments(block)
                if fragment.charFormat().fontFixedPitch()
            ]
            for start, length in spans:
                cursor.setPosition(start)
                cursor.setPosition(start + length, QTextCursor.MoveMode.KeepAnchor)
                cursor.mergeCharFormat(inline_chars)
        previous_was_code = code
        block = block.next()
    cursor.endEditBlock()


def fragments(block: QTextBlock) -> list[QTextFragment]:
    """The runs of equally formatted text in ``block``."""
    # PySide's stubs type the block's iterator as ``object``; it yields iterators.
    iterators = cast("Iterable[QTextBlock.iterator]", block)
    return [it.fragment() for it in iterators]


def code_at(cursor: QTextCursor) -> str | None:
    """The whole code block under ``cursor`` as plain text, or None outside code."""
    block = cursor.block()
    if not is_code_block(block):
        return None
    first = block
    while first.previous().isValid() and is_code_block(first.previous()):
        first = first.previous()
    lines = []
    current = first
    while current.isValid() and is_code_block(current):
        lines.append(current.text())
        current = current.next()
    return "\n".join(lines)


def code_blocks(document: QTextDocument) -> list[str]:
    """Every code block of ``document``, in order, as plain text."""
    found: list[str] = []
    block = document.begin()
    while block.isValid():
        if is_code_block(block):
            cursor = QTextCursor(block)
            text = code_at(cursor)
            if text is not None:
                found.append(text)
            while block.isValid() and is_code_block(block):
                block = block.next()
            continue
        block = block.next()
    return found
