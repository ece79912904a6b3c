"""Keter's own sample files (shared/keter-fixtures, beside the checkout)."""

from __future__ import annotations

from pathlib import Path


def keter_sample(name: str) -> Path:
    """One of Keter's own sample files from shared/keter-fixtures (beside the checkout).

    The checkout and shared/ sit side by side both here and in CI; the result may not
    exist, so tests skip on ``.exists()``.
    """
    checkout = Path(__file__).resolve().parents[2]
    for shared in (checkout.parent / "shared", Path("/work/shared")):
        if (shared / "keter-fixtures" / name).exists():
            return shared / "keter-fixtures" / name
    return checkout.parent / "shared" / "keter-fixtures" / name
