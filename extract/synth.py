"""The built-in dataset: synthetic action videos with a domain shift (`vidshift synth OUT_DIR`).

An object moves across a background; the class is the motion (left, right, up, down, approach, recede), so
a single frame says nothing about the class. Domains differ in appearance: background texture, object
shape and colour, camera jitter, sensor noise, frame rate, resolution and container (H.264 in .mp4, MPEG-4
Part 2 in .avi). In the first domain of the config (the intended source) the background colour is a static
cue that predicts the class for a fraction `static_cue_strength` of the videos; in every other domain the
colour is balanced across classes. A model that learns the colour instead of the motion looks good on the
source and falls to chance on the target: the spatial-bias failure the video DA/DG papers attack.

Everything is derived from the seed: with the same PyAV/FFmpeg build, the same seed gives a byte-identical
manifest and byte-identical video files, hence identical decoded frames (`write_video` says which encoder
settings that takes).
"""
from __future__ import annotations

import csv
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .decode import DECORD_UNREADABLE_WIDTHS

# Each class is a direction in (x, y, log-size) space; a frame shows none of it, only the clip does.
MOTIONS: dict[str, tuple[int, int, int]] = {
    "left": (-1, 0, 0),
    "right": (1, 0, 0),
    "up": (0, -1, 0),
    "down": (0, 1, 0),
    "approach": (0, 0, 1),
    "recede": (0, 0, -1),
}
CLASSES: tuple[str, ...] = tuple(MOTIONS)

# Background colours. Every channel of every colour stays <= 180 and each has one channel <= 70, so the
# light objects below stand out in every domain.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (170, 45, 45),
    "green": (45, 150, 60),
    "blue": (45, 70, 180),
    "orange": (180, 110, 30),
    "purple": (130, 50, 160),
    "teal": (30, 140, 150),
}
# The static cue: in the cue domain, a class's videos mostly show this background colour.
CUE_COLOURS: dict[str, str] = dict(zip(CLASSES, PALETTE))

MANIFEST_COLUMNS = ("path", "label", "domain", "split", "video_id",
                    "fps", "num_frames", "height", "width", "background", "shape")

# Motion extents are fixed at this frame rate; a domain filmed at another rate shows the same physical
# speed, so its clips (same number of frames) cover proportionally less or more ground.
REFERENCE_FPS = 12


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks; the motion classes are shared by all domains."""
    summary: str
    shape: str                      # "square", "disc" or "diamond"
    object_rgb: tuple[int, int, int]
    background_gain: float          # multiplies the palette colour (< 1: a darker scene)
    stripe_contrast: float          # amplitude of a stripe texture over the background, 0 = flat
    jitter: float                   # camera shake: std of the per-frame offset, fraction of the shorter side
    noise_sigma: float              # per-pixel Gaussian noise (of 255); keep mild, heavy noise hides motion
    fps: int
    scale: tuple[float, float]      # (height, width) relative to `frame_size`
    container: str                  # "mp4" (libx264) or "avi" (mpeg4)


DOMAIN_STYLES: dict[str, DomainStyle] = {
    "studio": DomainStyle(
        summary="white squares on flat backgrounds, steady camera, 12 fps, square frames, H.264 .mp4",
        shape="square", object_rgb=(245, 245, 245), background_gain=1.0, stripe_contrast=0.0,
        jitter=0.0, noise_sigma=0.0, fps=12, scale=(1.0, 1.0), container="mp4"),
    # Calibrated against random ResNet-18 maps: each change below costs a motion model a few points of
    # transfer; stronger texture (contrast 35), shake (1.5%) or noise (sigma 5) took it to chance.
    "outdoor": DomainStyle(
        summary="cream discs on faintly striped backgrounds, slight camera shake, mild noise, 15 fps, "
                "wide frames, MPEG-4 .avi",
        shape="disc", object_rgb=(250, 240, 190), background_gain=1.0, stripe_contrast=8.0,
        jitter=0.005, noise_sigma=3.0, fps=15, scale=(0.875, 1.125), container="avi"),
    "night": DomainStyle(
        summary="pale cyan diamonds on dark backgrounds, mild noise, 10 fps, smaller frames, H.264 .mp4",
        shape="diamond", object_rgb=(150, 215, 230), background_gain=0.45, stripe_contrast=0.0,
        jitter=0.005, noise_sigma=4.0, fps=10, scale=(0.75, 0.75), container="mp4"),
}


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. The defaults make a demo-sized dataset (seconds to write, minutes to use)."""
    seed: int = 0
    videos_per_class: int = 20          # per domain; split into train / val / test
    num_frames: int = 16
    frame_size: int = 112               # base resolution; each domain scales it (DomainStyle.scale)
    static_cue_strength: float = 0.8    # P(background colour is the class's cue colour) in the cue domain
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    domains: tuple[str, ...] = ("studio", "outdoor")   # the first carries the static cue (the source)

    def __post_init__(self) -> None:
        unknown = [name for name in self.domains if name not in DOMAIN_STYLES]
        if not self.domains or unknown or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"SynthConfig.domains={self.domains!r}: give one or more distinct names "
                             f"from {sorted(DOMAIN_STYLES)}")
        # Messages name the CLI option and the field, for `vidshift synth` and API users alike.
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed} (SynthConfig.seed): must be 0 or more")
        if self.videos_per_class < 3:
            raise ValueError(f"--videos-per-class {self.videos_per_class} (SynthConfig.videos_per_class): need at "
                             "least 3 so that train, val and test each get a video of every class")
        if self.num_frames < 2:
            raise ValueError(f"--frames {self.num_frames} (SynthConfig.num_frames): motion needs at least 2 frames")
        if self.frame_size < 16:
            raise ValueError(f"--frame-size {self.frame_size} (SynthConfig.frame_size): use 16 or more pixels")
        if not 0.0 <= self.static_cue_strength <= 1.0:
            raise ValueError(f"SynthConfig.static_cue_strength={self.static_cue_strength}: "
                             "must be a probability in [0, 1]")
        if not (0 < self.val_fraction and 0 < self.test_fraction
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"SynthConfig.val_fraction={self.val_fraction}, test_fraction="
                             f"{self.test_fraction}: both must be > 0 and sum to less than 1")


def describe(config: SynthConfig) -> str:
    """One paragraph saying what `generate(config)` produces."""
    cue_domain, *other_domains = config.domains
    styles = "; ".join(f"{name}: {DOMAIN_STYLES[name].summary}" for name in config.domains)
    balanced = (f" In {', '.join(other_domains)} the colours are spread evenly over the classes, so the "
                "colour predicts nothing there." if other_domains else "")
    return (f"{len(CLASSES)} classes defined only by motion ({', '.join(CLASSES)}), "
            f"{config.videos_per_class} videos per class per domain of {config.num_frames} frames "
            f"(base size {config.frame_size} px), split train/val/test. Domains differ in appearance: "
            f"{styles}. Static cue: in {cue_domain} the background colour names the class in "
            f"{config.static_cue_strength:.0%} of the videos "
            f"({', '.join(f'{c}={CUE_COLOURS[c]}' for c in CLASSES)}).{balanced} "
            f"A model that relies on the colour scores well on {cue_domain} and near chance elsewhere; "
            f"one that follows the motion transfers. Seed {config.seed}.")


def generate(out_dir: Path, config: SynthConfig = SynthConfig(), progress: bool = False) -> Path:
    """Write the videos and `manifest.csv` under `out_dir`; return the manifest path.

    Files of the same name are overwritten. The manifest is written last, so an interrupted run leaves
    no manifest that points at missing videos.
    """
    out_dir = Path(out_dir)
    plan = [row for domain in config.domains for row in _plan_domain(domain, config)]
    for row in tqdm(plan, desc="synth", unit="video", disable=not progress):
        rng = np.random.default_rng(_video_seed(config.seed, row["domain"], row["label"], row["index"]))
        frames = render_clip(row["label"], row["background"], DOMAIN_STYLES[row["domain"]],
                             config.num_frames, row["height"], row["width"], rng)
        write_video(out_dir / row["path"], frames, row["fps"], DOMAIN_STYLES[row["domain"]].container)
    manifest_path = out_dir / "manifest.csv"
    with open(manifest_path, "w", newline="") as f:
        writer = csv.DictWriter(f, MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(plan)
    return manifest_path


def _plan_domain(domain: str, config: SynthConfig) -> list[dict]:
    """One manifest row per video of `domain`, with the split and background colour it gets."""
    style = DOMAIN_STYLES[domain]
    height, width = frame_shape(style, config.frame_size)
    n = config.videos_per_class
    n_val = max(1, round(n * config.val_fraction))
    n_test = max(1, round(n * config.test_fraction))
    splits = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    has_cue = domain == config.domains[0]
    rows = []
    for class_index, label in enumerate(CLASSES):
        backgrounds = (_cue_backgrounds(label, splits, config.static_cue_strength) if has_cue
                       else _balanced_backgrounds(class_index, n))
        for index, (split, background) in enumerate(zip(splits, backgrounds)):
            video_id = f"{domain}/{split}/{label}/{domain}_{label}_{index:03d}"
            rows.append(dict(path=f"{video_id}.{style.container}", label=label, domain=domain, split=split,
                             video_id=video_id, fps=style.fps, num_frames=config.num_frames, height=height,
                             width=width, background=background, shape=style.shape,
                             index=index))   # `index` seeds the video; it is not a manifest column
    return rows


def frame_shape(style: DomainStyle, frame_size: int) -> tuple[int, int]:
    """(height, width) of a domain's frames: `frame_size` scaled by the style, rounded to even sizes (yuv420p)."""
    height, width = (2 * round(frame_size * s / 2) for s in style.scale)
    # decord 0.6.0, the pipeline's video reader, cannot return frames of a few widths (heights are fine).
    # From 12 px up they are isolated even numbers, so one 2 px step up reaches the nearest readable width;
    # up rather than down so that a frame never gets smaller than asked.
    while width in DECORD_UNREADABLE_WIDTHS:
        width += 2
    return height, width


def _cue_backgrounds(label: str, splits: list[str], strength: float) -> list[str]:
    """Cue colour for strength * m (rounded half up) of the m videos of each split, the other colours in
    turn for the rest: exact rates per split make the source accuracy of a colour-only model predictable."""
    others = [colour for colour in PALETTE if colour != CUE_COLOURS[label]]
    backgrounds = []
    for split in dict.fromkeys(splits):
        m = splits.count(split)
        n_cue = math.floor(strength * m + 0.5)
        backgrounds += [CUE_COLOURS[label]] * n_cue + [others[j % len(others)] for j in range(m - n_cue)]
    return backgrounds


def _balanced_backgrounds(class_index: int, n: int) -> list[str]:
    """Colours in turn, starting one past the class's own cue colour: over a domain every colour is used
    equally often, and a class meets its cue colour no more often than 1 in len(PALETTE)."""
    colours = list(PALETTE)
    return [colours[(class_index + 1 + i) % len(colours)] for i in range(n)]


def _video_seed(seed: int, domain: str, label: str, index: int) -> list[int]:
    """A per-video seed that does not depend on which other domains or how many videos are generated."""
    return [seed, zlib.crc32(domain.encode()), zlib.crc32(label.encode()), index]


def render_clip(label: str, background: str, style: DomainStyle, num_frames: int, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of one object moving as `label` says, in `style`'s look."""
    dx, dy, dlog_size = MOTIONS[label]
    unit = min(height, width)                           # lengths are fractions of the shorter side
    extent = REFERENCE_FPS / style.fps                  # same physical speed at every frame rate
    progress = np.linspace(-0.5, 0.5, num_frames)       # centred, so the mean position says nothing
    size = unit * rng.uniform(0.2, 0.26) * np.exp(dlog_size * rng.uniform(0.7, 1.0) * extent * progress)
    travel = unit * rng.uniform(0.4, 0.55) * extent
    # Place the path's midpoint at random where the whole path, object included, stays inside the frame.
    reach_x = abs(dx) * travel / 2 + size.max() / 2 + 2
    reach_y = abs(dy) * travel / 2 + size.max() / 2 + 2
    centre_x = rng.uniform(reach_x, max(reach_x, width - reach_x)) + dx * travel * progress
    centre_y = rng.uniform(reach_y, max(reach_y, height - reach_y)) + dy * travel * progress
    shake = rng.normal(0.0, style.jitter * unit, size=(num_frames, 2))

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5   # pixel centres
    background_rgb = np.array(PALETTE[background], np.float32) * style.background_gain
    object_rgb = np.array(style.object_rgb, np.float32)
    stripe_angle, stripe_phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    stripe_period = unit * rng.uniform(0.15, 0.3)

    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        # The camera moves, so background and object shift together.
        x, y = xs + float(shake[t, 0]), ys + float(shake[t, 1])   # Python floats keep float32
        scene = np.broadcast_to(background_rgb, (height, width, 3))
        if style.stripe_contrast:
            along = x * math.cos(stripe_angle) + y * math.sin(stripe_angle)
            stripes = style.stripe_contrast * np.sin(2 * math.pi / stripe_period * along + stripe_phase)
            scene = scene + stripes[..., None]
        cover = _coverage(style.shape, x - float(centre_x[t]), y - float(centre_y[t]), float(size[t] / 2))
        cover = cover[..., None]
        frame = scene + (object_rgb - scene) * cover
        if style.noise_sigma:
            frame = frame + style.noise_sigma * rng.standard_normal(frame.shape, dtype=np.float32)
        frames[t] = np.clip(np.rint(frame), 0, 255)
    return frames


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Fraction of each pixel covered by the object (a one-pixel linear ramp at the edge, so sub-pixel
    motion and growth change the image smoothly instead of in whole-pixel jumps)."""
    if shape == "square":
        return np.clip(half - np.abs(dx) + 0.5, 0, 1) * np.clip(half - np.abs(dy) + 0.5, 0, 1)
    if shape == "disc":
        return np.clip(half - np.hypot(dx, dy) + 0.5, 0, 1)
    if shape == "diamond":   # a square turned 45 degrees, with the same area as the square
        return np.clip(half * math.sqrt(2) - (np.abs(dx) + np.abs(dy)) + 0.5, 0, 1)
    raise ValueError(f"unknown shape {shape!r}: use square, disc or diamond")


def write_video(path: Path, frames: np.ndarray, fps: int, container: str) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] as .mp4 (libx264) or .avi (mpeg4), reproducibly."""
    import av  # here, not at the top: the CLI imports this module, and PyAV's FFmpeg libraries cost ~16 MB

    codec = {"mp4": "libx264", "avi": "mpeg4"}[container]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as output:
        stream = output.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1   # x264's output depends on its thread count
        if codec == "libx264":
            # crf 18: near-lossless, the objects are small. mbtree=0: with MB-tree on, this x264 build
            # gave different bytes (and decoded pixels) for the same input from run to run on small
            # frames, even single-threaded; without it, repeated encodes are identical.
            stream.options = {"crf": "18", "x264-params": "mbtree=0"}
        else:
            stream.codec_context.qscale = True   # fixed quantiser instead of mpeg4's 200 kb/s default
            stream.codec_context.global_quality = 3
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
