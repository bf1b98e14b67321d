"""What the analyses share: loading a model by zoo name or path, the device, small statistics."""

from __future__ import annotations

from pathlib import Path

import torch
from transformer_lens import TransformerBridge

from circuits.models import load
from circuits.models.zoo import available, load_pretrained
from circuits.verdicts.induction import correlation as pearson  # noqa: F401 (the analyses' one correlation)


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when present); a clear error for a device that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use 'cpu'")
    return dev


def load_model(name_or_path: str, device: torch.device | str = "cpu") -> TransformerBridge:
    """A zoo model by name, or a model saved with `circuits.models.save` by folder."""
    if name_or_path in available():
        model = load_pretrained(name_or_path)
    elif Path(name_or_path).is_dir():
        model = load(name_or_path)
    else:
        raise ValueError(f"--model {name_or_path!r}: neither a zoo name ({', '.join(available())}) nor a model folder")
    return model.to(device)


def write_outputs(out: Path, summary: dict, sections: list, *, title: str, subtitle: str) -> Path:
    """Write `out/summary.json` and the standalone `out/report.html`; print and return the report's path."""
    import json

    from viz import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    path = report(sections, out / "report.html", title=title, subtitle=subtitle)
    print(f"wrote {path} and {out / 'summary.json'}")
    return path
