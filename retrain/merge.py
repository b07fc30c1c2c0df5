"""merge: accepted corrections -> SFT rows (train / held-out), replay rows, preference pairs, KTO labels.

    >>> manifest = run_merge(Settings(), Path("data/runs/run-20261123-120000"))
    >>> manifest.counts["train"], manifest.counts["heldout"], manifest.counts["replay"]
    (41, 9, 33)

The feedback folder is read once, each shard hashed as it is read (the manifest pins those bytes).
Each flag's latest revision and latest review decision count; every accepted correction becomes
one SFT row in TRL's conversational prompt-completion shape. Rows that cannot teach anything are
left out and listed in ``merge_report.json`` with their flag and why: no correction, an empty or
over-long one, one holding chat-template control tokens or an instruction to the model (a prompt
injection), one equal to the model's own answer, an exact duplicate, a prompt corrected two
different ways (the latest decision wins), a decision on an older revision of the flag (the review
page shows it as pending again).

Everything but ``run_merge`` is a pure function over records, so tests run them on small data.
Files are written whole or not at all (temp file + ``os.replace``), the manifest last: a run folder
without ``manifest.json`` holds no finished merge.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from feedback.files import write_atomic
from feedback.reader import BadLine, gc_paused, latest_revisions, parse_jsonl, shard_paths
from feedback.reviews import newer, review_shard_paths
from retrain.replay import replay_prompts, self_replay
from schemas.flag import ChatMessage, FlagRecord
from schemas.review import ReviewDecision
from schemas.run import BaseModelRef, InputFile, MergeConfig, RunManifest
from schemas.settings import Settings
from schemas.sft import KTORow, PreferenceRow, RowMeta, SFTRow

log = logging.getLogger(__name__)

DATA_FILES = {
    "train": "data/train.jsonl",
    "heldout": "data/heldout.jsonl",
    "replay": "data/replay.jsonl",
    "preference": "data/preference.jsonl",
    "kto": "data/kto.jsonl",
}
REPORT_FILE = "merge_report.json"
MANIFEST_FILE = "manifest.json"

ReplayFn = Callable[[list[str]], list[SFTRow]]


class MergeError(RuntimeError):
    """The merge cannot produce training data; the message says why and what to do."""


# --- records of the merge itself ------------------------------------------------------------------
@dataclass(eq=False)  # not frozen: a frozen dataclass's __init__ costs 3x, paid 100k times
class Accepted:
    """An accepted flag: its latest revision, the decision accepting it, and the correction to learn.

    The prompt, the completion and the row meta they share (SFT, preference and KTO rows alike)
    are built once, here.
    """

    flag: FlagRecord
    decision: ReviewDecision
    correction: str
    order: int  # the decision's position in read order: breaks ties of created_at

    def __post_init__(self) -> None:
        self.prompt = prompt_of(self.flag)
        self.prompt_json = canonical(self.prompt)
        self.completion = _assistant(self.correction.strip())
        self.meta = RowMeta(source="correction", flag_id=self.flag.flag_id, decision_id=self.decision.decision_id,
                            key=key_of(self.prompt_json, canonical(self.completion)))

    @property
    def rank(self) -> tuple:
        """Later decisions rank higher (by created_at, then read order)."""
        return (self.decision.created_at, self.order)


LeftOutReason = Literal[
    "no_correction", "stale_decision", "unknown_flag", "empty", "too_long", "control_tokens", "injection",
    "same_as_answer", "duplicate", "conflict",
]

# A correction is the answer the model learns to give. Chat-template control tokens in it would be
# tokenized as turn boundaries, forging turns (a system message) inside the training row; and one
# that addresses the model ("ignore all previous instructions ...") teaches it to repeat an attack.
CONTROL_TOKENS = re.compile(r"<\|[^<>|\s]{1,40}\|>|\[/?INST\]|<</?SYS>>|</?(?:start|end)_of_turn>")
INJECTION_VERBS = ("ignore", "disregard", "forget", "override")
INJECTION = re.compile(
    rf"\b(?:{'|'.join(INJECTION_VERBS)})\s+(?:\w+\s+){{0,2}}?(?:previous|prior|above|earlier|preceding|all|your)\s+"
    r"(?:\w+\s+){0,2}?(?:instructions|prompts?|rules|guidelines|directions)\b",
    re.IGNORECASE,
)


def control_tokens(text: str) -> list[str]:
    """The chat-template control tokens in ``text``, each once (most texts hold no '<' or '[': no regex then)."""
    return list(dict.fromkeys(CONTROL_TOKENS.findall(text))) if "<" in text or "[" in text else []


def injection(text: str) -> str | None:
    """The words of ``text`` that address the model ("ignore all previous instructions"), or None.

    The verbs are looked for first: the regex on every correction cost 5x more (0.33 s of CPU for the
    56k corrections of a 100k-flag merge, against 0.06 s)."""
    lowered = text.lower()
    if not any(verb in lowered for verb in INJECTION_VERBS):
        return None
    found = INJECTION.search(text)
    return found.group(0) if found else None


class LeftOut(BaseModel):
    """An accepted flag whose correction did not become a training row, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flag_id: str
    decision_id: str | None = None
    reason: LeftOutReason
    detail: str


class MergeReport(BaseModel):
    """What the merge read, what it wrote, and every accepted correction it left out (merge_report.json).

    ``accepted - rows_out == len(left_out)``: each accepted flag is either a row or explained.
    """

    model_config = ConfigDict(extra="forbid")

    flag_lines: int = Field(0, description="flag records read (every revision)")
    flags: int = Field(0, description="distinct flags (their latest revisions)")
    decisions: int = Field(0, description="review decisions read")
    decided: int = Field(0, description="flags with at least one decision")
    accepted: int = Field(0, description="flags whose latest decision accepts: the rows in")
    rejected_by_reviewer: int = Field(0, description="flags whose latest decision rejects")
    rows_out: int = Field(0, description="correction rows written (train + held-out)")
    counts: dict[str, int] = Field(default_factory=dict, description="rows per output file")
    left_out: list[LeftOut] = Field(default_factory=list)
    left_out_by_reason: dict[str, int] = Field(default_factory=dict)
    bad_lines: list[str] = Field(default_factory=list, description="shard lines that were not records")
    notes: list[str] = Field(default_factory=list, description="things worth knowing about this run's data")

    def leave_out(self, decision: ReviewDecision, reason: LeftOutReason, detail: str) -> None:
        self.left_out.append(LeftOut(flag_id=decision.flag_id, decision_id=decision.decision_id,
                                     reason=reason, detail=detail))
        self.left_out_by_reason[reason] = self.left_out_by_reason.get(reason, 0) + 1

    def note(self, text: str) -> None:
        log.warning("merge: %s", text)
        self.notes.append(text)


# --- keys -----------------------------------------------------------------------------------------
# A row's key is the sha256 of the canonical JSON of {"completion": [...], "prompt": [...]}: orjson,
# keys sorted, no spaces, UTF-8, each message {"content": ..., "role": ...}. The parts are built
# separately so that a prompt shared by several rows is serialised once.
def canonical(msgs: Iterable[ChatMessage]) -> bytes:
    """The canonical JSON of a message list."""
    # Copied to its own size: orjson's result keeps a 4 KiB buffer, and a merge keeps one per accepted
    # prompt (56k of them from 100k flags: 230 MiB, most of it never read).
    return bytes(memoryview(orjson.dumps([{"content": m.content, "role": m.role} for m in msgs])))


def key_of(prompt_json: bytes, completion_json: bytes) -> str:
    """``row_key`` from the canonical JSON of the prompt and of the completion."""
    return hashlib.sha256(b'{"completion":' + completion_json + b',"prompt":' + prompt_json + b"}").hexdigest()


def row_key(prompt: Iterable[ChatMessage], completion: Iterable[ChatMessage]) -> str:
    """sha256 of the canonical JSON of prompt + completion: equal keys, equal rows."""
    return key_of(canonical(prompt), canonical(completion))


# --- accepted corrections -> rows -----------------------------------------------------------------
def latest_decisions(decisions: Iterable[ReviewDecision]) -> dict[str, tuple[int, ReviewDecision]]:
    """The latest decision of each flag with its read position (later created_at wins; ties: read last)."""
    latest: dict[str, tuple[int, ReviewDecision]] = {}
    for i, d in enumerate(decisions):
        cur = latest.get(d.flag_id)
        if cur is None or newer(d, cur[1]):
            latest[d.flag_id] = (i, d)
    return latest


def accepted_corrections(
    flags: Iterable[FlagRecord] | Mapping[str, FlagRecord],
    decisions: Iterable[ReviewDecision] | Mapping[str, tuple[int, ReviewDecision]],
    report: MergeReport | None = None,
) -> list[Accepted]:
    """Flags whose latest decision accepts, each with the correction to learn, in the order read.

    The correction is the decision's edited one, else the flag's own (its latest revision). A
    decision taken on an older revision of the flag no longer counts, as on the review page: the
    flag changed since, so it is pending again. Accepted flags without any correction, with a stale
    decision, or missing from the flags are left out and reported.
    """
    report = report if report is not None else MergeReport()
    # Mappings are taken to be the latest ones already: flag_id -> latest revision (as latest_flags()
    # returns), flag_id -> (read position, latest decision) (as latest_decisions() returns).
    latest_flags = flags if isinstance(flags, Mapping) else latest_revisions(flags)
    latest = decisions if isinstance(decisions, Mapping) else latest_decisions(decisions)
    accepts = [(order, d) for order, d in latest.values() if d.action == "accept"]
    report.flags, report.decided = len(latest_flags), len(latest)
    report.accepted, report.rejected_by_reviewer = len(accepts), len(latest) - len(accepts)
    out = []
    for order, d in accepts:
        flag = latest_flags.get(d.flag_id)
        if flag is None:
            report.leave_out(d, "unknown_flag", "the decision's flag is in no flag shard read (not synced yet?)")
        elif d.flag_record_id != flag.record_id:
            report.leave_out(d, "stale_decision", f"accepted flag record {d.flag_record_id}, but the flag was saved "
                                                  f"again since (now revision {flag.revision}): review it again")
        elif d.correction is None and flag.correction is None:
            report.leave_out(d, "no_correction", "accepted, but neither the flag nor the decision has a correction")
        else:
            out.append(Accepted(flag, d, d.correction if d.correction is not None else flag.correction, order))
    return out


def prompt_of(flag: FlagRecord) -> list[ChatMessage]:
    """What the model saw before its answer: the system prompt (if any), then the turns before it."""
    system = [_system_message(flag.system_prompt)] if flag.system_prompt else []
    return system + list(flag.conversation[:-1])


@lru_cache(maxsize=64)
def _system_message(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)  # a handful of system prompts across 100k flags


def _assistant(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="assistant", content=text)]


def sft_row(a: Accepted) -> SFTRow:
    """The SFT row of an accepted correction: prompt = what the model saw, completion = the correction."""
    return SFTRow(prompt=a.prompt, completion=a.completion, meta=a.meta)


def check_correction(a: Accepted, cfg: MergeConfig) -> tuple[LeftOutReason, str] | None:
    """Why this correction cannot be a training row, or None when it can."""
    text = a.correction.strip()
    if not text:
        return "empty", f"the correction is empty or only whitespace ({a.correction!r})"
    if len(text) > cfg.max_correction_chars:
        return "too_long", (f"the correction has {len(text)} characters, more than retrain.merge.max_correction_chars="
                            f"{cfg.max_correction_chars}; shorten it in a new review decision, or raise the limit")
    if tokens := control_tokens(text):
        return "control_tokens", (f"the correction holds chat-template control tokens ({', '.join(tokens)}): in a "
                                  "training row they would end the answer and forge a new turn; remove them in a new "
                                  "review decision")
    if words := injection(text):
        return "injection", (f"the correction reads as an instruction to the model ({words!r}), not an answer: "
                             "training on it would teach the model to repeat a prompt injection; if the answer is "
                             "meant, reword it in a new review decision")
    if text == a.flag.answer.strip():
        return "same_as_answer", "the correction is the model's own answer: nothing to learn"
    return None


def correction_rows(accepted: list[Accepted], cfg: MergeConfig, report: MergeReport) -> list[tuple[Accepted, SFTRow]]:
    """One SFT row per usable correction; per prompt, the latest decision's correction wins.

    A second accepted correction of the same prompt is a duplicate when it says the same thing,
    else a conflict; either way it is left out and reported. Returned in the order of ``accepted``.
    """
    winners: dict[bytes, tuple[Accepted, SFTRow]] = {}
    for a in accepted:
        why = check_correction(a, cfg)
        if why is not None:
            report.leave_out(a.decision, *why)
            continue
        row = sft_row(a)
        won = winners.get(a.prompt_json)
        if won is None:
            winners[a.prompt_json] = (a, row)
            continue
        if a.rank > won[0].rank:
            winners[a.prompt_json] = (a, row)
            (a, row), won = won, (a, row)  # report the one that lost
        if won[1].meta.key == row.meta.key:
            report.leave_out(a.decision, "duplicate", f"the same prompt and correction as flag {won[0].flag.flag_id}")
        else:
            report.leave_out(a.decision, "conflict", f"the same prompt was corrected differently in flag "
                                                     f"{won[0].flag.flag_id}, whose decision is later and wins")
    return list(winners.values())


def heldout_share(key: str, salt: str) -> float:
    """A row's fixed place in [0, 1): held out when below the held-out fraction."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(rows: list[SFTRow], fraction: float, salt: str) -> tuple[list[SFTRow], list[SFTRow]]:
    """(train, held-out) by a salted hash of each row's key: a row's split depends on that row alone,
    so it never changes when other rows come or go, and a row trained on never turns held-out later."""
    train, heldout = [], []
    for row in rows:
        if heldout_share(row.meta.key, salt) < fraction:
            heldout.append(row.model_copy(update={"meta": row.meta.model_copy(update={"split": "heldout"})}))
        else:
            train.append(row)
    return train, heldout


def preference_rows(accepted: Iterable[Accepted]) -> list[PreferenceRow]:
    """DPO pairs: chosen = the accepted correction, rejected = the model's original answer."""
    return [PreferenceRow(prompt=a.prompt, chosen=a.completion, rejected=a.flag.conversation[-1:], meta=a.meta)
            for a in accepted]


def kto_rows(flags: Iterable[FlagRecord], accepted: Iterable[Accepted],
             exclude_prompts: Set[bytes] = frozenset()) -> list[KTORow]:
    """KTO examples: a thumbs up labels the answer desirable, a thumbs down undesirable, and an
    accepted correction is desirable. Exact repeats (same prompt, answer and label) appear once;
    prompts whose canonical JSON is in ``exclude_prompts`` (the held-out ones) not at all."""
    accepted = list(accepted)
    by_flag = {a.flag.flag_id: a for a in accepted}  # their prompts are serialised already
    rows, seen = [], set()

    def add(prompt, prompt_json, completion, label, meta):
        if prompt_json in exclude_prompts or (meta.key, label) in seen:
            return
        seen.add((meta.key, label))
        rows.append(KTORow(prompt=prompt, completion=completion, label=label, meta=meta))

    for flag in flags:
        if flag.thumbs is None:
            continue
        answer = flag.conversation[-1:]
        if not answer[0].content.strip():
            continue
        a = by_flag.get(flag.flag_id)
        if a is not None:
            prompt, prompt_json = a.prompt, a.prompt_json
        else:
            prompt = prompt_of(flag)
            prompt_json = canonical(prompt)
        # Checked here, before the row is built: 3 of 4 flags carry thumbs.
        if prompt_json in exclude_prompts:
            continue
        key, label = key_of(prompt_json, canonical(answer)), flag.thumbs == "up"
        if (key, label) not in seen:
            seen.add((key, label))
            # meta as a dict: validated with the row, in one call
            rows.append(KTORow(prompt=prompt, completion=answer, label=label,
                               meta={"source": "thumbs", "flag_id": flag.flag_id, "key": key}))
    for a in accepted:
        add(a.prompt, a.prompt_json, a.completion, True, a.meta)
    return rows


@dataclass
class MergedRows:
    """Everything the merge writes, before replay is added."""

    train: list[SFTRow]
    heldout: list[SFTRow]
    preference: list[PreferenceRow]
    kto: list[KTORow]
    flag_ids: list[str]


def merge_rows(flags: list[FlagRecord], decisions: list[ReviewDecision], cfg: MergeConfig,
               report: MergeReport) -> MergedRows:
    """All rows from the records read (pure): corrections split train/held-out, preference and KTO rows.

    Preference and KTO rows only come from the train side: a held-out prompt must stay unseen
    in whatever the train stage trains on.
    """
    report.flag_lines, report.decisions = len(flags), len(decisions)
    latest_flags = latest_revisions(flags)
    latest = latest_decisions(decisions)
    accepted = accepted_corrections(latest_flags, latest, report)
    kept = correction_rows(accepted, cfg, report)
    train, heldout = split_heldout([row for _, row in kept], cfg.heldout_fraction, cfg.split_salt)
    report.rows_out = len(train) + len(heldout)
    held_keys = {row.meta.key for row in heldout}
    train_accepted = [a for a, row in kept if row.meta.key not in held_keys]
    held_prompts = {a.prompt_json for a, row in kept if row.meta.key in held_keys}
    # A flag the reviewers rejected is not trusted for its thumbs either (it may be noise or abuse);
    # a held-out prompt stays out of every file the train stage may read.
    rejected = {fid for fid, (_, d) in latest.items() if d.action == "reject"}
    thumbs_flags = [f for f in latest_flags.values() if f.flag_id not in rejected]
    kto = kto_rows(thumbs_flags, train_accepted, exclude_prompts=held_prompts)
    if cfg.heldout_fraction > 0 and train and not heldout:
        report.note(f"no held-out row among {len(train)} corrections (heldout_fraction={cfg.heldout_fraction}): "
                    "the gate has nothing to measure learning on until more corrections are accepted")
    return MergedRows(train, heldout, preference_rows(train_accepted), kto,
                      sorted(a.flag.flag_id for a, _ in kept))


# --- replay ---------------------------------------------------------------------------------------
def replay_count(ratio: float, train_rows: int) -> int:
    """How many replay rows go with ``train_rows`` correction rows: at least one when the ratio is > 0."""
    if ratio <= 0 or train_rows <= 0:
        return 0
    return max(1, round(ratio * train_rows))


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def replay_row_from_example(example: Mapping, system_prompt: str) -> SFTRow | None:
    """An SFT replay row from a chat dataset example (FineTome-style ``conversations`` of from/value,
    or ``messages`` of role/content); None when it is not a conversation ending in an answer."""
    turns = example.get("messages") or example.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    msgs = []
    for t in turns:
        if not isinstance(t, Mapping):
            return None
        role = _ROLES.get(t.get("role") or t.get("from"))
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        try:
            msgs.append(ChatMessage(role=role, content=content))
        except ValidationError:  # text that is not valid UTF-8: skip the example
            return None
    if msgs[-1].role != "assistant" or msgs[-2].role == "assistant":
        return None
    prompt, completion = msgs[:-1], msgs[-1:]
    if system_prompt and prompt[0].role != "system":  # answer under the system prompt the app serves with
        prompt = [ChatMessage(role="system", content=system_prompt)] + prompt
    return SFTRow(prompt=prompt, completion=completion, meta=RowMeta(source="replay", key=row_key(prompt, completion)))


def dataset_replay(name: str, n: int, system_prompt: str, seed: int = 0) -> list[SFTRow]:
    """``n`` replay rows from the Hub chat dataset ``name`` (or a local dataset folder), shuffled with ``seed``."""
    import datasets

    rows: list[SFTRow] = []
    # Offline, no such repo, no access, a download cut short: any of them ends the merge, clearly.
    try:
        examples = iter(datasets.load_dataset(name, split="train", streaming=True).shuffle(seed=seed, buffer_size=10_000))
        while len(rows) < n and (example := next(examples, None)) is not None:
            row = replay_row_from_example(example, system_prompt)
            if row is not None:
                rows.append(row)
    except Exception as err:
        raise MergeError(
            f"cannot read the replay dataset {name!r} ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
            "it needs the Hub (or a local dataset folder): offline, set retrain.merge.replay_source to 'self' or 'none'"
        ) from err
    if len(rows) < n:
        log.warning("replay dataset %s gave %d usable rows of the %d asked for", name, len(rows), n)
    return rows


def replay_rows(settings: Settings, base: BaseModelRef, n: int, replay_fn: ReplayFn | None,
                near: Sequence[str] = ()) -> list[SFTRow]:
    """``n`` replay rows (or fewer) from the configured source; ``replay_fn``, given ``n`` prompts,
    replaces self/dataset."""
    cfg = settings.retrain.merge
    if n == 0 or cfg.replay_source == "none":
        return []
    n_near = round(n * cfg.replay_near_share)
    if replay_fn is not None:
        return replay_fn(replay_prompts(n, cfg.split_salt, near=near, n_near=n_near))
    if cfg.replay_source == "dataset":
        if not cfg.replay_dataset:
            raise MergeError("retrain.merge.replay_source is 'dataset' but replay_dataset is not set: "
                             "name a Hub chat dataset (e.g. mlabonne/FineTome-100k), or use replay_source 'self'")
        return dataset_replay(cfg.replay_dataset, n, settings.system_prompt)
    # The KL replay loss takes answers cut off at replay_max_new_tokens; for cross-entropy they are
    # dropped and the next (spare) prompt asked instead.
    keep_cut = settings.retrain.train.replay_loss == "kl"
    prompts = replay_prompts(n if keep_cut else 2 * n, cfg.split_salt, near=near, n_near=n_near)
    return self_replay(Path(base.path), prompts, settings.system_prompt, cfg.replay_max_new_tokens,
                       settings.n_threads, limit=n, keep_cut=keep_cut)


def _asked(row) -> str:
    return next((m.content.strip().casefold() for m in reversed(row.prompt) if m.role == "user"), "")


def without_corrected_prompts(replay: list[SFTRow], corrections: list[SFTRow], report: MergeReport) -> list[SFTRow]:
    """Replay rows minus those asking what a correction answers: the old answer would fight the new one."""
    if not replay:  # no replay: skip building the set of every corrected question
        return replay
    asked = {_asked(r) for r in corrections}
    kept = [r for r in replay if _asked(r) not in asked]
    if len(kept) < len(replay):
        report.note(f"{len(replay) - len(kept)} replay rows left out: their question was also corrected")
    return kept


# --- files ----------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_pinned(paths: list[Path], model: type[BaseModel], root: Path, records: list, bad: list[BadLine]) -> list[InputFile]:
    """Parse each shard into ``records``, pinning the very bytes parsed (a writer may be appending)."""
    pinned = []
    for path in tqdm(paths, desc=f"reading {model.__name__}", unit="shard", disable=len(paths) < 8):
        data = path.read_bytes()
        pinned.append(InputFile(path=path.relative_to(root).as_posix(), sha256=sha256_bytes(data), bytes=len(data)))
        parse_jsonl(data, str(path), model, records, bad)
    return pinned


def jsonl_chunks(rows: Sequence[BaseModel], per_chunk: int = 1024) -> Iterator[bytes]:
    """The JSONL of ``rows``, ``per_chunk`` rows at a time, each line ending with a newline.

    In chunks: the 100k rows of a large merge held as one list of lines, then joined, cost 0.3 s
    more in page faults and copies than writing each chunk as it is made."""
    for i in range(0, len(rows), per_chunk):
        lines = [row.__pydantic_serializer__.to_json(row) for row in rows[i : i + per_chunk]]
        lines.append(b"")  # so that the last row ends with a newline too
        yield b"\n".join(lines)


def write_output(run_dir: Path, rel: str, rows: Sequence[BaseModel]) -> InputFile:
    """Write ``rows`` as the run's JSONL file ``rel``; its sha256 and size are taken as it is written."""
    digest, size = hashlib.sha256(), 0

    def hashed(chunks: Iterable[bytes]) -> Iterator[bytes]:
        nonlocal size
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    write_atomic(run_dir / rel, hashed(jsonl_chunks(rows)))
    return InputFile(path=rel, sha256=digest.hexdigest(), bytes=size)


def base_of(settings: Settings) -> BaseModelRef:
    """The configured serving GGUF (local path, Hub file, or the embedded model), pinned by sha256.

    Not a registry version: every version is the configured base plus a LoRA trained on all the
    accepted corrections so far, so quantization error never compounds from version to version.
    """
    from retrain.gguf_file import quant_name
    from space.model import ModelError, check_gguf, resolve_model, sha256_of

    file = resolve_model(settings)
    check_gguf(file.path)
    return BaseModelRef(path=str(file.path), sha256=sha256_of(file.path), quant=quant_name(file.path, ModelError))


def run_merge(
    settings: Settings,
    run_dir: Path,
    replay_fn: ReplayFn | None = None,
    dataset_revision: str | None = None,
    base: BaseModelRef | None = None,
) -> RunManifest:
    """Read the feedback folder, write the run's data files, merge_report.json and (last) manifest.json.

    ``replay_fn(prompts) -> rows`` replaces the configured replay source (tests, other models);
    ``base`` the configured serving GGUF. Raises MergeError, after writing merge_report.json, when
    fewer than ``retrain.merge.min_corrections`` corrections are usable or none is left to train on.
    """
    # Millions of small objects without cycles: the collector rescanning them as they pile up
    # costs more than the merge itself (see gc_paused). It comes back on only after _merge has
    # returned and its records are freed, so that its first full pass finds nothing big to scan.
    with gc_paused():
        return _merge(settings, Path(run_dir), replay_fn, dataset_revision, base)


def _merge(settings: Settings, run_dir: Path, replay_fn: ReplayFn | None, dataset_revision: str | None,
           base: BaseModelRef | None) -> RunManifest:
    cfg = settings.retrain.merge
    feedback = Path(settings.feedback_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # From here until the new manifest is written, the folder holds no finished merge.
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)

    flags: list[FlagRecord] = []
    decisions: list[ReviewDecision] = []
    bad: list[BadLine] = []
    t0 = time.perf_counter()
    pinned = read_pinned(shard_paths(feedback), FlagRecord, feedback, flags, bad)
    pinned += read_pinned(review_shard_paths(feedback), ReviewDecision, feedback, decisions, bad)
    t_read = time.perf_counter() - t0
    report = MergeReport(bad_lines=[str(b) for b in bad])
    rows = merge_rows(flags, decisions, cfg, report)
    t_rows = time.perf_counter() - t0 - t_read

    usable = len(rows.train) + len(rows.heldout)
    problem = None
    if usable < cfg.min_corrections:
        problem = (f"{usable} usable accepted corrections in {feedback} ({report.flags} flags, {report.accepted} "
                   f"accepted, {len(report.left_out)} left out), fewer than retrain.merge.min_corrections="
                   f"{cfg.min_corrections}: accept more corrections on the review page, or lower min_corrections")
    elif not rows.train:
        problem = (f"all {usable} usable corrections fell in the held-out split (heldout_fraction="
                   f"{cfg.heldout_fraction}): nothing to train on; accept more corrections, or lower heldout_fraction")
    if problem is not None:
        write_atomic(run_dir / REPORT_FILE, report.model_dump_json(indent=2).encode())
        raise MergeError(f"{problem} (details: {run_dir / REPORT_FILE})")

    base = base or base_of(settings)
    wanted = replay_count(cfg.replay_ratio, len(rows.train)) if cfg.replay_source != "none" else 0
    # Replay prompts near the trained corrections (not the held-out ones: they stay unseen in every choice).
    near = [row.prompt[-1].content for row in rows.train]
    replay = without_corrected_prompts(replay_rows(settings, base, wanted, replay_fn, near), rows.train + rows.heldout,
                                       report)
    if len(replay) < wanted:
        report.note(f"{len(replay)} replay rows for the {wanted} wanted (replay_ratio={cfg.replay_ratio} x "
                    f"{len(rows.train)} train rows): the source had fewer usable answers")

    files = {"train": rows.train, "heldout": rows.heldout, "replay": replay,
             "preference": rows.preference, "kto": rows.kto}
    t1 = time.perf_counter()
    outputs = [write_output(run_dir, DATA_FILES[name], items) for name, items in files.items()]
    report.counts = {name: len(items) for name, items in files.items()}
    write_atomic(run_dir / REPORT_FILE, report.model_dump_json(indent=2).encode())

    manifest = RunManifest(
        run_id=run_dir.name,
        base=base,
        feedback_files=pinned,
        dataset_repo=settings.dataset_repo,
        dataset_revision=dataset_revision,
        flag_ids=rows.flag_ids,
        counts={"flags": report.flags, "decisions": report.decisions, "accepted": report.accepted,
                "left_out": len(report.left_out), **report.counts},
        outputs=outputs,
        settings=settings.retrain,
    )
    write_atomic(run_dir / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
    log.info("merge %s: %d train + %d held-out corrections, %d replay, %d preference, %d KTO rows; %d accepted "
             "flags left out (%s); read %.2f s, rows %.2f s, write %.2f s", run_dir.name, len(rows.train),
             len(rows.heldout), len(replay), len(rows.preference), len(rows.kto), len(report.left_out),
             report.left_out_by_reason or "none", t_read, t_rows, time.perf_counter() - t1)
    return manifest
