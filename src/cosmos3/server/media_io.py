"""`media_io_kwargs`, vLLM's per-request (and `--media-io-kwargs` server-wide) media reading options: the wire model
alone, so that the server's settings can hold one without importing the chat route."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class VideoIO(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fps: float | None = None
    num_frames: int | None = Field(None, description="-1: every frame (vLLM's server default)")


class MediaIO(BaseModel):
    model_config = ConfigDict(extra="forbid")
    video: VideoIO | None = None
