"""The server's settings: passed to `create_app`, kept on the app's state, never global."""

from __future__ import annotations

import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from cosmos3.reasoning.scheduler import PREFILL_CHUNK
from cosmos3.server.limits import Limits
from cosmos3.server.media_io import MediaIO


@dataclass
class Settings:
    model_name: str = "cosmos3"  # the id clients send as `model` and see in /v1/models
    api_key: str | None = None
    max_queue: int = 16
    max_batch: int = 4  # queued text2image/text2video requests of one shape denoised together
    max_num_seqs: int = 64  # chat sequences decoded together (vLLM's name; cosmos3.reasoning.scheduler.MAX_SLOTS)
    max_num_batched_tokens: int = PREFILL_CHUNK  # prompt tokens prefilled per step beside the decoding (vLLM's name)
    allowed_local_media_path: Path | None = None  # local paths in requests must resolve under it; None: refused
    allow_private_urls: bool = False  # fetch media from loopback / private / link-local addresses
    # `--media-io-kwargs`: the video sampling a Reasoner request gets where its own media_io_kwargs leave a field
    # unset (chat.video_encode); None: the processor's own (fps 2)
    media_io_kwargs: MediaIO | None = None
    jobs_db: Path = Path("cosmos3-server/jobs.db")
    outputs_dir: Path = Path("cosmos3-server/outputs")
    retention_s: float = 24 * 3600.0
    retry_after_s: int = 30
    sync_timeout_s: float = 600.0  # the synchronous routes answer 504 (and cancel the job) after this
    fetch_timeout_s: float = 20.0  # total, per media URL
    abort_timeout_s: float = 2.0  # DELETE of a running job waits this long for it to stop, then answers 409
    shutdown_grace_s: float = 3.0  # on shutdown, wait this long for the running step before marking it interrupted
    graceful_shutdown_s: float = 2.0  # on shutdown, wait this long for open requests
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 300.0  # a request's whole body must arrive within this ...
    body_idle_timeout_s: float = 30.0  # ... with no pause longer than this
    keep_alive_s: float = 5.0
    limits: Limits = field(default_factory=Limits)
    # Shortcuts for the most used limits (`Settings(max_pixels=...)` sets `limits.max_pixels`).
    max_steps: InitVar[int | None] = None
    max_frames: InitVar[int | None] = None
    max_pixels: InitVar[int | None] = None
    max_tokens: InitVar[int | None] = None
    max_upload_bytes: InitVar[int | None] = None

    def __post_init__(self, max_steps, max_frames, max_pixels, max_tokens, max_upload_bytes) -> None:
        for name, value in locals().items():
            if name != "self" and value is not None:
                setattr(self.limits, name, value)

    def scrub(self, message: str) -> str:
        """An error message without the server's own paths (job folders hold uploads and fetched media)."""
        for root in {str(self.outputs_dir.resolve()), str(self.outputs_dir)}:
            message = re.sub(re.escape(root) + r"/[^\s'\"]*", "<request media>", message)
        return message
