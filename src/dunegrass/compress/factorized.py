"""Per-layer compressors of factorised gradients (algorithms.md §2.1): LoGra and FactGraSS.

Both map a linear layer's factors — inputs x ``[B, T, d_in]`` and output gradients δ ``[B, T, d_out]``,
e.g. a Conv2d's unfolded patches and its output gradients per position (``gradients.factorized``) —
to features ``[B, k]`` equal to a fixed linear map of vec(G), G = Σ_t δ_t x̃_tᵀ ``[layer_out, layer_in]``
(row-major vec, layer_out outer), where x̃ = [x; 1] when the layer has a bias (``layer_in = d_in + 1``),
without building G:

- LoGra: φ = vec(Σ_t (P_out δ_t)(P_in x̃_t)ᵀ) = (P_out ⊗ P_in) vec(G), Gaussian P (entries N(0, 1/k)).
- FactGraSS: G′ = Σ_t (M_out δ_t)(M_in x̃_t)ᵀ = M_out G M_inᵀ exactly (masks keep k′ coordinates of each
  factor), then φ = SparseJL(vec G′) to k.

The constant 1 of x̃ is never materialised (it would copy every layer input): LoGra adds P_in's bias
column, FactGraSS appends ones only to the k′ gathered columns. Sizes are capped at the layer's
dimensions so one setting fits every layer of a model. ``map_gradient`` applies the same map to an
explicitly materialised G (the reference the tests compare against). Learned factor masks:
``factor_masks.fit_factor_masks``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..errors import DunegrassError, NonFiniteError
from ..options import deprecated
from ..seeding import derive_seed
from .base import canonical_device
from .dense import Gaussian
from .mask import Mask, RandomMask
from .sjlt import SparseJL


class FactorizedCompressor(ABC):
    """``(inputs [B, T, d_in], grads [B, T, layer_out]) -> [B, k]`` fp32, linear in G = Σ_t δ_t x̃_tᵀ.

    G is ``layer_out × layer_in``: ``layer_in`` is d_in, plus 1 when ``bias``; ``k`` is the output size,
    as for every compressor.
    """

    name = ""

    def __init__(self, layer_in: int, layer_out: int, seed: int = 0, bias: bool = False):
        if layer_in - int(bias) < 1 or layer_out < 1:
            raise DunegrassError(
                f"a linear layer needs positive dimensions, got in={layer_in} (bias={bias}), out={layer_out}"
            )
        self.layer_in, self.layer_out, self.seed, self.bias = int(layer_in), int(layer_out), int(seed), bool(bias)
        self.in_features = self.layer_in - int(self.bias)

    @property
    @abstractmethod
    def k(self) -> int:
        """Feature width of this layer."""

    def __call__(self, inputs: Tensor, grads: Tensor, check_finite: bool = True) -> Tensor:
        """``check_finite=False`` leaves the NaN/inf check to the caller (one check per batch, not per layer,
        saves a device sync per layer on a GPU)."""
        if (
            inputs.ndim != 3
            or grads.ndim != 3
            or inputs.shape[:2] != grads.shape[:2]
            or inputs.shape[2] != self.in_features
            or grads.shape[2] != self.layer_out
        ):
            raise DunegrassError(
                f"{type(self).__name__} expects inputs [B, T, {self.in_features}] and grads [B, T, {self.layer_out}], "
                f"got {tuple(inputs.shape)} and {tuple(grads.shape)}"
            )
        phi = self._compress(inputs, grads)
        # A linear map of non-finite factors is non-finite; checking [B, k] is far cheaper than the factors.
        if check_finite and not torch.isfinite(phi).all():
            raise NonFiniteError(f"{type(self).__name__}: the layer's inputs or output gradients hold NaN or inf")
        return phi

    @abstractmethod
    def _compress(self, inputs: Tensor, grads: Tensor) -> Tensor: ...

    @abstractmethod
    def map_gradient(self, grad: Tensor) -> Tensor:
        """The same map on materialised gradients ``[B, layer_out, layer_in] -> [B, k]``."""

    @abstractmethod
    def config(self) -> dict: ...

    def _base_config(self) -> dict:
        return {
            "name": self.name,
            "layer_in": self.layer_in,
            "layer_out": self.layer_out,
            "bias": self.bias,
            "seed": self.seed,
        }

    @property
    def in_dim(self) -> int:  # the name of the last release, where out_dim was the layer's width, not k
        deprecated("FactorizedCompressor.in_dim", ".layer_in", "dunegrass")
        return self.layer_in

    @property
    def out_dim(self) -> int:
        deprecated("FactorizedCompressor.out_dim", ".layer_out (the output size is .k)", "dunegrass")
        return self.layer_out


def _gather_columns(x: Tensor, cols: Tensor) -> Tensor:
    """``x[:, cols]`` in fp32 for a 2-D ``x``. On CPU ``gather`` with a broadcast index uses every
    thread where ``index_select`` along dim 1 runs on one (1.8 ms vs 3.1 ms for 2048 × 3072 on 2 cores);
    the gather is memory-bound, and this is most of FactGraSS's compression time."""
    return torch.gather(x, 1, cols.expand(x.shape[0], -1)).to(torch.float32)


def _gather_factor(x: Tensor, cols: Tensor) -> Tensor:
    """``x[:, :, cols]`` in fp32 for ``x [B, T, d]``."""
    b, t = x.shape[:2]
    if x.is_contiguous():
        return _gather_columns(x.reshape(b * t, -1), cols).view(b, t, -1)
    # A Conv2d's δ is a transposed view ([B, L, O] over [B, O, L]): reshaping would copy all of it.
    return x.index_select(2, cols).to(torch.float32)


def _project(x: Tensor, p: Tensor) -> Tensor:
    """``x @ p`` in fp32 for ``x [B, T, d]``, ``p [d, k]``, also without copying a transposed-view ``x``."""
    x = x.to(torch.float32)
    if not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        return (p.T @ x.transpose(1, 2)).transpose(1, 2)
    return x @ p


def _outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ_t a_t b_tᵀ for ``a [B, T, p]``, ``b [B, T, q]`` (fp32): ``[B, p·q]`` (row-major, a outer)."""
    out = torch.bmm(a.transpose(1, 2), b)
    return out.reshape(out.shape[0], -1)


class LoGraCompressor(FactorizedCompressor):
    """LoGra: Gaussian factor projections P_out (k_out × layer_out), P_in (k_in × layer_in); k = k_out · k_in."""

    name = "logra"

    def __init__(
        self, layer_in: int, layer_out: int, k_in: int = 64, k_out: int = 64, seed: int = 0, bias: bool = False
    ):
        super().__init__(layer_in, layer_out, seed, bias)
        if k_in < 1 or k_out < 1:
            raise DunegrassError(f"LoGra factor sizes must be positive, got k_in={k_in}, k_out={k_out}")
        self.proj_out = Gaussian(layer_out, min(k_out, layer_out), seed=derive_seed(seed, 0))
        self.proj_in = Gaussian(layer_in, min(k_in, layer_in), seed=derive_seed(seed, 1))
        self._matrices: tuple[Tensor, Tensor] | None = None

    @property
    def k(self) -> int:
        return self.proj_out.out_dim * self.proj_in.out_dim

    def matrices(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """P_outᵀ ``[layer_out, k_out]`` and P_inᵀ ``[layer_in, k_in]`` (fp32, kept: they are small)."""
        device = canonical_device(device)
        if self._matrices is None or self._matrices[0].device != device:
            self._matrices = (self.proj_out.matrix().to(device), self.proj_in.matrix().to(device))
        return self._matrices

    def _compress(self, inputs: Tensor, grads: Tensor) -> Tensor:
        p_out, p_in = self.matrices(inputs.device)
        a = _project(grads, p_out)  # P_out δ_t  [B, T, k_out]
        c = _project(inputs, p_in[: self.in_features])  # P_in x̃_t   [B, T, k_in]
        if self.bias:
            c = c + p_in[self.in_features]
        return _outer_sum(a, c)

    def map_gradient(self, grad: Tensor) -> Tensor:
        p_out, p_in = self.matrices(grad.device)
        return (p_out.T @ grad.to(torch.float32) @ p_in).reshape(grad.shape[0], -1)

    def config(self) -> dict:
        return {**self._base_config(), "proj_out": self.proj_out.config(), "proj_in": self.proj_in.config()}


class FactGraSSCompressor(FactorizedCompressor):
    """FactGraSS: masks on both factors (k′_out × k′_in entries of G), then SparseJL to ``k``.

    ``mask_out``/``mask_in`` are sizes (seeded RandomMasks) or fitted Masks, e.g. the SelectiveMasks
    of ``fit_factor_masks``; ``mask_in`` selects from the layer_in columns of G (the bias column too).
    """

    name = "factgrass"

    def __init__(
        self,
        layer_in: int,
        layer_out: int,
        k: int = 4096,
        mask_in: int | Mask = 128,
        mask_out: int | Mask = 128,
        seed: int = 0,
        c: int = 1,
        bias: bool = False,
    ):
        super().__init__(layer_in, layer_out, seed, bias)
        self.mask_out = self._mask(mask_out, layer_out, derive_seed(seed, 0), "mask_out")
        self.mask_in = self._mask(mask_in, layer_in, derive_seed(seed, 1), "mask_in")
        inner = self.mask_out.out_dim * self.mask_in.out_dim
        if k < 1:
            raise DunegrassError(f"FactGraSS needs k >= 1, got {k}")
        self.sjlt = SparseJL(inner, min(k, inner), seed=derive_seed(seed, 2), c=c)
        cols = self.mask_in.indices
        self._x_cols = cols[cols < self.in_features]  # sorted, so the bias column (if kept) is last
        self._keeps_bias = self.bias and bool((cols == self.in_features).any())
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _mask(spec: int | Mask, dim: int, seed: int, what: str) -> Mask:
        if isinstance(spec, Mask):
            if spec.in_dim != dim:
                raise DunegrassError(f"{what} selects from {spec.in_dim} coordinates, the layer factor has {dim}")
            spec._require_indices()  # an unfitted SelectiveMask has nothing to select yet
            return spec
        if int(spec) < 1:
            raise DunegrassError(f"{what} must keep at least one coordinate, got {spec}")
        return RandomMask(dim, min(int(spec), dim), seed=seed)

    @property
    def k(self) -> int:
        return self.sjlt.out_dim

    def _indices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self.mask_out.indices.to(device), self._x_cols.to(device))
        return self._on[device]

    def _compress(self, inputs: Tensor, grads: Tensor) -> Tensor:
        rows, cols = self._indices(inputs.device)
        # Input columns first: measured a few per cent faster on GPT-2-small factors (CPU); same result.
        c = _gather_factor(inputs, cols)  # M_in x̃_t
        a = _gather_factor(grads, rows)  # M_out δ_t
        if self._keeps_bias:
            c = torch.cat([c, c.new_ones(*c.shape[:2], 1)], dim=2)
        # The SparseJL input is ours (right shape, fp32): skip its checks; the caller checks φ once.
        return self.sjlt.compress_dense(_outer_sum(a, c))

    def map_gradient(self, grad: Tensor) -> Tensor:
        rows = self.mask_out.indices.to(grad.device)
        cols = self.mask_in.indices.to(grad.device)
        g = grad.to(torch.float32).index_select(1, rows).index_select(2, cols)
        return self.sjlt(g.reshape(g.shape[0], -1))

    def config(self) -> dict:
        return {
            **self._base_config(),
            "mask_out": _mask_config(self.mask_out),
            "mask_in": _mask_config(self.mask_in),
            "sjlt": self.sjlt.config(),
        }


def _mask_config(mask: Mask) -> dict:
    """A mask's config plus a digest of its indices (learned masks differ by data, not just by seed)."""
    digest = hashlib.sha256(mask.indices.numpy().tobytes()).hexdigest()[:16]
    return {**mask.config(), "indices_sha256": digest}
