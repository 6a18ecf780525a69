"""Run v-iashin/video_features' ``main.py`` unchanged, with a local ResNet state dict instead of a download.

    python benchmarks/peers/run_video_features.py VIDEO_FEATURES_DIR WEIGHTS.pt [--threads N] -- KEY=VALUE...

The KEY=VALUE arguments are video_features' own (OmegaConf from the command line), e.g. ``feature_type=resnet
model_name=resnet50 device=cpu on_extraction=save_numpy output_path=... file_with_video_paths=...``. Its ResNet
extractor calls ``torchvision.models.get_model(name, weights="IMAGENET1K_V1")``; ``cpu_compat`` makes that return the
torchvision model with WEIGHTS.pt loaded (strictly), so both sides of the comparison run the same network. It reads
its config relative to its folder, so it runs there (give absolute output and temporary paths; set
PYTHONPYCACHEPREFIX so that no bytecode is written into the checkout).
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_compat  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(__doc__)
    ours, theirs = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    threads = None
    if "--threads" in ours:
        at = ours.index("--threads")
        threads = int(ours[at + 1])
        del ours[at:at + 2]
    vf_dir, weights = Path(ours[0]).resolve(), ours[1]
    import torch
    if threads:
        torch.set_num_threads(threads)
    cpu_compat.patch_torchvision_weights(weights)
    os.chdir(vf_dir)
    sys.path.insert(0, str(vf_dir))
    sys.argv = [str(vf_dir / "main.py"), *theirs]
    runpy.run_path(str(vf_dir / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
