"""The thin reference CuMo model (CLIP-MoE + MLP-MoE connector + causal LM) and its three-stage recipe."""

from cumo_layers.models.model import IMAGE_TOKEN_ID, CuMoModel, CuMoOutput

__all__ = ["IMAGE_TOKEN_ID", "CuMoModel", "CuMoOutput"]
