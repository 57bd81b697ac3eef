"""Schedule files: announcements played on a cron expression or an interval (docs/usage.md).

YAML rather than TOML because PyYAML keeps every node's line, so each problem is reported at
its line and field before anything runs. Each fire's job id comes from the announcement's name
and fire slot, so a slot fired twice (two beat instances) is one job, played once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from celery.schedules import crontab, schedstate
from croniter import croniter

from avatarq.jobs import Job, job_errors

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ANNOUNCEMENT_KEYS = {"name", "cron", "every", "timezone", "job"}
CRON_FIELDS = " (minute hour day-of-month month day-of-week)"
#: Shortest interval: beat's own loop cannot keep a finer cadence reliably.
MIN_EVERY_S = 1.0


@dataclass(frozen=True)
class Problem:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


class ScheduleError(ValueError):
    """The schedule file is invalid; `problems` lists every one, with its line and field."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}:{p}" for p in problems))


class ZonedCron(crontab):  # type: ignore[misc]
    """A cron expression evaluated in its own IANA timezone (DST-aware, via croniter).

    Subclasses celery's crontab so celery-redbeat can store its fields in Redis; the beat app
    swaps in this object (with its timezone) when it loads an entry back.
    """

    def __init__(self, expr: str, zone: ZoneInfo) -> None:
        minute, hour, day_of_month, month_of_year, day_of_week = expr.split()
        super().__init__(minute, hour, day_of_week, day_of_month, month_of_year)
        self.expr = expr
        self.zone = zone

    def next_after(self, moment: datetime) -> datetime:
        return croniter(self.expr, _aware(moment).astimezone(self.zone)).get_next(datetime)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        return self.next_after(last_run_at) - datetime.now(UTC)

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = datetime.now(UTC)
        due = self.next_after(last_run_at)
        if due <= now:
            return schedstate(True, (self.next_after(now) - now).total_seconds())
        return schedstate(False, (due - now).total_seconds())


@dataclass(frozen=True)
class Announcement:
    name: str
    template: dict[str, Any]
    zone: ZoneInfo
    cron: str | None = None
    every: float | None = None
    line: int = 0

    def next_fires(self, count: int, after: datetime | None = None) -> list[datetime]:
        """The next `count` fire times after `after` (default now), in the schedule's zone."""
        start = _aware(after or datetime.now(UTC)).astimezone(self.zone)
        if self.cron is not None:
            it = croniter(self.cron, start)
            return [it.get_next(datetime) for _ in range(count)]
        assert self.every is not None
        first = self.slot(start) + timedelta(seconds=self.every)
        return [
            (first + timedelta(seconds=self.every * i)).astimezone(self.zone) for i in range(count)
        ]

    def slot(self, moment: datetime) -> datetime:
        """The fire slot `moment` falls in: the latest cron time ≤ moment, or the interval
        boundary (aligned on the epoch) ≤ moment. Deterministic, so two schedulers firing
        the same slot derive the same job id."""
        moment = _aware(moment)
        if self.cron is not None:
            # croniter's get_prev is strictly before its start, and it counts whole seconds:
            # start at the second after `moment`'s own (a fire late by less than a second
            # before the next slot is still its own slot's).
            start = moment.astimezone(self.zone).replace(microsecond=0) + timedelta(seconds=1)
            return croniter(self.cron, start).get_prev(datetime)
        assert self.every is not None
        epoch = moment.timestamp()
        return datetime.fromtimestamp(epoch - epoch % self.every, UTC)

    def job_at(self, moment: datetime) -> Job:
        """The job this announcement enqueues for the slot `moment` falls in."""
        stamp = self.slot(moment).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Job.model_validate({**self.template, "job_id": f"{self.name}-{stamp}"})

    def celery_schedule(self) -> crontab | timedelta:
        if self.cron is not None:
            return ZonedCron(self.cron, self.zone)
        assert self.every is not None
        return timedelta(seconds=self.every)


@dataclass
class _Parser:
    path: str
    problems: list[Problem] = field(default_factory=list)

    def problem(self, node: yaml.Node, where: str, message: str) -> None:
        self.problems.append(Problem(node.start_mark.line + 1, where, message))

    def zone(self, node: yaml.Node | None, where: str, default: ZoneInfo) -> ZoneInfo | None:
        if node is None:
            return default
        name = node.value if isinstance(node, yaml.ScalarNode) else None
        try:
            return ZoneInfo(str(name))
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(node, where, f"unknown timezone {name!r} (use an IANA name)")
            return None

    def announcement(
        self, node: yaml.Node, index: int, default_zone: ZoneInfo, seen: dict[str, int]
    ) -> Announcement | None:
        at = f"announcements[{index}]"
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, at, "must be a mapping")
            return None
        keys = {k.value: (k, v) for k, v in node.value}
        before = len(self.problems)
        for key, (knode, _v) in keys.items():
            if key not in ANNOUNCEMENT_KEYS:
                self.problem(knode, f"{at}.{key}", f"unknown key (use {sorted(ANNOUNCEMENT_KEYS)})")
        name = self._name(node, keys, at, seen)
        zone = self.zone(keys.get("timezone", (None, None))[1], f"{at}.timezone", default_zone)
        cron, every = self._when(node, keys, at)
        template = self._template(node, keys, at)
        if len(self.problems) > before or name is None or zone is None or template is None:
            return None
        return Announcement(name, template, zone, cron, every, node.start_mark.line + 1)

    def _name(
        self, node: yaml.Node, keys: dict[str, Any], at: str, seen: dict[str, int]
    ) -> str | None:
        if "name" not in keys:
            self.problem(node, f"{at}.name", "required")
            return None
        vnode = keys["name"][1]
        name = str(vnode.value)
        if not isinstance(vnode, yaml.ScalarNode) or not NAME_PATTERN.match(name):
            self.problem(vnode, f"{at}.name", "must be 1-64 letters, digits, '_', '.', '-'")
            return None
        if name in seen:
            self.problem(vnode, f"{at}.name", f"duplicate of the announcement at line {seen[name]}")
            return None
        seen[name] = vnode.start_mark.line + 1
        return name

    def _when(
        self, node: yaml.Node, keys: dict[str, Any], at: str
    ) -> tuple[str | None, float | None]:
        if ("cron" in keys) == ("every" in keys):
            self.problem(node, at, "needs exactly one of `cron` or `every`")
            return None, None
        if "cron" in keys:
            vnode = keys["cron"][1]
            expr = str(vnode.value)
            if len(expr.split()) != 5 or not croniter.is_valid(expr):
                self.problem(vnode, f"{at}.cron", f"invalid cron expression {expr!r}{CRON_FIELDS}")
                return None, None
            try:
                ZonedCron(expr, ZoneInfo("UTC"))
            except ValueError as e:  # croniter accepts a few forms celery cannot store
                self.problem(vnode, f"{at}.cron", f"unsupported cron expression {expr!r}: {e}")
                return None, None
            return expr, None
        vnode = keys["every"][1]
        try:
            every = float(vnode.value)
        except (TypeError, ValueError):
            every = 0.0
        if every < MIN_EVERY_S:
            self.problem(vnode, f"{at}.every", f"must be seconds ≥ {MIN_EVERY_S:g}")
            return None, None
        return None, every

    def _template(self, node: yaml.Node, keys: dict[str, Any], at: str) -> dict[str, Any] | None:
        if "job" not in keys:
            self.problem(node, f"{at}.job", "required (room, avatar_id, source, …)")
            return None
        jkey, jnode = keys["job"]
        template = yaml.safe_load(yaml.serialize(jnode))
        if not isinstance(template, dict):
            self.problem(jnode, f"{at}.job", "must be a mapping of job fields")
            return None
        lines = {k.value: k for k, _v in jnode.value}
        if "job_id" in template:
            self.problem(lines["job_id"], f"{at}.job.job_id", "set per fire; leave it out")
            return None
        # A placeholder id: each fire derives its own from the name and the fire time.
        for where, message in job_errors({**template, "job_id": "template"}):
            top = where.split(".")[0]
            self.problem(lines.get(top, jkey), f"{at}.job.{where}", message)
        return template


def load_schedule(path: str | Path) -> list[Announcement]:
    """Parse and validate a schedule file; raises ScheduleError listing every problem."""
    text = Path(path).read_text(encoding="utf-8")
    parser = _Parser(str(path))
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ScheduleError(str(path), [Problem(line, "yaml", str(e))]) from None
    if not isinstance(root, yaml.MappingNode):
        raise ScheduleError(str(path), [Problem(1, "file", "must be a mapping with announcements")])
    top = {k.value: (k, v) for k, v in root.value}
    for key, (knode, _v) in top.items():
        if key not in ("timezone", "announcements"):
            parser.problem(knode, key, "unknown key (use timezone, announcements)")
    default_zone = parser.zone(top.get("timezone", (None, None))[1], "timezone", ZoneInfo("UTC"))
    items = top.get("announcements", (None, None))[1]
    if not isinstance(items, yaml.SequenceNode) or not items.value:
        parser.problem(items or root, "announcements", "must be a non-empty list")
        raise ScheduleError(str(path), parser.problems)
    seen: dict[str, int] = {}
    announcements = [
        parser.announcement(node, i, default_zone or ZoneInfo("UTC"), seen)
        for i, node in enumerate(items.value)
    ]
    if parser.problems:
        raise ScheduleError(str(path), parser.problems)
    return [a for a in announcements if a is not None]


def _aware(moment: datetime) -> datetime:
    # Celery and redbeat hand over UTC datetimes, sometimes naive.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
