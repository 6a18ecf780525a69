"""Run the official TA3N ``main.py`` unchanged (on a CPU-only machine too), timing each epoch's ``train`` and ``validate`` calls.

    python benchmarks/peers/run_ta3n.py TA3N_DIR TIMES.jsonl [--data-only] -- MAIN.PY ARGUMENTS...

TA3N_DIR is a checkout of cmhungsteve/TA3N; it needs colorama and tensorboardX importable (benchmarks/README.md).
Without a GPU, ``cpu_compat`` makes its ``.cuda()`` calls no-ops (with one, the code runs on CUDA as
written); either way it keeps ``torchvision.models.resnet101(True)`` (built only to read
``fc.in_features``) from downloading weights. main.py is imported as a module, its module-level ``train`` and
``validate`` are wrapped (main() looks them up at call time), its ``accuracy`` is replaced by the same function with
``reshape`` for ``view`` (the original raises on a current torch), and ``main()`` is called: one JSON line per call goes to
TIMES.jsonl (``{"call": "train"|"validate", "epoch": N, "seconds": S}``).

``--data-only`` replaces both with a loop over the same DataLoaders (``zip(source_loader, target_loader)``, then
``val_loader``) that touches every batch and runs no model: the official data path alone.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_compat  # noqa: E402


def accuracy(output, target, topk=(1,)):
    """main.py's ``accuracy`` (precision@k in percent) with ``.reshape(-1)`` where it has ``.view(-1)``: on a
    current torch ``correct[:k]`` of the transposed prediction is not contiguous and ``.view`` raises."""
    maxk = max(topk)
    batch_size = target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0).mul_(100.0 / batch_size) for k in topk]


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(__doc__)
    ours, theirs = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    data_only = "--data-only" in ours
    ta3n_dir, times_path = (Path(a) for a in ours if a != "--data-only")
    import torch
    if not torch.cuda.is_available():
        cpu_compat.patch_cuda()
    cpu_compat.patch_star_imports()
    cpu_compat.patch_torchvision_weights(None)
    sys.path.insert(0, str(ta3n_dir))
    sys.argv = [str(ta3n_dir / "main.py"), *theirs]
    spec = importlib.util.spec_from_file_location("ta3n_main", ta3n_dir / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = open(times_path, "a", buffering=1)
    module.accuracy = accuracy  # its own fails on torch >= 1.13 (``.view`` of a transposed tensor): same result

    def timed(name, function):
        def wrapper(*args, **kwargs):
            epoch = args[7] if name == "train" else args[4]  # train(..., optimizer, epoch, ...), validate(..., epoch, log)
            started = time.perf_counter()
            result = function(*args, **kwargs)
            times.write(json.dumps({"call": name, "epoch": epoch, "seconds": time.perf_counter() - started}) + "\n")
            return result
        return wrapper

    if data_only:
        import torch

        def loaders_only_train(num_class, source_loader, target_loader, *args):
            for (source, _), (target, _) in zip(source_loader, target_loader):
                float(source[:, :, 0].sum() + target[:, :, 0].sum())
            return 0.0, torch.zeros(1), torch.zeros(1)

        def loaders_only_validate(val_loader, *args):
            for batch, _ in val_loader:
                float(batch[:, :, 0].sum())
            return 0.0

        module.train, module.validate = loaders_only_train, loaders_only_validate
    module.train = timed("train", module.train)
    module.validate = timed("validate", module.validate)
    module.main()


if __name__ == "__main__":
    main()
