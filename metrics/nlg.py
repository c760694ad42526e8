"""Language metrics as papers compute them: pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and
CIDEr(-D).

Texts go through pycocoevalcap's PTB tokenisation (Stanford PTBTokenizer ``-preserveLines
-lowerCase``, punctuation tokens dropped), then through pycocoevalcap's own scorers, so the numbers
equal ``pycocoevalcap`` on the same inputs (tests/test_nlg.py checks it against pycocoevalcap
itself). What differs is only how the work is run: ROUGE-L's longest common subsequence uses an
exact bit-parallel algorithm instead of the O(n*m) Python loop; the two tokenizer calls (references,
generations) run side by side with their temp files in the system temp dir (not site-packages), and
METEOR's jar (same command, same stdio protocol) starts first and is fed through a pipe while
BLEU/ROUGE-L/CIDEr run in Python.

Without a Java runtime, a pure-Python copy of the PTB tokenizer (:func:`ptb_tokenize_py`, equal on
ordinary report text, see tests/test_nlg.py) is used and METEOR is ``None`` with a warning: it is
never replaced by another formula. References are never truncated.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

import numpy as np
import pycocoevalcap.meteor.meteor as _meteor_mod
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb_mod
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
PUNCTUATIONS = frozenset(_ptb_mod.PUNCTUATIONS)  # tokens pycocoevalcap drops after PTB tokenisation
PTB_JAR = os.path.join(
    os.path.dirname(os.path.abspath(_ptb_mod.__file__)), _ptb_mod.STANFORD_CORENLP_3_4_1_JAR
)
METEOR_DIR = os.path.dirname(os.path.abspath(_meteor_mod.__file__))
METEOR_CMD = [
    "java",
    "-jar",
    "-Xmx2G",
    _meteor_mod.METEOR_JAR,
    "-",
    "-",
    "-stdio",
    "-l",
    "en",
    "-norm",
]
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def java_available() -> bool:
    return shutil.which("java") is not None


# --------------------------------------------------------------------------------------------------
# PTB tokenisation
# --------------------------------------------------------------------------------------------------

def _drop_punct(line: str) -> str:
    """pycocoevalcap's post-processing of one tokenizer output line."""
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def _ptb_java_start(texts: list[str]) -> tuple:
    # pycocoevalcap replaces '\n'; other breaks would shift lines
    lines = [_LINE_BREAKS.sub(" ", t) for t in texts]
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="ssacl_ptb_")
    with os.fdopen(fd, "wb") as f:
        f.write("\n".join(lines).encode())
    proc = subprocess.Popen(
        [
            "java",
            "-cp",
            PTB_JAR,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            path,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return proc, path, len(lines)


def _ptb_java_finish(proc, path: str, n: int) -> list[str]:
    try:
        stdout, stderr = proc.communicate()
    finally:
        os.remove(path)
    out = stdout.decode().split("\n")
    if proc.returncode != 0 or len(out) != n:
        raise RuntimeError(
            f"PTBTokenizer failed (exit {proc.returncode}, {len(out)} lines for {n}): "
            f"{stderr.decode()[-2000:]}"
        )
    return [_drop_punct(line) for line in out]


def ptb_tokenize_java(texts: list[str]) -> list[str]:
    """Stanford PTBTokenizer exactly as one pycocoevalcap ``PTBTokenizer.tokenize`` call runs it."""
    return _ptb_java_finish(*_ptb_java_start(texts))


# Pure-Python PTB tokenizer: the rules of Stanford's PTBLexer (CoreNLP 3.4.1) that report text
# exercises.
_ABBREV = frozenset(
    (
        "mr mrs ms dr drs prof profs sen rep atty lt col gen messrs gov adm rev maj sgt cpl pvt capt st ste ave pres "
        "lieut hon brig cmdr pfc spc supt det mme mlle inc co cos corp pty ltd plc bancorp dept bhd assn univ intl "
        "sys invt elec natl mfg mtg tel est ext sq jr sr bros blvd rd esq etc al seq vs cf mt ft jan feb mar apr "
        "jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz calif colo conn ct dak fla ga ind "
        "kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo ph.d"
    ).split()
)
# only when capitalised
_ABBREV_CAPITAL = frozenset("miss az ark del ill la mass ore pa tex wash".split())
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_UNICODE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": " ... ",
        "\u00a0": " ",
    }
)

_ALNUM = r"[^\W_]"
_WCHARS = r"(?:[^\W_]|@|_+(?=[^\W_]))"  # underscores only inside a word: "a_b", but "___" alone
_UNIT = (rf"(?:[^\W\d_]{_WCHARS}*(?:'[^\W\d_]+)?(?:[.!?][^\W\d_]{_WCHARS}*)*"  # a word
         rf"|(?:{_ALNUM}|@){_WCHARS}*)")  # digits (+letters)
_HYPH = rf"{_UNIT}(?:-{_UNIT})*"
_PATTERNS = [  # (kind, regex); the longest match wins, ties go to the earlier entry
    ("contr", re.compile(r"n't(?!\w)|'(?:s|m|d|ll|re|ve)(?!\w)", re.I)),
    ("frac", re.compile(r"\d+ \d+/\d+(?![\w/])")),
    ("num", re.compile(r"(?:\d+(?:[.,:]\d+)*|\.\d+)")),
    ("signed", re.compile(r"[-+](?:\d+(?:[.,:]\d+)*|\.\d+)")),
    ("word", re.compile(rf"{_HYPH}(?:/{_HYPH}){{0,2}}")),
    ("numword", re.compile(rf"(?:\d+(?:[.,:]\d+)*)(?:-{_UNIT})+(?:/{_HYPH}){{0,2}}")),
    ("acro", re.compile(r"(?:[^\W\d_]\.)+")),
    ("apos", re.compile(r"'\d\ds?(?!\w|[.,:]\d)")),
    ("underscores", re.compile(r"_+")),
    ("hashtag", re.compile(r"#[^\W\d_]\w*")),
    ("dots", re.compile(r"\.+")),
    ("dashes", re.compile(r"-+")),
    ("run", re.compile(r"[!?]+|\*+|<+|>+|#+")),
    ("quote", re.compile(r"[`'\"]+")),
]
# A single-letter acronym ("R.") before one of these words loses its period (PTBLexer's sentence-end
# rule).
_SENT_WORDS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
    "Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They This We "
    "When While What Yet You"
).split()
_SENT_START = re.compile(
    r"\s+(?:"
    + "|".join(
        w[0] + "(?i:" + re.escape(w[1:]) + ")" if len(w) > 1 else w
        # first letter capital
        for w in _SENT_WORDS
    )
    + r")\s(?!n't|')"
)
_CONTRACTION = re.compile(r"(?<=\w)(n't|'(?:s|m|d|ll|re|ve))(?!\w)", re.I)
_NEXT_IS_DIGIT = re.compile(r"\s*\d")


def _is_abbrev(word: str) -> bool:
    low = word.lower()
    return low in _ABBREV or (low in _ABBREV_CAPITAL and word[:1].isupper())


def _ptb_tokens(text: str, following: str = "") -> list[str]:
    """Tokens of one line. ``following`` is what the lexer sees after the newline (the next
    non-blank line, plus a newline if more follow): it looks across lines ("R." before "The ..."
    loses its period, "no." before a digit keeps it)."""
    text = text.translate(_UNICODE)
    text = _CONTRACTION.sub(r" \1", text)
    tokens: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        if text[pos].isspace():
            pos += 1
            continue
        kind, end = "char", pos
        for k, pat in _PATTERNS:
            if k == "signed" and pos > 0 and (text[pos - 1].isalnum() or text[pos - 1] == "_"):
                continue
            m = pat.match(text, pos)
            if m and m.end() > end:
                kind, end = k, m.end()
        end = max(end, pos + 1)
        tok = text[pos:end]
        if kind == "word" and tok.lower() in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[tok.lower()])
            pos = end
            continue
        if kind == "word" and text.startswith(".", end) and not text.startswith("..", end):
            digit_next = _NEXT_IS_DIGIT.match(text, end + 1) or (
                not text[end + 1 :].strip() and following[:1].isdigit()
            )
            if _is_abbrev(tok) or (tok.lower() == "no" and digit_next):
                tok, end = tok + ".", end + 1
        if (
            kind == "acro"
            and len(tok) == 2
            and _SENT_START.match(text[end:] + ("\n" + following if following else ""))
        ):
            tokens += [tok[0], "."]
            pos = end
            continue
        if kind == "frac":
            tok = tok.replace(" ", "\u00a0")
        elif kind == "dots" and len(tok) > 1:
            tok = "..."
        elif kind == "dashes":
            tok = "-" if len(tok) == 1 else "--"
        elif kind == "quote":
            tok = "'"
        elif kind == "char":
            tok = _BRACKETS.get(tok, tok)
        tokens.append(tok)
        pos = end
    return [t.lower() for t in tokens]


def ptb_tokenize_py(text: str, following: str = "") -> str:
    """Pure-Python stand-in for pycocoevalcap's PTB tokenisation of one text (used when there is no
    Java)."""
    return " ".join(
        t for t in _ptb_tokens(_LINE_BREAKS.sub(" ", text), following) if t not in PUNCTUATIONS
    )


def _ptb_py_block(texts: list[str]) -> list[str]:
    out, following = [], ""
    # each line sees the next non-blank line (and whether more follow)
    for i in range(len(texts) - 1, -1, -1):
        out.append(ptb_tokenize_py(texts[i], following))
        line = _LINE_BREAKS.sub(" ", texts[i])
        if line.strip():
            following = line.lstrip() + ("\n" if i < len(texts) - 1 else "")
    return out[::-1]


def ptb_tokenize_blocks(blocks: list[list[str]], use_java: bool | None = None) -> list[list[str]]:
    """PTB-tokenise each block of texts as one pycocoevalcap ``PTBTokenizer.tokenize`` call would
    (the lexer looks across lines, so a block's texts are tokenised in sequence);
    ``use_java=None``: Java if on PATH."""
    if use_java is None:
        use_java = java_available()
    if not use_java:
        return [_ptb_py_block(b) for b in blocks]
    running = [_ptb_java_start(list(b)) for b in blocks]  # the JVMs run side by side
    return [_ptb_java_finish(*r) for r in running]


def ptb_tokenize(texts: list[str], use_java: bool | None = None) -> list[str]:
    """PTB-tokenise ``texts`` the way pycocoevalcap does; ``use_java=None`` uses Java when it is on
    PATH."""
    return ptb_tokenize_blocks([texts], use_java)[0]


# --------------------------------------------------------------------------------------------------
# METEOR 1.5 (pycocoevalcap's jar and protocol)
# --------------------------------------------------------------------------------------------------

class MeteorProcess:
    """pycocoevalcap's ``Meteor`` (same jar, flags and stdio protocol), with the SCORE lines
    pipelined.

    The JVM starts in the constructor and loads its paraphrase table (~10 s) while the caller does
    other work.
    """

    def __init__(self):
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(METEOR_CMD, cwd=METEOR_DIR, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)

    def segment_stats(self, gts: dict, res: dict, ids: list) -> list[str]:
        """The SCORE line of every id: METEOR's per-segment statistics (independent across
        segments)."""
        lines = []
        for i in ids:
            hyp = res[i][0].replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hyp)) + "\n")
        stdin, stdout = self.proc.stdin, self.proc.stdout

        def feed():
            try:
                stdin.write("".join(lines).encode())
                stdin.flush()
            except (BrokenPipeError, OSError):
                pass

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        stats = [stdout.readline().decode().strip() for _ in ids]
        writer.join()
        return stats

    def evaluate(self, stats: list[str]) -> tuple[float, list[float]]:
        """pycocoevalcap's EVAL line: the corpus score from all segments' statistics, and each
        segment's."""
        self.proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        self.proc.stdin.flush()
        scores = [float(self.proc.stdout.readline().strip()) for _ in stats]
        return float(self.proc.stdout.readline().strip()), scores


    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                f.close()
            except OSError:
                pass


def meteor_parallel(procs: list[MeteorProcess], gts: dict, res: dict) -> tuple[float, list[float]]:
    """Segments split over several JVMs, then one EVAL over all statistics: the same numbers as one
    JVM."""
    ids = list(gts)
    chunks = [ids[k::len(procs)] for k in range(len(procs))]
    stats: list[list[str]] = [[] for _ in procs]

    def work(k):
        stats[k] = procs[k].segment_stats(gts, res, chunks[k])

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(1, len(procs))]
    for t in threads:
        t.start()
    work(0)
    for t in threads:
        t.join()
    by_id = {i: st for chunk, sts in zip(chunks, stats) for i, st in zip(chunk, sts)}
    if len(by_id) != len(ids):
        raise RuntimeError("a METEOR process returned fewer statistics than segments")
    return procs[0].evaluate([by_id[i] for i in ids])


# --------------------------------------------------------------------------------------------------
# ROUGE-L: pycocoevalcap's Rouge, with its O(n*m) Python LCS replaced by an exact bit-parallel one
# --------------------------------------------------------------------------------------------------

def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (Hyyro's bit-parallel algorithm; equals
    pycocoevalcap's my_lcs)."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(gts: dict, res: dict, beta: float = 1.2) -> tuple[float, np.ndarray]:
    """pycocoevalcap ``Rouge().compute_score`` step for step (same splitting, maxima, formula and
    mean)."""
    scores = []
    for k in gts:
        token_c = res[k][0].split(" ")
        prec, rec = [], []
        for reference in gts[k]:
            token_r = reference.split(" ")
            lcs = lcs_length(token_r, token_c)
            prec.append(lcs / float(len(token_c)))
            rec.append(lcs / float(len(token_r)))
        p, r = max(prec), max(rec)
        scores.append(
            ((1 + beta**2) * p * r) / float(r + beta**2 * p) if p != 0 and r != 0 else 0.0
        )
    return np.mean(np.array(scores)), np.array(scores)


# --------------------------------------------------------------------------------------------------
# score_nlg
# --------------------------------------------------------------------------------------------------

def _check(gts: dict, res: dict) -> tuple[list, dict, dict]:
    if set(gts) != set(res):
        missing, extra = set(gts) - set(res), set(res) - set(gts)
        raise ValueError(
            f"ids differ: {len(missing)} without a generation (e.g. {sorted(map(str, missing))[:3]}), "
            f"{len(extra)} without a reference (e.g. {sorted(map(str, extra))[:3]})"
        )
    if not gts:
        raise ValueError("nothing to score")
    g, r = {}, {}
    for k in gts:
        refs = [gts[k]] if isinstance(gts[k], str) else list(gts[k])
        hyp = [res[k]] if isinstance(res[k], str) else list(res[k])
        if not refs or not all(isinstance(t, str) for t in refs):
            raise ValueError(f"id {k!r}: references must be a non-empty list of strings")
        if len(hyp) != 1 or not isinstance(hyp[0], str):
            raise ValueError(f"id {k!r}: exactly one generated string expected, got {hyp!r}")
        g[k], r[k] = refs, hyp
    return list(gts), g, r


def score_nlg(gts: dict, res: dict, *, use_java: bool | None = None, meteor: bool = True,
              details: dict | None = None, meteor_workers: int | None = None) -> dict:
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr of generated ``res`` against references ``gts``.

    ``gts``: id -> list of reference strings (or one string); ``res``: id -> [generated string] (or
    the string). Values are pycocoevalcap's (fractions; CIDEr-D on its usual 0-10 scale, computed
    with the IDF of these references). METEOR is None when there is no Java (or ``meteor=False``),
    with a warning. ``use_java=False`` forces the pure-Python tokenizer. ``meteor_workers`` METEOR
    JVMs share the segments (default: one per core from 1,000 reports on; each JVM costs ~10 s of
    CPU to start). If ``details`` is a dict it receives the tokenizer used, per-report scores and
    timings.
    """
    t0 = time.perf_counter()
    ids, gts, res = _check(gts, res)
    java = java_available() if use_java is None else bool(use_java)
    if use_java and not java_available():
        raise RuntimeError("use_java=True but no 'java' on PATH")
    mets: list[MeteorProcess] = []
    if meteor and java:
        if meteor_workers is None:
            meteor_workers = min(os.cpu_count() or 1, 4) if len(ids) >= 1000 else 1
        # start loading now, scored last
        mets = [MeteorProcess() for _ in range(max(1, meteor_workers))]
    elif meteor:
        warnings.warn(
            "no Java runtime on PATH: METEOR is reported as missing (None); BLEU/ROUGE-L/CIDEr use the "
            "pure-Python PTB tokenizer. Install a JRE (scripts/setup_env.sh does) for METEOR.",
            RuntimeWarning,
            stacklevel=2,
        )
    out = {m: None for m in METRICS}
    per_report: dict[str, list] = {}
    timings: dict[str, float] = {}
    try:
        # references and generations tokenised as pycocoevalcap's two PTBTokenizer calls would
        ref_toks, hyp_toks = ptb_tokenize_blocks(
            [[t for k in ids for t in gts[k]], [res[k][0] for k in ids]], java
        )
        tgts, pos = {}, 0
        for k in ids:
            tgts[k] = ref_toks[pos:pos + len(gts[k])]
            pos += len(gts[k])
        tres = {k: [hyp_toks[j]] for j, k in enumerate(ids)}
        timings["tokenize"] = time.perf_counter() - t0

        met_result: dict = {}
        if mets:
            def run_meteor():
                t = time.perf_counter()
                try:
                    met_result["value"] = meteor_parallel(mets, tgts, tres)
                except Exception as e:  # noqa: BLE001 - reported below, never replaced
                    met_result["error"] = e
                met_result["seconds"] = time.perf_counter() - t
            met_thread = threading.Thread(target=run_meteor, daemon=True)
            met_thread.start()

        t = time.perf_counter()
        bleu, bleu_each = Bleu(4).compute_score(tgts, tres, verbose=0)
        for n in range(4):
            out[f"BLEU_{n + 1}"] = float(bleu[n])
            per_report[f"BLEU_{n + 1}"] = [float(x) for x in bleu_each[n]]
        timings["BLEU"] = time.perf_counter() - t
        t = time.perf_counter()
        rouge, rouge_each = rouge_l(tgts, tres)
        out["ROUGE_L"], per_report["ROUGE_L"] = float(rouge), [float(x) for x in rouge_each]
        timings["ROUGE_L"] = time.perf_counter() - t
        t = time.perf_counter()
        cider, cider_each = Cider().compute_score(tgts, tres)
        out["CIDEr"], per_report["CIDEr"] = float(cider), [float(x) for x in cider_each]
        timings["CIDEr"] = time.perf_counter() - t

        if mets:
            met_thread.join()
            timings["METEOR"] = met_result["seconds"]
            if "value" in met_result:
                out["METEOR"] = float(met_result["value"][0])
                per_report["METEOR"] = [float(x) for x in met_result["value"][1]]
            else:
                warnings.warn(f"METEOR failed and is reported as missing: {met_result['error']!r}; "
                              f"java stderr: {mets[0].stderr_tail()}", RuntimeWarning, stacklevel=2)
    finally:
        for met in mets:
            met.close()
    timings["total"] = time.perf_counter() - t0
    if details is not None:
        details.update(tokenizer="PTBTokenizer (Java)" if java else "PTB rules (pure Python)",
                       ids=ids, per_report=per_report, seconds=timings)
    return out
