"""Workloads: one JSON request a line (see shared/workloads/README.md for what each field means).

`reply` and `audio_seconds` only matter with random weights, where they force the reply text and the end of speech
so that every request costs what it would cost with the real model. Outside bench because the server reads the
standard workload too: with random weights it scripts the replies to its prompts (engine/forcing.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from omnivox.errors import InvalidRequest

STANDARD_WORKLOAD = Path(__file__).parent / "workloads" / "standard.jsonl"
WARMUP_ID = "warmup"


@dataclass(frozen=True)
class WorkloadItem:
    id: str
    prompt: str  # the user's text
    reply: str  # forced reply text (dummy weights only)
    audio_seconds: float  # forced length of the spoken reply (dummy weights only)


def _field(obj: dict, name: str, kind: type, where: str):
    """Return obj[name] checked against kind; the error says where it is and what to write instead."""
    if name not in obj:
        raise InvalidRequest(f"{where}: missing field '{name}'; every line needs id, prompt, reply, audio_seconds")
    value = obj[name]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidRequest(f"{where}: field '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_line(text: str, where: str) -> WorkloadItem:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object a line"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where}: expected a JSON object, got {type(obj).__name__}")
    item_id = _field(obj, "id", str, where)
    prompt = _field(obj, "prompt", str, where)
    reply = _field(obj, "reply", str, where)
    seconds = float(_field(obj, "audio_seconds", float, where))
    if not item_id.strip():
        raise InvalidRequest(f"{where}: field 'id' is empty; give each request a short unique name")
    if not prompt.strip():
        raise InvalidRequest(f"{where}: field 'prompt' is empty; write the user's text")
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequest(f"{where}: field 'audio_seconds' must be a positive number of seconds, got {seconds}")
    return WorkloadItem(item_id, prompt, reply, seconds)


def load_workload(path: str | Path | None = None) -> list[WorkloadItem]:
    """Read a .jsonl workload (None: the packaged standard one; a bare name like "demo": a packaged one). Blank
    lines are skipped; ids must be unique because they name the output WAVs and the samples."""
    path = STANDARD_WORKLOAD if path is None else Path(path)
    if not path.exists() and path.suffix == "" and (STANDARD_WORKLOAD.parent / f"{path}.jsonl").exists():
        path = STANDARD_WORKLOAD.parent / f"{path}.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InvalidRequest(f"cannot read workload {path}: {e.strerror}; pass an existing .jsonl file") from e
    items: list[WorkloadItem] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}, line {number}"
        item = _parse_line(text, where)
        if item.id in seen:
            raise InvalidRequest(f"{where}: field 'id' repeats '{item.id}' from line {seen[item.id]}; ids must differ")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise InvalidRequest(f"workload {path} has no requests; write one JSON object a line") from None
    return items


def split_warmup(items: list[WorkloadItem]) -> tuple[WorkloadItem | None, list[WorkloadItem]]:
    """Separate the item with id "warmup" (run first, never measured) from the measured ones, order kept."""
    warmup = next((item for item in items if item.id == WARMUP_ID), None)
    return warmup, [item for item in items if item.id != WARMUP_ID]
