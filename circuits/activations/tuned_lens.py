"""The tuned lens (Belrose et al. 2023): the logit lens with an affine translator per stage, trained to match
the model's final next-token distribution.

Stage s (the residual stream entering block s, and the final residual stream, as in `logit_lens`) is read as
`lens_logits(model, resid_s @ W_s + b_s)`. Each translator starts at the identity (W = I, b = 0: the logit
lens) and is trained on a token stream to minimise KL(final ‖ stage), the KL of `circuits.tasks.task.kl_terms`,
summed over stages. The final stage is the model's own reading (KL 0 at the identity): its translator is the
identity and is not trained, so the lens's last stage is always the model's own distribution, the reference every
other stage is compared with. (Trained, it would have zero gradient there, but SGD at a learning rate that is
stable for the other stages can be unstable at that minimum and amplify rounding noise: on attn2l-pycode-induction,
lr 0.1 moved it 1.2 from the identity.)

`fit_tuned_lens(model, tokens)` trains one (deterministic for a seed), `tuned_lens(model, tokens, lens)` reads
it like `logit_lens`, and `TunedLens.save(folder)` / `TunedLens.load(folder, model)` store it beside a saved
model, checked on load against its own SHA-256 and the model's weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.activations.logit_lens import LensResult, lens_logits, lens_result, residual_stages
from circuits.validate import check_tokens

WEIGHTS = "tuned_lens.safetensors"
META = "tuned_lens.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class TunedLens:
    """One affine translator per stage: `weight` [stage, d_model, d_model] (applied as resid @ weight) and
    `bias` [stage, d_model]; stage i < n_layers reads resid_pre of block i, the last the final residual stream.
    `info` records how it was trained and the fingerprint of the model it was trained on.
    Example: `lens = fit_tuned_lens(model, tokens); tuned_lens(model, tokens, lens).kl_to_final()`"""

    weight: Float[Tensor, "stage d_model d_model"]
    bias: Float[Tensor, "stage d_model"]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s, d, d2 = self.weight.shape
        if d != d2 or tuple(self.bias.shape) != (s, d):
            raise ValueError(f"weight, bias: expected [stage, d, d] and [stage, d], got {tuple(self.weight.shape)} "
                             f"and {tuple(self.bias.shape)}")

    @property
    def n_stages(self) -> int:
        return self.weight.shape[0]

    def translate(self, resid: Float[Tensor, "stage *lead d_model"]) -> Float[Tensor, "stage *lead d_model"]:
        """Each stage's residual stream through its translator."""
        w, b = self.weight.to(resid), self.bias.to(resid)
        flat = resid.flatten(1, -2)  # stage, n, d_model
        return (torch.bmm(flat, w) + b[:, None]).reshape(resid.shape)

    def save(self, folder: str | Path) -> Path:
        """Write tuned_lens.safetensors and tuned_lens.json (info and the weights file's SHA-256) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"weight": self.weight.contiguous().cpu(), "bias": self.bias.contiguous().cpu()}
        save_file(state, str(folder / WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, "sha256": _sha256(folder / WEIGHTS), **self.info}
        (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: TransformerBridge | None = None) -> TunedLens:
        """Read a lens written by `save`. Raises ValueError naming the file when its SHA-256 differs from the
        recorded one, when the shapes are wrong, or (given `model`) when it was trained on other weights."""
        folder = Path(folder)
        meta_file, weights_file = folder / META, folder / WEIGHTS
        for f in (meta_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"tuned lens file {f} does not exist")
        try:
            meta = json.loads(meta_file.read_text())
            recorded = meta.pop("sha256")
            meta.pop("format_version")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_file}: not a tuned lens description: {err}") from err
        if _sha256(weights_file) != recorded:
            raise ValueError(f"{weights_file}: SHA-256 differs from the one recorded in {META}: the file changed")
        try:
            state = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights_file}: not a safetensors file: {err}") from err
        lens = cls(state["weight"], state["bias"], meta)
        if model is not None:
            lens.check_model(model)
        return lens

    def check_model(self, model: TransformerBridge) -> None:
        """Raise ValueError unless this lens fits `model`'s shape, was trained on its weights, and reads the final
        stage as the model does (identity)."""
        expected = (model.cfg.n_layers + 1, model.cfg.d_model)
        if (self.n_stages, self.weight.shape[1]) != expected:
            raise ValueError(f"lens: {self.n_stages} stages of d_model {self.weight.shape[1]}; the model needs "
                             f"{expected[0]} of {expected[1]}")
        d = self.weight.shape[1]
        if not (torch.equal(self.weight[-1], torch.eye(d, dtype=self.weight.dtype)) and not self.bias[-1].any()):
            raise ValueError("lens: the final stage's translator must be the identity (the model's own reading)")
        recorded = self.info.get("model_fingerprint")
        if recorded is not None and recorded != model_fingerprint(model):
            raise ValueError("lens: trained on a model with other weights (model_fingerprint differs)")


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def model_fingerprint(model: TransformerBridge) -> str:
    """SHA-256 (first 16 hex digits) of the model's state dict: every name, dtype, shape and value, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def tuned_lens(model: TransformerBridge, tokens: Int[Tensor, "batch pos"], lens: TunedLens) -> LensResult:
    """`logit_lens` with each stage's residual stream first passed through its translator.

    Example: `tuned_lens(model, tokens, lens).kl_to_final().values.mean(-1)` (KL to the final layer per stage).
    """
    check_tokens(model, tokens, "tokens", min_pos=2)
    lens.check_model(model)
    resid, stages = residual_stages(model, tokens)
    with torch.no_grad():
        logits = lens_logits(model, lens.translate(resid))
    return lens_result(model, tokens, logits, stages, "tuned_lens", {"scale": "recomputed per stage",
                                                                     "translators": "affine per stage"})


def fit_tuned_lens(
    model: TransformerBridge,
    tokens: Int[Tensor, "n pos"],
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Train one affine translator per stage but the final (identity initialisation) on KL(final ‖ stage), by SGD
    with Nesterov momentum; the final stage's translator is the identity.

    `tokens` are training rows [n, pos] (sampled with replacement, `batch_size` per step); the model is not
    modified. Deterministic for a seed on one machine. Example: `lens = fit_tuned_lens(model, rows, steps=200)`
    """
    from circuits.tasks.task import kl_terms

    check_tokens(model, tokens, "tokens", min_pos=2)
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size must be ≥ 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    S, d = model.cfg.n_layers, model.cfg.d_model  # trained stages: every one but the final
    ref = model.W_U
    weight = torch.eye(d, dtype=ref.dtype, device=ref.device).repeat(S, 1, 1).requires_grad_(True)
    bias = torch.zeros(S, d, dtype=ref.dtype, device=ref.device, requires_grad=True)
    opt = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in tqdm(range(steps), disable=not progress, desc="tuned lens", leave=False):
        rows = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=gen)].to(ref.device)
        resid, _ = residual_stages(model, rows)
        final, resid = resid[-1], resid[:-1]
        with torch.no_grad():
            target = lens_logits(model, final)
            logprobs = target.log_softmax(-1)
        translated = torch.baddbmm(bias[:, None], resid.flatten(1, 2), weight).reshape(resid.shape)
        kl = kl_terms(lens_logits(model, translated), target.expand(S, *target.shape), logprobs)  # [stage, b, pos]
        loss = kl.mean(dim=(1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "optimizer": "SGD(momentum=0.9, nesterov=True)",
            "objective": "sum over stages of mean KL(final ‖ stage) (circuits.tasks.task.kl_terms)",
            "initialisation": "identity", "final_stage": "identity, not trained",
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 6),
            "model_fingerprint": model_fingerprint(model)}
    eye, zero = torch.eye(d)[None], torch.zeros(1, d)
    return TunedLens(torch.cat([weight.detach().cpu(), eye]), torch.cat([bias.detach().cpu(), zero]), info)
