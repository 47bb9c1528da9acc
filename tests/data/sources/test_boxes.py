from cxrfm.data.sources.base import BuildReport, StudyRecord
from cxrfm.data.sources.boxes import consensus_boxes, fit_box
from cxrfm.data.sources.splits import keep_patients_in_one_split


def test_fit_box_keeps_clips_or_drops_and_counts():
    report = BuildReport()
    inside = fit_box(1, 2, 10, 20, 32, 32, report, "a")
    assert (inside.x1, inside.y1, inside.x2, inside.y2) == (1, 2, 10, 20)
    clipped = fit_box(-5, 10, 40, 20, 32, 32, report, "b")
    assert (clipped.x1, clipped.y1, clipped.x2, clipped.y2) == (0, 10, 32, 20)
    assert fit_box(32, 0, 40, 5, 32, 32, report, "c") is None  # starts at the right edge: nothing inside
    assert fit_box(5, 5, 5, 9, 32, 32, report, "d") is None  # no width
    assert report.counts == {"box_degenerate": 1, "box_outside_image": 1}
    assert report.flagged == {"box_partly_outside_clipped": 1}


def test_consensus_links_overlapping_boxes_and_needs_enough_readers():
    marks = [("R1", (0, 0, 10, 10)), ("R2", (1, 1, 11, 11)), ("R3", (50, 50, 60, 60)),
             ("R1", (100, 100, 110, 110)), ("R1", (101, 101, 111, 111))]  # one reader twice is still one reader
    kept, dropped = consensus_boxes(marks, min_readers=2)
    assert kept == [(0.5, 0.5, 10.5, 10.5)] and dropped == 2
    kept, dropped = consensus_boxes(marks, min_readers=1)
    assert len(kept) == 3 and dropped == 0


def test_a_patient_in_several_splits_goes_to_the_most_held_out():
    records = [StudyRecord("s1", "p1", "train", {}), StudyRecord("s2", "p1", "val", {}),
               StudyRecord("s3", "p2", "train", {})]
    report = BuildReport()
    keep_patients_in_one_split(records, report)
    assert [r.split for r in records] == ["val", "val", "train"]
    assert report.flagged == {"patient_in_several_splits_moved": 1}
