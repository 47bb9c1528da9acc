"""The synthetic phantom generator as a source: `cxrfm train` builds these shards from nothing.

scan() plans every study (patients, dates, splits, priors) without drawing pixels; a shard's studies are
then generated together with `generate_phantoms(only=...)`, which gives the same bytes as one full run,
so the shards are identical however many workers build them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrfm.data.schema import Study
from cxrfm.data.sources.base import BuildReport, StudyRecord
from cxrfm.data.sources.base import Converter as BaseConverter
from cxrfm.data.synthetic import LICENSE, SOURCE, generate_phantoms, plan_studies


class Converter(BaseConverter):
    name = SOURCE
    license = LICENSE

    def scan(self, root: Path | None, report: BuildReport) -> list[StudyRecord]:
        cfg = self.cfg
        plans = plan_studies(cfg.num_studies, cfg.seed)
        report.note("synthetic_studies_planned", len(plans))
        by_index = {p.index: p for p in plans}
        return [
            StudyRecord(
                study_id=p.study_id, patient_id=p.patient_id, split=p.split, payload={"index": p.index},
                study_date=p.date,
                prior_study_id=by_index[p.previous_index].study_id if p.with_prior else None,
            )
            for p in plans
        ]

    def load_batch(self, records: list[StudyRecord], report: BuildReport) -> Iterator[tuple[Study, dict[str, np.ndarray]]]:
        wanted = {r.payload["index"] for r in records}
        cfg = self.cfg
        for phantom in generate_phantoms(cfg.num_studies, cfg.image_size, cfg.seed, only=wanted):
            yield phantom.study, phantom.images

    def load(self, record: StudyRecord, report: BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        return next(iter(self.load_batch([record], report)), None)
