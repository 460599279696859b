"""Code blocks in the Markdown view, highlighted even when the fence names no language.

Small models often open a fence with a bare ```, and Pygments' own guess (`guess_lexer`) then picks
oddities (a Python function came out as "scdoc", in one colour). Here a bare fence is lexed as each of
the languages chat answers mostly hold, and the one that reads the code best wins: keywords and tags
count most, then built-ins, strings, numbers and comments; errors count against. No clear winner: plain.
"""

from __future__ import annotations

from functools import lru_cache

from pygments.lexers import get_lexer_by_name
from pygments.token import Comment, Error, Keyword, Name, Number, String
from textual.content import Content
from textual.widgets import Markdown
from textual.widgets._markdown import MarkdownFence

# Earlier wins a tie (JSON also lexes as Java). Permissive lexers (CSS, YAML) would claim anything.
CANDIDATES = ["python", "javascript", "typescript", "json", "java", "c", "cpp", "rust", "go", "bash", "sql", "html"]
WEIGHTS = [(Keyword, 3), (Name.Tag, 3), (Name.Builtin, 2), (Name.Function, 1), (String, 1), (Number, 1), (Comment, 1)]
ERROR_WEIGHT = 6
MIN_SCORE = 4  # below this the code is probably prose: left plain


@lru_cache(maxsize=256)
def guess_code_language(code: str) -> str:
    """The candidate language that lexes `code` best (keywords count most, errors against), or ""."""
    best, best_score = "", MIN_SCORE - 1
    for name in CANDIDATES:
        score = 0
        for kind, text in get_lexer_by_name(name, stripnl=False).get_tokens(code):
            if not text.strip():
                continue
            if kind in Error:
                score -= ERROR_WEIGHT
                continue
            if name == "sql" and kind in Keyword and not text.isupper():
                continue  # lower-case SQL keywords are everyday words (add, usage, return)
            score += next((w for k, w in WEIGHTS if kind in k), 0)
        if score > best_score:
            best, best_score = name, score
    return best


class CodeFence(MarkdownFence):
    @classmethod
    def highlight(cls, code: str, language: str, ansi: bool = False, dark: bool = False) -> Content:
        return super().highlight(code, language or guess_code_language(code), ansi, dark)


class AnswerMarkdown(Markdown):
    """Textual's Markdown with `CodeFence` for code blocks."""

    BLOCKS = {**Markdown.BLOCKS, "fence": CodeFence, "code_block": CodeFence}
