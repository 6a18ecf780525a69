"""torchcodec as a second video decoder (``vidshift extract --decoder torchcodec | torchcodec-cuda``).

torchcodec (the PyTorch project's decoder) links the system's FFmpeg 4-9 libraries at import, which decord does
not need (it bundles its own); ``make install`` installs them on Debian/Ubuntu (``libavcodec59`` ...) and
``problem()`` says what is missing elsewhere. ``torchcodec-cuda`` decodes on the GPU's NVDEC engine (frames are
then copied back to the host, so the FrameSource interface stays numpy; research/extraction.md §5: NVDEC frees
the CPU cores that software decoding would take, which is what bounds a GPU's throughput at 240p-360p).

On the test videos (H.264 and MPEG-4, 64x32 to 320x240) torchcodec 0.17 with FFmpeg 5.1 returns the same bytes as
decord 0.6 (tests/test_torchcodec.py), so the decoder is recorded (provenance ``software.decoder``, each video's
``decoder`` attribute) but not compared on resume: the two mix in one store.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .decode import DecodeError

FFMPEG_PACKAGES = "libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8"


def problem() -> str | None:
    """Why torchcodec cannot decode here (not installed, or its FFmpeg libraries are missing), or None."""
    try:
        import torchcodec.decoders  # noqa: F401 - loads libtorchcodec_core and the FFmpeg libraries it links
    except ImportError as error:
        return f"torchcodec is not installed ({error}); `pip install torchcodec -c constraints.txt`"
    except (RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"torchcodec cannot load the FFmpeg libraries it needs ({first_line}); install FFmpeg 4-9's "
                f"shared libraries, e.g. `apt-get install {FFMPEG_PACKAGES}` on Debian 12 (`make install` does it)")
    return None


def version() -> str:
    import torchcodec

    return f"torchcodec-{torchcodec.__version__}"


class TorchcodecSource:
    """A video file decoded by torchcodec with one FFmpeg thread (we parallelise across videos), on the CPU or,
    with ``device="cuda"``, on NVDEC. ``seek_mode="exact"`` scans the file once at open, so frame indices are
    exact (as decord's are)."""

    def __init__(self, path: Path, fps: float | None = None, device: str = "cpu"):
        del fps  # a video carries its own frame rate
        from torchcodec.decoders import VideoDecoder

        if path.stat().st_size == 0:
            raise DecodeError(f"{path}: the file is empty (0 bytes)")
        try:
            self._decoder = VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=1, device=device,
                                         seek_mode="exact")
        except (RuntimeError, ValueError) as error:
            raise DecodeError(f"{path}: FFmpeg cannot open it as a video ({error}); it is truncated, corrupt or "
                              f"not a video") from error
        metadata = self._decoder.metadata
        self.path = path
        self.num_frames = int(metadata.num_frames or 0)
        self.fps = float(metadata.average_fps or 0.0)
        self.backend = version() + ("-cuda" if device != "cpu" else "")

    def read(self, indices: np.ndarray) -> np.ndarray:
        try:
            frames = self._decoder.get_frames_at([int(i) for i in indices]).data
        except (RuntimeError, ValueError, IndexError) as error:
            raise DecodeError(f"{self.path}: decoding frames {indices[0]}..{indices[-1]} failed: {error}") from error
        return frames.cpu().numpy()  # iter_batches checks that every requested frame came back

    def close(self) -> None:
        self._decoder = None
