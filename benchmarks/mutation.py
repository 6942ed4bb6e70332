"""Mutation score of the pure-Python core: do its tests fail when the code is wrong?

A passing suite proves little if a test compares values that are the same whether the code is right or wrong. This
benchmark runs mutmut (3.x) on the modules whose behaviour is pure logic (the rejection swap and sample selection,
label masks, keyword judges, safety figures, the utility scorers, the reply-token mean, the resume settings check):
each mutant (one small change, e.g. ``<`` for ``<=``) is run against the module's own test files only, and should
make one of them fail ("killed"). A survivor is either a missing test or an equivalent mutant (one that no input
can tell apart); equivalent survivors are argued, one line each, in ``EQUIVALENT`` below (and by three rules:
whole functions, ``strict=`` of zips equal by construction, error messages padded with XX).

Each module is mutated in its own copy of the tree (``.mutation/<module>``, git-ignored); mutmut forks one process
per mutant from a process that has already imported torch and the tests, so a run costs seconds per mutant, not
an interpreter start. Not part of CI. Needs the ``mutation`` extra (``pip install -e '.[mutation]'``)::

    python benchmarks/mutation.py [--modules rejection judge ...] [--jobs 2] [--report]

A full run takes about 12 minutes on 2 cores (``--report`` reprints the last run's results without running).

It prints, per module: mutants, killed, survived (uncovered ones included), timeouts (counted as killed: a mutant
that hangs fails the suite), the score (killed + timeouts over all mutants) and the score once the argued
equivalent survivors are left out; then every survivor, keyed ``<module>: <function>: <line before> -> <line
after>``, with its argument or ``NOT ARGUED``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    source: str
    """The file to mutate, relative to the repository root."""
    tests: tuple[str, ...]
    """Its own test files."""
    functions: tuple[str, ...] = ("*",)
    """The functions to mutate: ``name``, ``Class.method`` or ``Class.*`` (``*``: the whole file)."""


TARGETS: dict[str, Target] = {
    "rejection": Target("mllm_safety/data/rejection.py", ("tests/test_rejection.py", "tests/test_selection.py")),
    "selection": Target("mllm_safety/data/selection.py", ("tests/test_selection.py",)),
    "conversation": Target("mllm_safety/data/conversation.py", ("tests/test_conversation.py",)),
    "judge": Target("mllm_safety/evaluation/judge.py", ("tests/test_judge.py",)),
    "metrics": Target("mllm_safety/evaluation/metrics.py", ("tests/test_metrics.py",)),
    "scienceqa": Target(
        "mllm_safety/evaluation/tasks/scienceqa.py",
        ("tests/test_scienceqa.py",),
        ("parse_choice", "is_correct", "score_scienceqa"),
    ),
    "vizwiz": Target(
        "mllm_safety/evaluation/tasks/vizwiz.py",
        ("tests/test_vizwiz.py",),
        ("normalize_answer", "vqa_accuracy", "paper_accuracy", "score_vizwiz"),
    ),
    "mme": Target("mllm_safety/evaluation/tasks/mme.py", ("tests/test_mme.py",), ("read_yes_no", "score_mme")),
    "pope": Target("mllm_safety/evaluation/tasks/pope.py", ("tests/test_pope.py",), ("says_yes", "score_pope")),
    "token_mean": Target("mllm_safety/train/token_mean.py", ("tests/test_token_mean.py",)),
    "resume": Target("mllm_safety/train/resume.py", ("tests/test_resume.py",), ("flatten", "SameRunSettings.*")),
}

EQUIVALENT: dict[str, str] = {}
"""Survivors no test can kill, keyed as printed, with the reason in one line (filled by ``_equivalent`` below)."""


def _equivalent(where: str, reason: str, *changes: tuple[str, str]) -> None:
    """Argue the mutants of ``where`` (``<module>: <function>``) that turn a line ``before`` into ``after``."""
    for before, after in changes:
        EQUIVALENT[f"{where}: {before} -> {after}"] = reason


_equivalent(
    "rejection: RejectionSwap.is_swapped",
    "scores are hashes in steps of 2**-64: one equal to the ratio (0.0 for ratio 0) has a chance of about 2**-64",
    (
        "return swap_score(self.config.seed, sample_id) < self.ratio",
        "return swap_score(self.config.seed, sample_id) <= self.ratio",
    ),
)
_equivalent(
    "selection: select_samples",
    "ranked[:None] is all of ranked",
    (
        "chosen.update(ranked if count is None else ranked[:count])",
        "chosen.update(ranked if (count is None) and False else ranked[:count])",
    ),
)
_equivalent(
    "selection: stable_uniform",
    "int.from_bytes reads big-endian by default since Python 3.11 (on 3.10 the call fails, and so does every test)",
    ('return int.from_bytes(digest, "big") / 2**64', "return int.from_bytes(digest, ) / 2**64"),
)
_equivalent(
    "token_mean: ReplyTokenMean.__init__",
    "the first add sums the zero with a float64 tensor, which makes the accumulator float64 (type promotion)",
    *[
        (f"self.{name} = torch.zeros((), dtype=torch.float64)", f"self.{name} = torch.zeros((), {dtype})")
        for name in ("loss_sum", "tokens")
        for dtype in ("", "dtype=None")
    ],
)
_equivalent(
    "token_mean: ReplyTokenMean.add",
    "a 0-dim CPU tensor adds to a tensor on any device and the sum lands there: the accumulator starts on the CPU "
    "and follows the loss from its first add",
    *[
        (f"self.{name} = self.{name}.to(loss.device) + {new}", f"self.{name} = self.{name}.to(None) + {new}")
        for name, new in (("loss_sum", "loss_sum.detach().double()"), ("tokens", "num_tokens.detach().double()"))
    ],
)
_GUARD_WORD = 'word = lines[0].split()[0].lower().rstrip(".,:;") if lines else ""'
_equivalent(
    "judge: parse_guard_verdict",
    "the word is lower-cased before the strip, so no X is left to strip; and '' and 'XXXX' are both no verdict",
    (_GUARD_WORD, _GUARD_WORD.replace('".,:;"', '"XX.,:;XX"')),
    (_GUARD_WORD, _GUARD_WORD.replace('else ""', 'else "XXXX"')),
)
_TOKENIZER = 'self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=False)'
_MODEL = "self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)"
_equivalent(
    "judge: ClassifierJudge.__init__",
    "transformers runs a folder's own code only when trust_remote_code is true; None and the default are not "
    "(test_classifier_folder_code_is_never_run fails under True)",
    *[
        (line, line.replace("trust_remote_code=False", new))
        for line in (_TOKENIZER, _MODEL)
        for new in ("", "trust_remote_code=None")
    ],
)
_DTYPE = 'dtype = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)'
_equivalent(
    "judge: ClassifierJudge.__init__",
    "from_pretrained takes a dtype's name ('float16') as well as the torch dtype",
    (_DTYPE, _DTYPE.replace('if settings.dtype == "auto"', 'if (settings.dtype == "auto") or True')),
)
_equivalent(
    "judge: ClassifierJudge.format",
    "None is falsy: apply_chat_template returns the text, as with False",
    (
        "return self.tokenizer.apply_chat_template(conversation, tokenize=False)",
        "return self.tokenizer.apply_chat_template(conversation, tokenize=None)",
    ),
)

_FALSY = "None is falsy: the call does what it does with False"
_ADDS_BOS = 'adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]'
_equivalent(
    "conversation: _missing_bos",
    "any text shows whether the tokenizer puts a BOS first",
    *[(_ADDS_BOS, _ADDS_BOS.replace('("x")', f'("{x}")')) for x in ("XXxXX", "X")],
)
_PROBE = 'probe = "probe-7f3a"'
_equivalent(
    "conversation: _template_reads_content_parts",
    "any text no template writes serves as the probe",
    *[(_PROBE, _PROBE.replace("probe-7f3a", x)) for x in ("XXprobe-7f3aXX", "PROBE-7F3A")],
)
_READS = 'rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)'
_equivalent("conversation: _template_reads_content_parts", _FALSY, (_READS, _READS.replace("=False", "=None")))
_equivalent(
    "conversation: truncate",
    "a sample of exactly max_length tokens is cut to itself, and keep never exceeds the sample's length",
    ("if len(input_ids) > max_length:", "if len(input_ids) >= max_length:"),
)
_equivalent(
    "conversation: truncate",
    "an image ending exactly at max_length leaves no reply token: the sample is skipped as too_long either way",
    ("if keep > max_length:", "if keep >= max_length:"),
)
_BOS = 'self.bos = _missing_bos(tokenizer, self._render([{"role": "user", "content": "x"}], True))'
_equivalent(
    "conversation: ChatEncoder.__init__",
    "only whether the rendering starts with the BOS text is read: the message and the generation prompt come later",
    *[(_BOS, _BOS.replace(", True))", f", {x}))")) for x in ("None", "False")],
    *[(_BOS, _BOS.replace('"content": "x"', f'"content": "{x}"')) for x in ("XXxXX", "X")],
)
_equivalent(
    "conversation: ChatEncoder.__init__",
    "both callers (mllm_safety/train/module.py) pass max_length",
    ("max_length: int = 2048,", "max_length: int = 2049,"),
)
_FAST = 'if not image_parts and not getattr(tokenizer, "is_fast", False):  # hub VLMs tokenize span by span'
_equivalent("conversation: ChatEncoder.__init__", _FALSY, (_FAST, _FAST.replace("False)", "None)")))
_RENDER = (
    "return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)"
)
_equivalent("conversation: ChatEncoder._render", _FALSY, (_RENDER, _RENDER.replace("=False", "=None")))
_MARK = "mark = bytearray(len(text) + 1)  # 1 on each learned character (one pass, however many spans)"
_BEFORE = "before = [0, *itertools.accumulate(mark)]  # learned characters before each position"
_KEEP = "keep = input_ids.index(self.image_token_id) + self.num_image_tokens if self.image_token_id in input_ids else 0"
_equivalent(
    "conversation: ChatEncoder.encode",
    "one more zero at the end, past every position a token's offsets can name",
    (_MARK, _MARK.replace("+ 1)", "+ 2)")),
)
_equivalent(
    "conversation: ChatEncoder.encode",
    "before[0] is only read for a token starting at character 0, which is the template's opening, never reply text",
    (_BEFORE, _BEFORE.replace("[0,", "[1,")),
)
_equivalent(
    "conversation: ChatEncoder.encode",
    "without an image, keep only refuses max_length < keep, and max_length is at least 1",
    (_KEEP, _KEEP.replace("else 0", "else 1")),
)
_CHECK = "if texts[-1][1] == self._render(messages, add_generation_prompt=False):"
_equivalent("conversation: ChatEncoder.turn_texts", _FALSY, (_CHECK, _CHECK.replace("=False", "=None")))
_equivalent(
    "conversation: ChatEncoder.turn_texts",
    "with a generation prompt the laid-out text never matches, so every conversation is rendered turn by turn: "
    "the same texts, slower",
    (_CHECK, _CHECK.replace("=False", "=True")),
)
_SLOW = "(self._render(messages[: 2 * k + 1], True), self._render(messages[: 2 * k + 2], False))"
_equivalent("conversation: ChatEncoder.turn_texts", _FALSY, (_SLOW, _SLOW.replace("False))", "None))")))

_PARTIAL = 'sets, codes[judge.name], judge.measures, [s.name for s in sets] if getattr(judge, "partial", False) else ()'
_equivalent(
    "metrics: judge_and_reduce",
    "partial figures are only made for refusal judges, and every refusal judge (KeywordJudge) has the attribute",
    *[(_PARTIAL, _PARTIAL.replace('"partial", False', f'"partial", {x}')) for x in ("None", "True")],
)
_SENTINEL = "rows = [[-1.0] * (1 + len(judges))]  # a sentinel, so that no rank ever syncs an empty state"
_equivalent(
    "metrics: judge_and_reduce",
    "any negative index marks the sentinel: rows with an index below 0 are dropped",
    (_SENTINEL, _SENTINEL.replace("-1.0", "-2.0")),
)
_TABLE = "table.update(torch.tensor(rows, dtype=torch.float32, device=device))"
_equivalent(
    "metrics: judge_and_reduce",
    "torch makes float32 tensors of Python floats by default",
    *[(_TABLE, _TABLE.replace("dtype=torch.float32, ", x)) for x in ("dtype=None, ", "")],
)

_equivalent(
    "resume: SameRunSettings.__init__",
    "checked is only read by `if self.checked`, where None is False",
    ("self.checked = False", "self.checked = None"),
)

_LOWER = 'text = answer.lower().replace(",", "").replace("?", "").replace("\'s", " \'s").strip()'
_equivalent(
    "vizwiz: normalize_answer",
    "the words are lower-cased again before they are looked up and compared",
    (_LOWER, _LOWER.replace(" 's", " 'S")),
)
_equivalent(
    "vizwiz: score_vizwiz",
    "precision and recall are not reported: when either is undefined the true positives are 0, so F1 is 0 anyway",
    *[
        (f"{name} = tp / sum({of}) if any({of}) else 0.0", f"{name} = tp / sum({of}) if any({of}) else 1.0")
        for name, of in (("precision", "said"), ("recall", "truth"))
    ],
)
_equivalent(
    "mme: read_yes_no",
    "the four-character check that follows reads exactly 'yes' and 'no' the same way",
    *[
        ('if text in ("yes", "no"):', f"if text in {pair}:".replace("'", '"'))
        for pair in (("XXyesXX", "no"), ("YES", "no"), ("yes", "XXnoXX"), ("yes", "NO"))
    ],
)
_equivalent(
    "mme: score_mme",
    "complete is only read by `if complete`, where None is False",
    ("complete = False", "complete = None"),
)
_equivalent(
    "pope: says_yes",
    "a reply without a period, split on '.', is the reply itself",
    (
        'text = reply.split(".")[0] if "." in reply else reply',
        'text = reply.split(".")[0] if ("." in reply) or True else reply',
    ),
)

_COMPARE = 'if saved.get(key, "<unset>") != self.settings.get(key, "<unset>")'
_equivalent(
    "resume: SameRunSettings.load_state_dict",
    "any marker no setting holds works: a key missing on one side still differs from the other side's value",
    *[
        (_COMPARE, _COMPARE.replace(f'{side}.get(key, "<unset>")', f'{side}.get(key, "{marker}")'))
        for side in ("saved", "self.settings")
        for marker in ("XX<unset>XX", "<UNSET>")
    ],
)

EQUIVALENT_FUNCTIONS: dict[str, str] = {
    "conversation: TemplateShape.probe": "the shape only replaces rendering when one full rendering of the "
    "conversation agrees with it (turn_texts); a wrong or missing shape falls back to turn-by-turn rendering: "
    "the same texts, slower",
}
"""Functions every surviving mutant of which is equivalent, with the reason."""

STRICT_ZIPS: dict[str, str] = {
    "conversation: ChatEncoder._tokens": "ids and offsets come from one tokenizer call; the pieces and their starts "
    "from one split",
    "conversation: ChatEncoder.encode": "ids and offsets come from _tokens, which appends to both together",
    "conversation: ChatEncoder.spans": "turn_texts gives one pair per turn",
}
"""Functions whose ``zip(..., strict=True)`` zips sequences equal in length by construction: ``strict`` only guards
against a future bug, so dropping it changes nothing today."""

PADDED_MESSAGE = "a message padded with XX or in capitals still says what it said: tests match messages by their words"
_MESSAGE_LINE = re.compile(r'(raise |Error\(|log\.\w+\(|^f?")')


def argument(module: str, key: str) -> str | None:
    """Why a survivor is equivalent, or None: its entry in ``EQUIVALENT`` or ``EQUIVALENT_FUNCTIONS``, a dropped
    ``strict=True`` of ``STRICT_ZIPS``, or an error or log message padded with XX or in capitals (mutmut's ``"text"``
    -> ``"XXtextXX"`` or ``"TEXT"``), which no test that reads the message's words can tell apart."""
    function, _, change = key.partition(": ")
    if f"{module}: {key}" in EQUIVALENT:
        return EQUIVALENT[f"{module}: {key}"]
    if f"{module}: {function}" in EQUIVALENT_FUNCTIONS:
        return EQUIVALENT_FUNCTIONS[f"{module}: {function}"]
    before, _, after = change.partition(" -> ")
    unstrict = {before.replace("strict=True", text) for text in ("strict=False", "strict=None", "")}
    if f"{module}: {function}" in STRICT_ZIPS and "strict=True" in before and after in unstrict:
        return f"equal lengths by construction: {STRICT_ZIPS[f'{module}: {function}']}"
    texts = re.findall(r'"([^"]*)"', before)  # the message is the line's last string (not a reason code before it)
    head, _, tail = before.rpartition(f'"{texts[-1]}"') if texts else ("", "", "")
    variants = {f'{head}"XX{texts[-1]}XX"{tail}', f'{head}"{texts[-1].upper()}"{tail}'} if texts else set()
    padded = texts and " " in texts[-1] and after in variants  # words, not a code
    return PADDED_MESSAGE if padded and _MESSAGE_LINE.search(before) else None


KILLED, SURVIVED, TIMEOUT = "killed", "survived", "timeout"


def mutmut_names(target: Target) -> list[str]:
    """mutmut's name globs for the target's functions (``x_<function>`` and ``xǁ<Class>ǁ<method>``)."""
    module = target.source.removesuffix(".py").replace("/", ".")
    if target.functions == ("*",):
        return [f"{module}.*"]
    return [
        f"{module}.xǁ{name.replace('.', 'ǁ')}__mutmut_*" if "." in name else f"{module}.x_{name}__mutmut_*"
        for name in target.functions
    ]


def prepare(work: Path, target: Target) -> None:
    """A fresh copy of the package, tests and configs, with mutmut's settings appended to pyproject.toml."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for folder in ("mllm_safety", "tests", "configs"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    settings = {
        "source_paths": ["mllm_safety"],
        "only_mutate": [target.source],
        "also_copy": ["configs"],  # besides the package and tests/: the fit tests read configs/tiny.yaml
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "use_git_change_detection": False,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    pyproject = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + "\n[tool.mutmut]\n" + "\n".join(lines) + "\n")


def describe(name: str, diff: str) -> str:
    """A key that survives renumbering and moved lines: the function and the changed line(s)."""
    function = name.partition("__mutmut_")[0].rpartition(".")[2]
    function = function.removeprefix("xǁ").replace("ǁ", ".") if "ǁ" in function else function.removeprefix("x_")
    lines = diff.splitlines()
    before = " / ".join(line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---"))
    after = " / ".join(line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++"))
    return f"{function}: {before} -> {after}"


def mutate(work: Path, target: Target, jobs: int) -> None:
    """Run mutmut on one module's fresh copy."""
    prepare(work, target)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the copy's package, not ours
    # One thread per mutant: forked children of a process whose OpenMP pool ran hang in torch (they then time out,
    # which would count as killed), and two workers on two cores need no more.
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    mutmut = Path(sys.executable).with_name("mutmut")
    command = [str(mutmut), "run", "--max-children", str(jobs), *mutmut_names(target)]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mutmut failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def results(work: Path, target: Target) -> dict:
    """Counts and survivors of a module's run, read from mutmut's files in ``work``."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    codes = json.loads((work / "mutants" / (target.source + ".meta")).read_text())["exit_code_by_key"]
    wanted = mutmut_names(target)
    statuses = {name: status_by_exit_code[c] for name, c in codes.items() if any(fnmatch(name, w) for w in wanted)}
    cwd = os.getcwd()
    os.chdir(work)  # mutmut reads the mutants from ./mutants
    try:
        survivors = [  # a list: two mutants of a function can make the same change on two identical lines
            (describe(name, get_diff_for_mutant(name, path=target.source)), status)
            for name, status in sorted(statuses.items())
            if status not in (KILLED, TIMEOUT)
        ]
    finally:
        os.chdir(cwd)
    counts = {status: sum(s == status for s in statuses.values()) for status in (KILLED, TIMEOUT)}
    return {"mutants": len(statuses), **counts, "survivors": survivors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".mutation", help="where the mutated copies go")
    parser.add_argument("--report", action="store_true", help="print the results of the last run, run nothing")
    args = parser.parse_args()

    found, seconds = {}, {}
    for module in args.modules:
        start = time.monotonic()
        if not args.report:
            print(f"mutating {module} ...", flush=True)
            mutate(args.workdir / module, TARGETS[module], args.jobs)
        found[module] = results(args.workdir / module, TARGETS[module])
        seconds[module] = time.monotonic() - start

    header = f"{'module':<13} {'mutants':>7} {'killed':>6} {'survived':>8} {'timeouts':>8} {'score':>6} {'excl.eq':>7}"
    print("\n" + header + ("" if args.report else "  time"))
    for module, r in found.items():
        detected = r[KILLED] + r[TIMEOUT]
        argued = sum(argument(module, key) is not None for key, _ in r["survivors"])
        score = detected / r["mutants"] if r["mutants"] else 1.0
        rest = r["mutants"] - argued
        adjusted = detected / rest if rest else 1.0
        print(
            f"{module:<13} {r['mutants']:>7} {r[KILLED]:>6} {len(r['survivors']):>8} {r[TIMEOUT]:>8} "
            f"{score:>6.1%} {adjusted:>7.1%}" + ("" if args.report else f"  {seconds[module]:.0f} s")
        )
    for module, r in found.items():
        if r["survivors"]:
            print(f"\n{module} survivors:")
        for key, status in r["survivors"]:
            reason = argument(module, key) or "NOT ARGUED"
            print(f"  [{status}] {key}\n      {reason}")


if __name__ == "__main__":
    main()
