"""Token alignment between a source and a target prompt (word swap, insertion, deletion).

Words are aligned with difflib over the tokenizer's own word split (CLIP pre-tokenization),
then expanded to token positions. The result is a ``mapper`` matrix [L_src, L_tgt]: column j
says which source tokens' attention target token j reuses (zero column = its own attention),
and ``alpha[j]`` is 1 where a source mapping exists. This one form serves replace (swapped
words mapped onto each other, as P2P's replacement mapper) and refine (changed words keep
their own attention, as P2P's refinement mapper).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from dsbuild.core.text import words as plain_words


@dataclass
class Word:
    text: str
    tokens: list[int]  # positions in the padded token sequence


@dataclass
class Alignment:
    mode: str  # resolved: "replace" or "refine"
    mapper: torch.Tensor  # [L, L] float, source token -> target token weights
    alpha: torch.Tensor  # [L] 1 where target token j reuses source attention
    src_words: list[Word]
    tgt_words: list[Word]
    src_changed: list[int] = field(default_factory=list)  # word indices
    tgt_changed: list[int] = field(default_factory=list)
    has_indel: bool = False

    def changed_words(self) -> tuple[list[str], list[str]]:
        return ([self.src_words[i].text for i in self.src_changed],
                [self.tgt_words[i].text for i in self.tgt_changed])

    def edit_words(self) -> tuple[list[str], list[str]]:
        """The words an edit is about, for local blend and reweighting: the changed content
        words, plus the noun phrase a changed presence word points at ("no rug" -> "a rug" is
        about "rug", "without drawers" -> "with drawers" about "drawers"); a side with nothing
        of its own takes the other side's words where its caption has them. Never "a", "no"
        or ","."""
        src = _about(self.src_words, self.src_changed)
        tgt = _about(self.tgt_words, self.tgt_changed)
        src_text = {w.text for w in self.src_words}
        tgt_text = {w.text for w in self.tgt_words}
        if not tgt:
            tgt = [w for w in src if w in tgt_text]
        if not src:
            src = [w for w in tgt if w in src_text]
        return src, tgt


FUNCTION_WORDS = frozenset(
    "a an the no without with and or of in on at to for from by its it this that these those "
    "some any one two three is are has have which".split())
PRESENCE_WORDS = frozenset("a an no without with some".split())  # say whether a thing is there


def _norm(text: str) -> str:
    return text.strip().lower().strip(".,;:!?'\"()")


def is_content(text: str) -> bool:
    t = _norm(text)
    return bool(t) and t not in FUNCTION_WORDS and any(c.isalnum() for c in t)


def _about(words: list[Word], changed: list[int]) -> list[str]:
    if not changed:
        return []
    picked = [i for i in changed if is_content(words[i].text)]
    if any(_norm(words[i].text) in PRESENCE_WORDS for i in changed):
        j = max(changed) + 1  # the noun phrase right after: "no [coat rack]", "a white [toilet]"
        while j < len(words) and _norm(words[j].text) in ("a", "an", "the", "some"):
            j += 1  # "without a [headrest]"
        while j < len(words) and is_content(words[j].text):
            picked.append(j)
            j += 1
    return list(dict.fromkeys(words[i].text for i in sorted(picked)))


def max_length(tokenizer) -> int:
    n = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return 77 if n > 1024 else n


def prompt_words(tokenizer, prompt: str) -> tuple[list[Word], int]:
    """Words of a prompt with their token positions, and the number of text tokens kept."""
    L = max_length(tokenizer)
    # Python ("slow") tokenizers, e.g. the CLIPTokenizer that transformers 4.x loads for SD
    # checkpoints, have neither offsets nor word ids: asking for offsets raises there.
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(prompt, padding="max_length", max_length=L, truncation=True,
                    **({"return_offsets_mapping": True} if fast else {}))
    words: list[Word] = []
    try:
        word_ids = enc.word_ids() if fast else None
    except (ValueError, AttributeError):
        word_ids = None
    ids = enc["input_ids"]
    offsets = enc.get("offset_mapping") if word_ids is not None else None
    if word_ids is None:  # CLIP BPE ends a word's last token with "</w>"; else a word a token
        toks = tokenizer.convert_ids_to_tokens(list(ids))
        eow = any(str(t).endswith("</w>") for t in toks)
        word_ids, n_words, ended = [], 0, False
        for pos, (tid, t) in enumerate(zip(ids, toks, strict=True)):
            # text sits between the start token and the first end token; what follows is
            # padding, whatever its token (SDXL's second tokenizer pads with "!", a text
            # character too, so the pad id alone cannot tell text from padding)
            ended = ended or tid == tokenizer.eos_token_id
            special = ended or (pos == 0 and tid == tokenizer.bos_token_id)
            word_ids.append(None if special else n_words)
            if not special and (not eow or str(t).endswith("</w>")):
                n_words += 1
    n_text = 0
    last: object = object()
    for pos, wid in enumerate(word_ids):
        if wid is None:
            continue
        n_text += 1
        if wid != last:
            words.append(Word("", []))
            last = wid
        words[-1].tokens.append(pos)
    for w in words:
        if offsets is not None:
            start, end = offsets[w.tokens[0]][0], offsets[w.tokens[-1]][1]
            w.text = prompt[start:end].lower()
        else:
            w.text = tokenizer.convert_tokens_to_string(
                tokenizer.convert_ids_to_tokens([ids[p] for p in w.tokens])
            ).replace("</w>", " ").strip().lower()
    return words, n_text


def _map_span(mapper: torch.Tensor, alpha: torch.Tensor, src: list[int], tgt: list[int]) -> None:
    """Map source tokens onto target tokens: 1:1 when counts match, else spread (as P2P)."""
    if not src or not tgt:
        return
    if len(src) == len(tgt):
        for s, t in zip(src, tgt, strict=True):
            mapper[s, t] = 1.0
    else:
        for t in tgt:
            mapper[src, t] = 1.0 / len(tgt)
    alpha[tgt] = 1.0


def align_prompts(tokenizer, source: str, target: str, mode: str = "auto") -> Alignment:
    """Align two prompts; ``mode`` replace | refine | auto (replace when only words swap)."""
    if mode not in ("replace", "refine", "auto"):
        raise ValueError(f"alignment mode must be replace, refine or auto (got {mode!r})")
    L = max_length(tokenizer)
    sw, ns = prompt_words(tokenizer, source)
    tw, nt = prompt_words(tokenizer, target)
    ops = difflib.SequenceMatcher(None, [w.text for w in sw], [w.text for w in tw],
                                  autojunk=False).get_opcodes()
    has_indel = any(op in ("insert", "delete") or (op == "replace" and i2 - i1 != j2 - j1)
                    for op, i1, i2, j1, j2 in ops)
    resolved = ("refine" if has_indel else "replace") if mode == "auto" else mode
    mapper = torch.zeros(L, L)
    alpha = torch.zeros(L)
    _map_span(mapper, alpha, [0], [0])  # start token
    src_changed: list[int] = []
    tgt_changed: list[int] = []
    for op, i1, i2, j1, j2 in ops:
        if op == "equal":
            for a, b in zip(range(i1, i2), range(j1, j2), strict=True):
                _map_span(mapper, alpha, sw[a].tokens, tw[b].tokens)
            continue
        src_changed += list(range(i1, i2))
        tgt_changed += list(range(j1, j2))
        if op == "replace" and resolved == "replace":
            if i2 - i1 == j2 - j1:
                for a, b in zip(range(i1, i2), range(j1, j2), strict=True):
                    _map_span(mapper, alpha, sw[a].tokens, tw[b].tokens)
            else:
                _map_span(mapper, alpha, [p for w in sw[i1:i2] for p in w.tokens],
                          [p for w in tw[j1:j2] for p in w.tokens])
        # refine: replaced/inserted target tokens keep their own attention; deleted are dropped
    # end token and padding: tail position k of the target reads tail position k of the source
    for j in range(1 + nt, L):
        s = min(1 + ns + (j - 1 - nt), L - 1)
        mapper[s, j] = 1.0
        alpha[j] = 1.0
    return Alignment(resolved, mapper, alpha, sw, tw, src_changed, tgt_changed, has_indel)


def token_weights(words: list[Word], chosen: list[str] | tuple[str, ...], length: int,
                  value: float = 1.0) -> torch.Tensor:
    """A [L] vector with ``value`` at the tokens of every occurrence of the chosen words
    (split as CLIP splits words: "mid-century" is "mid" and "century", "rug," is "rug")."""
    out = torch.zeros(length)
    wanted = {part for c in chosen for part in plain_words(c, split_joined=True)}
    for w in words:
        if w.text in wanted:
            out[w.tokens] = value
    return out
