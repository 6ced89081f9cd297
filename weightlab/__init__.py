"""weightlab: catalog, compose, deploy and train the weight residuals behind fast, personalized video diffusion.

    w' = w0 + α·τ_style + β·τ_image_accel + γ·τ_motion        (AnimateLCM, Eq. 2)

Public surface (heavy modules are imported on first use):
    load, Base, Dense, LoRA, MotionModule, inspect_path          residuals and formats
    Recipe, Term, Merger, build_unet, merge_to_file, merge_to_folder    the merge engine
    VideoPipeline, generate, NoisePrior, export_onnx, reweight_onnx, OnnxVideoPipeline    sampling and deployment
    Registry, Client                                             the catalog, local or over HTTP
"""

from weightlab.errors import WeightlabError

__version__ = "0.1.0"

_LAZY = {
    "load": "weightlab.loading",
    "Base": "weightlab.residuals", "Dense": "weightlab.residuals", "LoRA": "weightlab.residuals",
    "MotionModule": "weightlab.residuals", "LoRATarget": "weightlab.residuals",
    "inspect_path": "weightlab.inspect", "Inspection": "weightlab.inspect",
    "Recipe": "weightlab.recipe", "Term": "weightlab.recipe",
    "Merger": "weightlab.merge", "build_unet": "weightlab.merge",
    "merge_to_file": "weightlab.merge", "merge_to_folder": "weightlab.merge",
    "VideoPipeline": "weightlab.video", "generate": "weightlab.video", "NoisePrior": "weightlab.noise_prior",
    "OnnxVideoPipeline": "weightlab.onnx_runtime", "export_onnx": "weightlab.onnx_export",
    "reweight_onnx": "weightlab.onnx_export",
    "Registry": "weightlab.registry.service",
    "Client": "weightlab.registry.client",
}

__all__ = ["WeightlabError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'weightlab' has no attribute {name!r}")
