"""Live model health: `GET /admin/health` (the windows of a model against each version's reference),
and the gauges the service keeps from the same report (`loop_drift_*`, `loop_estimated_accuracy`,
`loop_judged_accuracy`) for alerting. The windows are folded by `loop ingest` (`feedback.health`)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated

import psycopg
from fastapi import APIRouter, Query
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from feedback import health as store
from models.health import Estimate
from service import metrics
from service.problems import documented
from service.routes.admin import Loop, Model
from service.routes.dependencies import Admin, Connection, GuardedRoute
from service.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/admin", tags=["admin"], route_class=GuardedRoute, responses=documented(400, 401, 403, 404, 422, 429, 503)
)


class EstimatePublic(BaseModel):
    value: float
    low: float = Field(description="95% interval")
    high: float


class ShiftPublic(BaseModel):
    kind: str = Field(description="labels, confidence or inputs")
    psi: float = Field(description="Population stability index against the reference (inputs: the largest feature's)")
    p_value: float = Field(description="Chi-square test of homogeneity with the reference (inputs: Bonferroni)")
    alarm: bool = Field(description="p_value below the level (LOOP_HEALTH_ALPHA)")
    worst: str | None = Field(None, description="For inputs: the feature that moved most")


class WindowPublic(BaseModel):
    start: datetime
    end: datetime
    model_version: str
    count: int
    labels: dict[str, int]
    shifts: list[ShiftPublic]
    alarms: list[str]
    estimated_accuracy: EstimatePublic | None = Field(description="From the confidences, calibrated on the reference")
    judged_accuracy: EstimatePublic | None = Field(description="Reviewers' settled labels of the window's items")
    judged: int
    disagree: bool = Field(description="The two accuracies' intervals do not overlap")


class ReferencePublic(BaseModel):
    validation_id: str = Field(description="The validation version, or `window:<since>/<until>` a team picked")
    samples: int
    accuracy: float | None = Field(description="On the (original) validation version; none for a window's")
    live_validation_id: str | None = Field(description="The model's live validation version, if it has one")
    live_samples: int | None
    live_accuracy: float | None = Field(description="On the live validation version, beside the original's")


class HealthPublic(BaseModel):
    model_name: str
    window_hours: int
    alpha: float
    references: dict[str, ReferencePublic] = Field(description="By model version: its run over the validation version")
    windows: list[WindowPublic]


def _estimate(found: Estimate | None) -> EstimatePublic | None:
    return None if found is None else EstimatePublic(value=found.value, low=found.low, high=found.high)


def public(report: store.Report) -> HealthPublic:
    return HealthPublic(
        model_name=report.model_name,
        window_hours=report.window_s // 3600,
        alpha=report.alpha,
        references={v: ReferencePublic(**r) for v, r in report.references.items()},
        windows=[
            WindowPublic(
                start=w.start,
                end=w.end,
                model_version=w.model_version,
                count=w.count,
                labels=w.labels,
                shifts=[ShiftPublic(**vars(s)) for s in w.shifts],
                alarms=w.alarms,
                estimated_accuracy=_estimate(w.estimated),
                judged_accuracy=_estimate(w.judged),
                judged=w.judged_count,
                disagree=w.disagree,
            )
            for w in report.windows
        ],
    )


def read(
    conn: psycopg.Connection, name: str, class_names: tuple[str, ...], *, window_hours: int, hours: int, alpha: float
) -> store.Report:
    now = datetime.now(UTC)
    since = now - timedelta(hours=hours)
    return store.report(
        conn,
        model_name=name,
        class_names=class_names,
        since=since,
        until=now,
        window_s=window_hours * 3600,
        alpha=alpha,
    )


@router.get("/health", response_model=HealthPublic)
def model_health(
    _: Admin,
    conn: Connection,
    loop: Loop,
    target: Model,
    window_hours: Annotated[int, Query(ge=1, le=24 * 7, description="Window size in hours.")] = 1,
    hours: Annotated[int, Query(ge=1, le=24 * 90, description="How far back.")] = 48,
) -> HealthPublic:
    """The model's health windows, oldest first: volume, labels, drift against each version's reference
    (its run over the validation version), the accuracy the confidences promise beside the judged one."""
    names = target.schema.class_names
    return public(read(conn, target.name, names, window_hours=window_hours, hours=hours, alpha=loop.health_alpha))


def set_gauges(report: store.Report) -> None:
    """The latest window of each version as gauges (labelled by the window's size in hours)."""
    latest = {w.model_version: w for w in report.windows}
    window = f"{report.window_s // 3600}h"
    for version, w in latest.items():
        labels = {"model_name": report.model_name, "model_version": version, "window": window}
        for shift in w.shifts:
            metrics.drift_score.labels(**labels, kind=shift.kind).set(shift.psi)
            metrics.drift_p_value.labels(**labels, kind=shift.kind).set(shift.p_value)
            metrics.drift_alarm.labels(**labels, kind=shift.kind).set(1 if shift.alarm else 0)
        if w.estimated is not None:
            metrics.estimated_accuracy.labels(**labels).set(w.estimated.value)
        if w.judged is not None:
            metrics.judged_accuracy.labels(**labels).set(w.judged.value)


async def keep_gauges(pool: ConnectionPool, loop: Loop, models: list[str], settings: Settings) -> None:
    """Refresh the health gauges of the served models every LOOP_HEALTH_INTERVAL_S, for each window
    size of LOOP_HEALTH_WINDOWS, from the stored windows."""

    def refresh() -> None:
        with pool.connection() as conn:
            for name in models:
                classes = loop.schema(name).class_names
                for hours in settings.health_window_hours:
                    found = read(conn, name, classes, window_hours=hours, hours=2 * hours, alpha=loop.health_alpha)
                    set_gauges(found)

    while True:
        try:
            await asyncio.to_thread(refresh)
        except Exception:  # the next round tries again
            logger.exception("could not refresh the health gauges")
        await asyncio.sleep(settings.health_interval_s)
