"""Video parts of a request: fetch the bytes, probe them within the limits, plan the frames and tokens.

The gateway does not decode a video: decoding and resizing the sampled frames is the heavy part of
its preprocessing, and it belongs to the encode stage, which scales apart from the gateway. What the
prompt needs is known without it: a probe (the container's header, the demuxed packet count, the
first frame; `common.video.probe_video`) gives the frame count, rate and upright size, from which the
checkpoint's sampling rule gives the grid and the `<|video_pad|>` count (`common.video_plan`). Every
limit is checked by the probe, so a video too long, too large, corrupt or empty is a 400 now, not an
encoder's error after routing. The bytes travel unchanged to the encoder with the settings planned
here; its features are cached under the bytes and those settings together.

Sources: `data:video/...;base64,` URIs, and local files (an absolute path or a `file://` URI) inside
the folders the operator allowed, as for images. Remote http(s) URLs are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.media import MediaError, media_url_bytes
from common.video import VideoLimits, probe_video
from common.video_plan import plan_video, settings_of, video_key
from common.video_sampling import VideoSampling
from gateway.backend import ImageInput
from gateway.errors import bad_request


class VideoLoader:
    def __init__(
        self, sampling: VideoSampling, limits: VideoLimits, allowed_dirs: Sequence[Path] = ()
    ) -> None:
        self.sampling = sampling
        self.settings = settings_of(sampling)
        self.limits = limits
        self.allowed_dirs = [Path(d).resolve() for d in allowed_dirs]

    def load(self, url: str, param: str) -> ImageInput:
        """The bytes, plan and cache key of the video at `url`; a 400 naming `param` when unusable."""
        try:
            data = self._fetch(url)
            probe = probe_video(data, limits=self.limits)
            plan = plan_video(probe, self.sampling)
        except (MediaError, ValueError) as exc:  # ValueError: num_frames above the video's, aspect ratio
            raise bad_request(f"{param}: {exc}", param=param) from None
        return ImageInput(
            hash=video_key(data, self.settings),
            data=data,
            width=probe.width,
            height=probe.height,
            grid_thw=plan.grid_thw,
            num_tokens=plan.num_tokens,
            kind="video",
            second_per_grid_t=plan.second_per_grid_t,
            video=self.settings,
            timestamps=plan.timestamps,
        )

    def _fetch(self, url: str) -> bytes:
        return media_url_bytes(
            url, kind="video", allowed_dirs=self.allowed_dirs, max_bytes=self.limits.max_bytes
        )
