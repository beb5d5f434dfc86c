"""What a model is, without PyTorch: the architecture a bundle stores and the service validates.

Kept free of torch so a CPU deployment that scores through onnxruntime can read bundles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal, get_args

Geometry = Literal["euclidean", "sphere"]
ActivationName = Literal["swish", "tanh", "relu", "softplus", "linear"]
ACTIVATION_NAMES: tuple[str, ...] = get_args(ActivationName)
PriorName = Literal["normal", "vamp", "vmf"]
# Which latent geometry each prior is a density on: a Gaussian is no density on the sphere, nor a
# vMF on R^k.
PRIOR_GEOMETRY: dict[str, Geometry] = {"normal": "euclidean", "vamp": "euclidean", "vmf": "sphere"}


# Numerical constants of the scores, shared by the torch code (app.model.scores) and the ONNX graphs
# (app.model.onnx_export); docs/bundle.md section 6 states them.
# A volume term's factors are floored here: each |R_ii| of its Gram-Schmidt factorisation, whose
# product is the product of the singular values (equal to flooring each singular value unless
# the matrix is within 1e-12 of rank-deficient, where no volume is meaningful).
SINGULAR_VALUE_FLOOR = 1e-12
PIVOT_FLOOR = 1e-12  # Cholesky pivots of a Hessian: at least this fraction of its Frobenius norm
PROJECTION_STEPS = 100  # the projection's Levenberg-Marquardt steps at most
PROJECTION_TOLERANCE = 1e-8  # a row stops once its next step is below this times (1 + |z|)


@dataclass(frozen=True)
class Network:
    """The model without the width of the data: encoder, decoder and prior.

    The base of Architecture (what a bundle stores) and of app.train.options.Candidate (a point of the
    hyper-parameter grid), so the fields are declared once; their `help` metadata is what the
    command line says of them.
    """

    latent_dim: int = field(
        metadata={"flag": "--latent", "help": "latent size k (the sphere S^(k-1) has intrinsic size k - 1)"}
    )
    hidden: int = field(default=64, metadata={"help": "units per hidden layer"})
    depth: int = field(default=3, metadata={"help": "hidden layers in each of encoder and decoder"})
    activation: ActivationName = field(default="swish", metadata={"help": "activation of the hidden layers"})
    geometry: Geometry = field(default="euclidean", metadata={"help": "latent space; default: the prior's"})
    prior: PriorName = field(default="normal", metadata={"help": "latent density"})
    components: int = field(default=1, metadata={"help": "mixture components K of the vamp and vmf priors"})

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {ACTIVATION_NAMES}")
        if self.geometry not in ("euclidean", "sphere"):
            raise ValueError(f"unknown geometry {self.geometry!r}; choose 'euclidean' or 'sphere'")
        if self.geometry == "sphere" and self.latent_dim < 2:
            raise ValueError("a spherical latent space needs latent_dim >= 2 (S^(k-1) with k >= 2)")
        if self.prior not in PRIOR_GEOMETRY:
            raise ValueError(f"unknown prior {self.prior!r}; choose one of {sorted(PRIOR_GEOMETRY)}")
        if PRIOR_GEOMETRY[self.prior] != self.geometry:
            raise ValueError(
                f"prior {self.prior!r} is a density on the {PRIOR_GEOMETRY[self.prior]} latent space, "
                f"not on the {self.geometry} one"
            )
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")
        if self.hidden < 1 or self.depth < 0:
            raise ValueError(f"hidden must be >= 1 and depth >= 0, got {self.hidden}, {self.depth}")

    @property
    def intrinsic_dim(self) -> int:
        """m: the manifold's dimension, k for Euclidean latents and k - 1 on the sphere."""
        return intrinsic_dim(self.latent_dim, self.geometry)

    def network(self) -> Network:
        """The network fields alone (of an Architecture or a Candidate)."""
        return Network(**{f.name: getattr(self, f.name) for f in fields(Network)})


_NAME_FIELDS = ("activation", "geometry", "prior")


@dataclass(frozen=True)
class Architecture(Network):
    """Everything needed to rebuild encoder, decoder and prior; stored verbatim in a model bundle."""

    input_dim: int = field(kw_only=True)  # d

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {self.input_dim}")
        if self.intrinsic_dim > self.input_dim:
            raise ValueError(
                f"latent size {self.intrinsic_dim} (intrinsic) exceeds the data size {self.input_dim}: "
                "a manifold cannot have more dimensions than the space it lies in"
            )

    @classmethod
    def of(cls, network: Network, input_dim: int) -> Architecture:
        return cls(**{f.name: getattr(network, f.name) for f in fields(Network)}, input_dim=input_dim)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Architecture:
        """As stored: every field present, sizes as JSON integers (not 64.0), names as strings."""
        names = {f.name for f in fields(cls)}
        groups = (("unknown", set(data) - names), ("missing", names - set(data)))
        wrong = [f"{what} fields {sorted(group)}" for what, group in groups if group]
        if wrong:
            raise ValueError(", ".join(wrong))
        for name, value in data.items():
            wanted = str if name in _NAME_FIELDS else int
            if type(value) is not wanted:
                raise ValueError(f"{name} must be a JSON {wanted.__name__}, got {value!r}")
        return cls(**data)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def intrinsic_dim(latent_dim: int, geometry: Geometry) -> int:
    """m: the latent manifold's dimension, k for Euclidean latents and k - 1 on the sphere."""
    return latent_dim - 1 if geometry == "sphere" else latent_dim


def layer_names(net: str, index: int) -> tuple[str, str]:
    """The names of layer `index`'s weight and bias in network `net` (encoder, decoder): the one
    place that spells them. app.model.nn's modules are laid out so their state dicts use them."""
    return f"{net}.net.layers.{index}.weight", f"{net}.net.layers.{index}.bias"


def weight_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The tensors a bundle's weights file must hold for `arch`, by name (see docs/bundle.md)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for net, n_in, n_out in (
        ("encoder", arch.input_dim, arch.latent_dim),
        ("decoder", arch.latent_dim, arch.input_dim),
    ):
        sizes = [n_in] + [arch.hidden] * arch.depth + [n_out]
        for i in range(len(sizes) - 1):
            weight, bias = layer_names(net, i)
            shapes[weight] = (sizes[i + 1], sizes[i])
            shapes[bias] = (sizes[i + 1],)
    if arch.prior in ("vamp", "vmf"):
        shapes["prior.pseudo_inputs"] = (arch.components, arch.input_dim)
    if arch.prior == "vamp":
        shapes["prior.log_scales"] = (arch.components, arch.latent_dim)
    if arch.prior == "vmf":
        shapes["prior.kappa_raw"] = (arch.components,)
    return shapes
