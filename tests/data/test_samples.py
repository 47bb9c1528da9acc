"""Per-example targets built by cxrfm.data.samples."""

import numpy as np

from cxrfm.data.samples import VIEW_CLASSES, view_targets
from cxrfm.data.schema import ImageRef, Study


def test_view_targets_follow_each_shown_images_metadata():
    study = Study(study_id="s", patient_id="p", split="train", source="synthetic", images=[
        ImageRef(role="frontal", key="f.png", view="AP", width=8, height=8),
        ImageRef(role="lateral", key="l.png", view="LL", width=8, height=8)])
    got = view_targets(study, np.array([True, True, False]))
    assert got.tolist() == [VIEW_CLASSES.index("AP"), VIEW_CLASSES.index("LATERAL"), -1]
    # an image that is not shown (a generate row's target, or a dropped view) gets no target
    assert view_targets(study, np.array([False, True, False])).tolist() == [-1, VIEW_CLASSES.index("LATERAL"), -1]
