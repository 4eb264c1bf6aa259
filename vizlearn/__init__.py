"""vizlearn: see what a convolutional network has learned (Zeiler & Fergus 2014) and why transfer learning works.

Public API (details in each function's docstring):
    load_model, list_layers, capture, receptive_field, top_k, project, project_units, plot, ...
"""
__version__ = "0.1.0"

from . import plot
from .capture import capture
from .layers import LayerInfo, list_layers
from .models import LoadedModel, load_model, predict
from .images import ImageSet, batches, image_set, load_folder, load_images, sample_photos, to_display, to_tensor

_LAZY = {  # name -> module, imported on first use (keeps `import vizlearn` light)
    "choose_filters": "features", "default_layers": "features", "feature_tiles": "features",
    "first_conv": "features",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vizlearn' has no attribute {name!r}")

from .projection import project, project_units, display_projection
from .sanity import sanity_check, SanityResult
from .receptive_field import Field, receptive_field, receptive_fields
from .topk import TopK, top_k
# Zeiler & Fergus experiments (H5): occlusion, invariance, feature evolution, correspondence, layer-1 health
from .occlusion import OcclusionResult, occlusion, run_occlusion
from .invariance import InvarianceResult, invariance, run_invariance
from .evolution import EvolutionResult, FeatureEvolution, run_evolution, train_small_cnn_demo
from .correspondence import CorrespondenceResult, correspondence, run_correspondence
from .layer1 import Layer1Health, layer1_health, run_layer1
# Fine-tuning drift and representation similarity (H4)
from .finetune import FinetuneResult, finetune
from .similarity import debiased_linear_cka, flatten_features, linear_cka, minibatch_cka, MinibatchCKA, rbf_cka
from .datasets import Dataset, digits, image_folder, lfw, load_dataset
