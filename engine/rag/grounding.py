"""Answers from documents: numbered sources in the prompt, citations out, no guessing.

The model gets the retrieved passages as numbered sources and is told to answer only
from them and to cite them as [n]. When the collection is empty, or nothing retrieved
is relevant, the model is not asked at all: the answer says so, and the passages that
were retrieved are still returned so the user can look for themselves.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.citation import Citation as Citation  # noqa: PLC0414 (re-exported)
from engine.rag.retrieval import SearchResult, content_words

# Cosine similarity (all-MiniLM-L6-v2) below which a passage is taken as unrelated to the
# question: unrelated pairs score ~0.0-0.15, paraphrases 0.5+, loose topical matches ~0.3.
MIN_RELEVANCE = 0.25
# A passage the dense score misses counts as evidence when keyword search put it among
# its first ``STRONG_KEYWORD_RANK`` and it holds at least this share of the question's
# content words (an identifier or a rare term the embedder does not know is such a hit).
STRONG_KEYWORD_RANK = 3
STRONG_KEYWORD_SHARE = 0.75
# Words are compared by their first letters, a crude stemmer: "plotting" meets "plots".
_STEM = 5
# A question naming this many topic words that occur nowhere in the collection is about
# something the documents do not cover ("export to an Excel xlsx workbook" asked of a
# manual that never says Excel or xlsx), however close the passages' cosine: on-topic
# questions the documents cannot answer still score 0.3-0.65, as high as answerable ones.
# One unknown word is allowed: a typo, or a user's word for what the documents call
# otherwise ("staircase" for "steps"). Measured on the sets of bench_rag_quality.py.
UNKNOWN_TO_REFUSE = 2
# A word held by ``RARE_CHUNKS`` chunk(s) at most, none on the pages of the passages found,
# counts as unknown too: the documents mention it, but not where the question leads ("does
# gnuplot run on Android phones?" asked of a manual with one passage saying "phone").
# Measured on both sets of bench_rag_quality.py: at 1 chunk, unanswerable questions refused
# 6 -> 7 of 10 (gnuplot) and 5 -> 5 (PDFs), and no answerable question there has two such
# words, whatever its passages. At 2-4 chunks the PDFs reached 7 of 10, but an answerable
# question ("skip the first 10 times it is hit", whose page says neither word) was refused
# in one run and not in another, by which passages made the top 5.
RARE_CHUNKS = 1
# One such word is enough where it is a name (a product, format or tool: "PostgreSQL",
# "xlsx", "reprotest"; a word the cross-encoder's vocabulary does not hold whole) and no
# passage found reads as relevant to the cross-encoder (its best logit at most this; above
# 0 it was trained to mean relevant). A name has no synonym the documents could use
# instead, unless it is a short form the model knows: "GPG key" for the passages on
# "OpenPGP keys" reads at 1.6, "env var" at 5.6. Ordinary words are left to the rule
# above: "staircase" (the documents say "steps"), "underneath" and "stamp" all read below
# 0 while their pages are found. Measured on both sets of bench_rag_quality.py:
# unanswerable questions refused 7 -> 8 of 10 (gnuplot) and 5 -> 8 (PDFs), no answerable
# one refused; the unanswerable names left read above it ("GPU" 1.4, "STL" 0.3).
NAME_LOGIT = 0.0
_TOPIC_WORD = re.compile(r"[^\W\d_]\w{2,}")
# How users ask, not what they ask about: never counted as words the documents lack.
_REQUEST_WORDS = frozenset(
    {"explain", "describe", "tell", "show", "give", "list", "need", "want", "please", "help",
     "find", "know", "get", "use", "make", "way", "ways", "anything", "something", "possible"}
)  # fmt: skip
SNIPPET_CHARS = 240
_SENTENCE = re.compile(r"(?<=[.!?])\s+")

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite the sources you use "
    "as [1], [2] and so on. If the sources do not contain the answer, say that they do "
    "not, instead of guessing."
)


def topic_words(question: str) -> list[str]:
    """The question's content words worth looking up in the collection: three characters
    or more, starting with a letter (numbers and bits of dates are left out)."""
    words = [
        w for w in content_words(question) if _TOPIC_WORD.fullmatch(w) and w not in _REQUEST_WORDS
    ]
    return list(dict.fromkeys(words))


def is_evidence(result: SearchResult, question_stems: set[str]) -> bool:
    """Whether a passage supports answering: close in meaning (dense), or a strong keyword
    hit holding most of the question's content words (see ``STRONG_KEYWORD_SHARE``)."""
    if (result.dense_score or 0.0) >= MIN_RELEVANCE:
        return True
    rank = result.keyword_rank
    if rank is None or rank > STRONG_KEYWORD_RANK or not question_stems:
        return False
    text = f"{result.chunk.heading or ''} {result.chunk.text}"
    found = {w[:_STEM] for w in content_words(text)}
    return len(question_stems & found) >= STRONG_KEYWORD_SHARE * len(question_stems)


def _snippet(text: str, question: str) -> str:
    """The part of a passage that best matches the question: its sentence with most of the
    question's content words, widened with neighbours up to ``SNIPPET_CHARS``."""
    flat = " ".join(text.split())
    if len(flat) <= SNIPPET_CHARS:
        return flat
    sentences = _SENTENCE.split(flat)
    words = set(content_words(question))
    scores = [len(words & set(content_words(s))) for s in sentences]
    best = max(range(len(sentences)), key=lambda i: (scores[i], -i))
    lo = hi = best
    out = sentences[best]
    while True:
        grown = False
        if hi + 1 < len(sentences) and len(out) + len(sentences[hi + 1]) + 1 <= SNIPPET_CHARS:
            hi += 1
            out = f"{out} {sentences[hi]}"
            grown = True
        if lo > 0 and len(out) + len(sentences[lo - 1]) + 1 <= SNIPPET_CHARS:
            lo -= 1
            out = f"{sentences[lo]} {out}"
            grown = True
        if not grown:
            break
    if len(out) > SNIPPET_CHARS:
        out = out[: SNIPPET_CHARS - 1]
    return ("…" if lo > 0 else "") + out + ("…" if hi < len(sentences) - 1 else "")


def _label(r: SearchResult) -> str:
    name = os.path.basename(r.chunk.path)
    if r.chunk.page is not None:
        return f"{name}, page {r.chunk.page}"
    if r.chunk.line_start is not None:
        return f"{name}, lines {r.chunk.line_start}-{r.chunk.line_end}"
    return name


def citations_of(results: list[SearchResult], question: str) -> list[Citation]:
    return [
        Citation(
            n,
            r.chunk.path,
            r.chunk.page,
            _snippet(r.chunk.text, question),
            round(r.score, 6),
            r.chunk.line_start,
            r.chunk.line_end,
        )
        for n, r in enumerate(results, 1)
    ]


@dataclass
class Grounding:
    """What retrieval gives the chat for one question."""

    collection: str
    question: str
    results: list[SearchResult]
    canned_answer: str | None = None  # set: do not ask the model, answer this
    notice: str | None = None  # said in front of the answer (e.g. still indexing)
    citations: list[Citation] = field(default_factory=list)

    def system_prompt(
        self, count_tokens: Callable[[str], int], budget: int, user_system: str | None = None
    ) -> str:
        """Instructions plus as many sources as fit in ``budget`` tokens (best first).

        Sets ``citations`` to the sources actually given to the model.
        """
        head = f"{user_system}\n\n{INSTRUCTIONS}" if user_system else INSTRUCTIONS
        used = count_tokens(head) + 8
        parts = [head, "", "Sources:"]
        kept: list[SearchResult] = []
        for r in self.results:
            block = f"[{len(kept) + 1}] ({_label(r)})\n{r.chunk.text.strip()}"
            cost = count_tokens(block) + 2
            if used + cost > budget:
                if not kept:  # always give at least the best source, cut to fit
                    room = max(budget - used, 0)
                    words = block.split()
                    block = " ".join(words[: max(room * 3 // 4, 1)])
                    parts.append(block)
                    kept.append(r)
                break
            parts.append(block)
            kept.append(r)
            used += cost
        self.citations = citations_of(kept, self.question)
        return "\n".join(parts)


def ground(
    collection_name: str,
    question: str,
    results: list[SearchResult],
    summary: dict[str, int],
    unknown_words: Sequence[str] = (),
    rare_words: Sequence[str] = (),
    names: Sequence[str] = (),
) -> Grounding:
    """Decide how to answer from what retrieval found and the collection's state.

    ``unknown_words``: the question's ``topic_words`` that the collection never holds;
    ``rare_words``: those it holds in ``RARE_CHUNKS`` chunks or fewer, none of them on the
    pages (the documents, where there are no pages) of ``results``; ``names``: those of
    both that are names, not words of the language (see ``NAME_LOGIT``).
    """
    if summary.get("indexed", 0) == 0:
        if summary.get("pending", 0):
            answer = (
                f"The collection “{collection_name}” is still being indexed and has no "
                "searchable documents yet, so I cannot answer from it. Try again when "
                "indexing has finished."
            )
        else:
            answer = (
                f"The collection “{collection_name}” has no indexed documents, so I "
                "cannot answer from it. Add documents with: bastion collections add "
                f'"{collection_name}" PATH'
            )
        return Grounding(collection_name, question, results, canned_answer=answer)
    words = {w[:_STEM] for w in content_words(question)}
    relevant = [r for r in results if is_evidence(r, words)]
    logits = [r.judged for r in results if r.judged is not None]
    refusal = None
    if len(unknown_words) + len(rare_words) >= UNKNOWN_TO_REFUSE:
        refusal = _lacking(collection_name, unknown_words, rare_words, "")
    elif names and logits and max(logits) <= NAME_LOGIT:
        refusal = _lacking(
            collection_name,
            [w for w in unknown_words if w in names],
            [w for w in rare_words if w in names],
            ", and none of the passages below reads as an answer",
        )
    elif not relevant:
        refusal = (
            f"I found nothing relevant to this question in “{collection_name}”, so I "
            "will not guess. The closest passages are listed below."
        )
    if refusal is not None:
        grounding = Grounding(collection_name, question, results, canned_answer=refusal)
        grounding.citations = citations_of(results, grounding.question)
        return grounding
    notice = None
    if summary.get("pending", 0):
        notice = (
            f"Note: “{collection_name}” is still being indexed ({summary['indexed']} of "
            f"{summary['indexed'] + summary['pending']} files searchable); this answer "
            "may miss documents."
        )
    return Grounding(collection_name, question, relevant, notice=notice)


def _lacking(
    collection_name: str, unknown_words: Sequence[str], rare_words: Sequence[str], why: str
) -> str:
    """The refusal for a question about words the documents lack."""
    lacking = []
    if unknown_words:
        lacking.append("never mention " + ", ".join(f"“{w}”" for w in unknown_words))
    if rare_words:
        named = ", ".join(f"“{w}”" for w in rare_words)
        lacking.append(f"mention {named} only elsewhere than the passages below")
    return (
        f"I found nothing relevant to this question in “{collection_name}”: its "
        f"documents {' and '.join(lacking)}{why}, so I will not guess. The closest passages "
        "are listed below; if the documents call it something else, ask with their words."
    )
