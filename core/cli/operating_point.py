"""``lesionlab operating-point --checkpoint CKPT --data DIR`` (``python -m core.cli.operating_point``): the
melanoma threshold chosen on validation written into the model file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.evaluation.evaluate import USER_ERRORS
from core.evaluation.operating_point import choose_operating_point
from core.inference.predictor import USE_TTA_BY_DEFAULT
from core.metrics.classification import MEL_SENSITIVITY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lesionlab operating-point",
        description=__doc__.split("\n\n")[0],
        epilog="Exit status 2 when the model file or the data cannot be used.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a model file (checkpoint or ensemble)")
    parser.add_argument("--data", required=True, type=Path, help="the HAM10000 folder the model was trained on")
    parser.add_argument(
        "--sensitivity",
        type=float,
        default=MEL_SENSITIVITY,
        help="the share of the validation split's melanomas the threshold must flag",
    )
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=USE_TTA_BY_DEFAULT)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        r = choose_operating_point(
            args.checkpoint, args.data, sensitivity=args.sensitivity, tta=args.tta, device=args.device
        )
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{r['checkpoint']}: melanoma operating point P(mel) >= {r['mel_threshold']:.4f}, recorded. On the "
        f"{r['val_images']} validation images ({r['tta_views']}): sensitivity {r['val_sensitivity']:.3f}, "
        f"specificity {r['val_specificity']:.3f} (target sensitivity {r['target_sensitivity']:.2f})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
