"""The layout a method sees for a video: temporal group of every token, images unchanged."""

import pytest
import torch

from vtprune.errors import VTPruneError
from vtprune.view import ImageLayout, Segment


def test_image_layout_is_not_a_video() -> None:
    layout = ImageLayout((Segment(2, 3),))
    assert not layout.is_video and layout.num_frames == 1 and layout.frames == ()
    assert torch.equal(layout.frame_index(), torch.zeros(6, dtype=torch.long))
    assert layout == ImageLayout((Segment(2, 3),))


def test_video_frame_index_and_tokens() -> None:
    layout = ImageLayout.video(Segment(2, 2), 3)
    assert layout.is_video and layout.num_frames == 3 and layout.size == 12
    assert layout.frame_index().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [t.tolist() for t in layout.frame_tokens()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [g.shape for _, g in layout.grid_tokens()] == [(2, 2)] * 3
    assert layout != ImageLayout((Segment(2, 2),) * 3)  # same tiling, but an image's


def test_video_token_outside_frames() -> None:
    """LLaVA-OneVision style: pooled frames, then one newline token that belongs to no frame."""
    layout = ImageLayout((Segment(1, 2), Segment(1, 2), Segment(1, 0, newline=True)), (0, 1, -1))
    assert layout.frame_index().tolist() == [0, 0, 1, 1, -1]
    assert layout.num_frames == 2


@pytest.mark.parametrize("frames", [(0,), (1, 2), (0, 2), (0, -2), (-1, -1)])
def test_bad_frames_refused(frames: tuple[int, ...]) -> None:
    with pytest.raises(VTPruneError, match="video layout frames"):
        ImageLayout((Segment(1, 1),) * 2, frames)
